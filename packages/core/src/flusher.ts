import { performance } from 'node:perf_hooks';
import type { Layer } from './buffer.js';
import type { Engine } from './engine.js';
import { GannetError } from './errors.js';
import { layerSource, planFlush, planRanges, planRuns, writePlan } from './plan.js';
import { subtractRanges } from './ranges.js';

/**
 * The background flush of committed epochs: one pass writes every committed layer there is (the newest
 * entry of a block wins), so a backlog of small epochs costs one sort and one fdatasync. The ranges a
 * pass writes are recorded before its first write: if the process dies mid-pass, the next open reports
 * them as torn. After the fdatasync the durable epoch is recorded and the layers are dropped.
 *
 * A failed pass leaves the layers in place and the error set: the next checkpoint is refused with it and
 * starts a retry (`retry`), so a transient fault heals without a restart.
 */
export class Flusher {
  private running: Promise<void> | null = null;
  private error: Error | null = null;

  constructor(private readonly engine: Engine) {}

  /** The last pass's failure, until a retry starts. */
  get failure(): Error | null {
    return this.error;
  }

  kick(): void {
    const { engine } = this;
    if (this.running !== null || this.error !== null || engine.state !== 'replicating') return;
    if (engine.epochs.committed.length === 0) return;
    this.running = this.loop();
  }

  /** After a failure: try again (the next checkpoint calls this). */
  retry(): void {
    if (this.running !== null || this.engine.state !== 'replicating') return;
    this.error = null;
    this.kick();
  }

  /** Waits until no pass runs. */
  async idle(): Promise<void> {
    while (this.running !== null) await this.running;
  }

  private async loop(): Promise<void> {
    const { engine } = this;
    // Started on the next turn of the event loop: nothing of the flush runs inside checkpoint().
    await new Promise<void>((resolve) => setImmediate(resolve));
    let failure: GannetError | null = null;
    while (engine.epochs.committed.length > 0 && this.error === null && engine.state === 'replicating') {
      const layers = engine.epochs.committed.slice();
      try {
        await this.pass(layers);
      } catch (err) {
        engine.buffers.pin(layers, false);
        this.error = err instanceof Error ? err : new Error(String(err));
        failure = new GannetError('EIO', `flush of epochs up to ${layers.at(-1)!.sealedEpoch} failed: ${this.error.message}`, {
          cause: err,
        });
      }
    }
    // Idle before anyone hears of the failure, so a listener's checkpoint() can start the retry.
    this.running = null;
    engine.wake();
    if (failure !== null) engine.reportError(failure);
  }

  private async pass(layers: Layer[]): Promise<void> {
    const { engine } = this;
    const start = performance.now();
    engine.buffers.pin(layers, true);
    const plan = await planFlush(layers);
    const runs = planRuns(plan.blocks, engine.geometry.blockBytes);
    const ranges = planRanges(runs, plan, engine.geometry);
    if (ranges.length > 0) await engine.meta.recordFlushing(ranges);
    const bytes = await writePlan(engine.backing, runs, layerSource(engine.buffers, engine.spiller, layers), plan, engine.geometry);
    // Also what makes punched holes and zeroed ranges durable: fdatasync flushes allocation changes.
    if (bytes > 0) await engine.backing.flush();
    const durable = layers.at(-1)!.sealedEpoch;
    const torn = subtractRanges(engine.torn, ranges);
    await engine.meta.recordDurable(durable, torn);
    engine.torn = torn;
    engine.epochs.flushed(layers);
    engine.wake();
    engine.emit('flushed', { epoch: durable, bytes, durationMs: performance.now() - start });
  }
}
