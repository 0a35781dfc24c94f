import { performance } from 'node:perf_hooks';
import { blockErrorCode, type WriteRun } from '@gannet/block-device';
import { InvariantError } from './assert.js';
import { isSpilled, type Layer } from './buffer.js';
import type { Engine } from './engine.js';
import { GannetError } from './errors.js';
import { coveredPairs, planFlush, prepareStepEntries, writeZeroRuns } from './plan.js';
import { pairsOfRanges, rangesOfPairs, subtractRanges, type RangePairs } from './ranges.js';

/** Slab batches handed to the backing file at once: the writer thread always has the next one queued. */
export const slabBatchesInFlightMax = 4;
/** Spilled blocks read back and written per batch. */
export const spilledBatchBlocksMax = 256;

const yieldToEventLoop = () => new Promise<void>((resolve) => setImmediate(resolve));

/**
 * The background flush of committed epochs. One pass takes every committed layer there is (the newest
 * entry of a block wins), so a backlog of small epochs costs one plan and one fdatasync:
 *
 * 1. Plan: the blocks and zeroed ranges that end in the file, and the byte ranges they cover, recorded
 *    before the first write: if the process dies mid-pass, the next open reports them as torn.
 * 2. Entries of older layers that a newer layer of the pass hides are dropped: from here on every block
 *    has one entry in the pass.
 * 3. Zeroed ranges are applied (punched, or zeroed where NO_HOLE), then removed from the layers: reads of
 *    those blocks find zeroes in the file.
 * 4. Data goes slab by slab: each slab's blocks, in block order and coalesced, are one batch for the
 *    backing file (FileDevice writes it from its writer thread, straight from the shared slab), and once
 *    the batch is written its blocks leave their layer and the slab goes back to the pool. So memory is
 *    released as the pass goes, not at its end, and writes waiting for memory are admitted at the rate
 *    the disk takes committed data. Reads of a flushed block find it in the file (the page cache).
 * 5. fdatasync, then the durable epoch is recorded and the (now empty) layers are dropped.
 *
 * Releasing blocks before the fdatasync is safe: until the durable epoch is recorded, the pass's ranges
 * are the torn ranges a crash reports, whether the blocks were still in memory or not.
 *
 * A failed pass leaves what it did not write in place and the error set: the next checkpoint is refused
 * with it and starts a retry (`retry`), so a transient fault heals without a restart.
 */
export class Flusher {
  private running: Promise<void> | null = null;
  private error: Error | null = null;
  /**
   * Ranges of failed passes: some of their blocks reached the file (and left memory) without an
   * fdatasync, so they stay in the ranges the next pass records until one pass completes.
   */
  private unfinished: RangePairs = new Float64Array(0);

  constructor(private readonly engine: Engine) {}

  /** The last pass's failure, until a retry starts. */
  get failure(): Error | null {
    return this.error;
  }

  /**
   * Whether committed data is on its way to the file (memory held by it will be released): the flusher
   * has work and no failure, and may run now or once a failover's journal commits.
   */
  get draining(): boolean {
    const { engine } = this;
    if (this.error !== null || engine.epochs.committed.length === 0) return false;
    return engine.flushAllowed || (engine.failover?.phase === 'journaling' && engine.error === null);
  }

  kick(): void {
    const { engine } = this;
    if (this.running !== null || this.error !== null || !engine.flushAllowed) return;
    if (engine.epochs.committed.length === 0) return;
    this.running = this.loop();
  }

  /** After a failure: try again (the next checkpoint calls this). */
  retry(): void {
    if (this.running !== null || !this.engine.flushAllowed) return;
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
    await yieldToEventLoop();
    let failure: GannetError | null = null;
    while (engine.epochs.committed.length > 0 && this.error === null && engine.flushAllowed) {
      const layers = engine.epochs.committed.slice();
      try {
        await this.pass(layers);
        engine.clearError('flush');
        engine.onPassDone?.();
      } catch (err) {
        if (err instanceof InvariantError) {
          engine.halt(err);
          break;
        }
        if (engine.state === 'halted') break;
        this.error = err instanceof Error ? err : new Error(String(err));
        failure = new GannetError(blockErrorCode(err) === 'ENOSPC' ? 'ENOSPC' : 'EIO', `flush of epochs up to ${layers.at(-1)!.sealedEpoch} failed: ${this.error.message}`, {
          cause: err,
        });
      }
    }
    // Idle before anyone hears of the failure, so a listener's checkpoint() can start the retry.
    this.running = null;
    engine.wake();
    if (failure !== null) engine.setError('flush', failure, 'flushing committed data to the backing file');
  }

  private async pass(layers: Layer[]): Promise<void> {
    const { engine } = this;
    const { backing, geometry, meta } = engine;
    const start = performance.now();
    const plan = await planFlush(layers);
    const retrying = this.unfinished.length > 0;
    const covered = coveredPairs(plan.blocks, plan.holeRuns, plan.zeroRuns, geometry);
    const ranges = retrying ? pairsOfRanges([...rangesOfPairs(this.unfinished), ...rangesOfPairs(covered)]) : covered;
    this.checkRunning();
    if (ranges.length > 0) await meta.recordFlushing(ranges);
    this.unfinished = ranges;
    await this.dropHidden(layers);
    let bytes = await writeZeroRuns(backing, plan.holeRuns, false, geometry);
    bytes += await writeZeroRuns(backing, plan.zeroRuns, true, geometry);
    for (const layer of layers) engine.buffers.clearRanges(layer);
    for (const layer of layers) bytes += await this.writeSlabs(layer);
    for (const layer of layers) bytes += await this.writeSpilled(layer);
    // Also what makes punched holes and zeroed ranges durable: fdatasync flushes allocation changes. After
    // a failed pass, blocks it wrote left memory unsynced: this pass syncs even with nothing left to write.
    this.checkRunning();
    if (bytes > 0 || retrying) await backing.flush();
    this.checkRunning();
    const durable = layers.at(-1)!.sealedEpoch;
    const torn = engine.torn.length > 0 ? subtractRanges(engine.torn, rangesOfPairs(ranges)) : engine.torn;
    await meta.recordDurable(durable, torn);
    this.unfinished = new Float64Array(0);
    engine.torn = torn;
    engine.epochs.flushed(layers);
    engine.wake();
    engine.emit('flushed', { epoch: durable, bytes, durationMs: performance.now() - start });
  }

  /** A volume halted while a pass runs writes nothing more: the pass stops at its next step. */
  private checkRunning(): void {
    if (this.engine.state === 'halted') throw new GannetError('EHALTED', 'the volume halted during a flush pass');
  }

  /** Drops the entries of older layers that a newer layer of the pass hides (data or a zeroed range). */
  private async dropHidden(layers: readonly Layer[]): Promise<void> {
    let steps = 0;
    for (let i = 0; i < layers.length - 1; i++) {
      const newer = layers.slice(i + 1);
      const hidden: number[] = [];
      for (const b of layers[i].dataBlocks()) {
        if (newer.some((layer) => layer.holds(b))) hidden.push(b);
        if (++steps % prepareStepEntries === 0) await yieldToEventLoop();
      }
      for (const b of hidden) this.engine.buffers.removeFlushed(layers[i], b);
    }
  }

  /** Writes a committed layer's slabs, releasing each once written; returns the bytes written. */
  private async writeSlabs(layer: Layer): Promise<number> {
    const { buffers, backing, geometry } = this.engine;
    const bs = geometry.blockBytes;
    const inFlight = new Set<Promise<void>>();
    let failure: unknown = null;
    let bytes = 0;
    for (const slab of buffers.slabsOf(layer)) {
      this.checkRunning();
      const { blocks, slots } = buffers.slabContents(layer, slab);
      if (blocks.length === 0) continue;
      const runs: WriteRun[] = [];
      for (let i = 0; i < blocks.length; ) {
        let n = 1;
        while (i + n < blocks.length && blocks[i + n] === blocks[i] + n && slots[i + n] === slots[i] + n) n++;
        const length = (n - 1) * bs + buffers.blockLength(blocks[i + n - 1]);
        const slot = buffers.slotBytes(slots[i]);
        runs.push({ offset: blocks[i] * bs, buffers: [new Uint8Array(slot.buffer, slot.byteOffset, length)] });
        bytes += length;
        i += n;
      }
      const write: Promise<void> = backing.writeBatch(runs).then(
        () => {
          inFlight.delete(write);
          for (const b of blocks) buffers.removeFlushed(layer, b);
          this.engine.wake();
        },
        (err: unknown) => {
          inFlight.delete(write);
          failure ??= err;
        },
      );
      inFlight.add(write);
      if (inFlight.size >= slabBatchesInFlightMax) await Promise.race(inFlight);
      if (failure !== null) break;
    }
    await Promise.all(inFlight);
    if (failure !== null) throw failure;
    return bytes;
  }

  /** Writes a committed layer's spilled blocks (P spilled them before its checkpoint); returns the bytes. */
  private async writeSpilled(layer: Layer): Promise<number> {
    const { buffers, backing, geometry, spiller } = this.engine;
    const spilled: [number, number][] = [];
    for (const b of layer.dataBlocks()) {
      const entry = layer.dataEntry(b)!;
      if (isSpilled(entry)) spilled.push([b, entry]);
    }
    let bytes = 0;
    for (let i = 0; i < spilled.length; i += spilledBatchBlocksMax) {
      this.checkRunning();
      const chunk = spilled.slice(i, i + spilledBatchBlocksMax);
      const runs = await Promise.all(
        chunk.map(async ([b, entry]) => {
          const data = await spiller.read(layer, entry);
          if (data === undefined) throw new GannetError('EIO', `spilled block ${b} of epoch ${layer.sealedEpoch} is gone`);
          const length = buffers.blockLength(b);
          bytes += length;
          return { offset: b * geometry.blockBytes, buffers: [data.subarray(0, length)] };
        }),
      );
      await backing.writeBatch(runs);
      for (const [b] of chunk) buffers.removeFlushed(layer, b);
      this.engine.wake();
    }
    return bytes;
  }
}
