import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { BlockDeviceError, toBlockDeviceError } from '@gannet/block-device';
import { InvariantError } from './assert.js';
import type { Engine } from './engine.js';
import { GannetError } from './errors.js';
import { nextGeneration, unknownGeneration } from './generation.js';
import type { Flusher } from './flusher.js';
import { journalFileName, openJournal, writeJournal } from './journal.js';
import { layerSource, planFlush } from './plan.js';
import type { FailoverOptions, FailoverTarget } from './types.js';

/**
 * Failover ends replication with one side's state as the disk, in three steps; only the first is in the
 * caller's path, and it is O(1) in the bytes buffered, like a checkpoint:
 *
 * 1. Foreground: the request is recorded (one synced metadata batch, so a restart before step 2 reports
 *    it lost rather than forgetting it), the kept side is sealed into the committed layers and the other
 *    dropped (Epochs.failover), and both views read W over the kept state over the backing file at once;
 *    the secondary view takes writes into W, the primary view refuses them.
 * 2. Durable: once a flush pass in flight has ended, the kept state (the committed layers, newest entry
 *    winning) is written to a journal file and fdatasynced, the backing file too (blocks a failed pass
 *    left unsynced), and the state file commits to the journal: from here a restart finds the failover
 *    complete and serves the journal until it is applied.
 * 3. Applied: the flusher writes the kept layers to the backing file as it writes committed epochs; once
 *    they are all durable there, the state file forgets the journal and the file goes.
 *
 * Writes after failover stay in W until step 3 (a journal applied again after a crash must not
 * overwrite them); afterwards a write goes straight to the backing file unless a layer holds its blocks
 * (see ReplicatedVolume). A FLUSH waits for step 3, then seals W and waits for the flusher.
 *
 * A failure of step 2 or 3 leaves the volume failed over in memory with the error in status; FLUSH
 * fails with it, and calling failover again with the same target retries.
 */
export class Failover {
  private running: Promise<void> | null = null;
  private retiring: Promise<void> | null = null;
  private failure: Error | null = null;
  private started = 0;

  constructor(
    private readonly engine: Engine,
    private readonly flusher: Flusher,
  ) {
    engine.onPassDone = () => this.afterPass();
  }

  /** Step 1; returns once the views serve the kept state. Idempotent for the same target. */
  async start(options: FailoverOptions): Promise<void> {
    const { engine } = this;
    const to = options.to ?? 'secondary';
    if (to !== 'secondary' && to !== 'checkpoint' && to !== 'primary') {
      throw new GannetError('EOPTIONS', `to: must be secondary, checkpoint or primary, not ${String(to)}`);
    }
    if (engine.state === 'failed-over') {
      if (engine.target !== to) throw new GannetError('ESTATE', `failover: already failed over to ${engine.target}`);
      if (this.failure !== null) this.resume();
      return;
    }
    if (engine.state !== 'replicating' || engine.closing) throw new GannetError('ESTATE', `failover: the volume is ${engine.closing ? 'closing' : engine.state}`);
    if (engine.torn.length > 0 && options.force !== true) {
      const bytes = engine.torn.reduce((n, r) => n + r.length, 0);
      throw new GannetError(
        'ETORN',
        `failover refused: ${bytes} bytes in ${engine.torn.length} ranges were torn by an interrupted flush and hold a mix of ` +
          'epochs until the primary resyncs them; failing over now keeps them so (force to accept that)',
      );
    }
    if (engine.inconsistent !== null && options.force !== true) {
      throw new GannetError(
        'ETORN',
        `failover refused: a resync from the primary began at ${engine.inconsistent.since} and has not ended, so the disk is ` +
          'part old, part new; failing over now keeps it so (force to accept that)',
      );
    }
    const { lease, epoch } = engine.epochs;
    if (!lease.covers(epoch + 1)) await lease.ensure(epoch + 1);
    const requestedAt = new Date().toISOString();
    // A failed-over volume is a new lineage: a primary that attaches later and wrote meanwhile is split from it.
    const before = engine.generation;
    const generation = nextGeneration(before ?? unknownGeneration);
    await engine.meta.recordFailoverPending(to, requestedAt, generation, before);
    engine.generation = generation;
    if (engine.state !== 'replicating') throw new GannetError('ESTATE', `failover: the volume is ${engine.state}`);
    const start = performance.now();
    this.started = start;
    const failoverEpoch = engine.epochs.failover(to === 'secondary' ? 'secondary' : to === 'primary' ? 'primary' : null);
    engine.state = 'failed-over';
    engine.target = to;
    const foregroundMs = performance.now() - start;
    engine.failover = { target: to, requestedAt, foregroundMs, phase: 'journaling', epoch: failoverEpoch };
    engine.wake();
    this.resume();
    engine.emit('failover', { to, durationMs: foregroundMs });
  }

  /**
   * A reopened failed-over volume: a committed journal is served as a layer and applied again (step 3);
   * without one, the volume is the plain disk it became.
   */
  async reopen(to: FailoverTarget): Promise<void> {
    const { engine } = this;
    const ref = engine.record.journal;
    const requestedAt = engine.record.failoverRequestedAt ?? engine.record.createdAt;
    this.started = performance.now();
    if (ref === null) {
      engine.epochs.failedOver([]);
      engine.failover = { target: to, requestedAt, phase: 'done', epoch: engine.epochs.epoch };
      return;
    }
    const path = join(engine.options.dataDir, ref.file);
    const { device, index } = await openJournal(engine.storage, path, ref, engine.geometry, engine.uuid);
    const epoch = engine.epochs.epoch;
    const layer = engine.buffers.journalLayer(epoch, index.blocks, index.headerBlocks, index.holeRuns, index.zeroRuns);
    engine.spiller.adopt(layer, device);
    engine.epochs.failedOver([layer]);
    engine.failover = { target: to, requestedAt, phase: 'applying', epoch };
    this.flusher.kick();
  }

  /**
   * Waits until the kept state is in the backing file (step 3 done); throws what keeps it from getting
   * there. A flush pass that failed is tried once more first, so a fault that has gone heals here.
   */
  async applied(): Promise<void> {
    const { engine } = this;
    let retried = false;
    for (;;) {
      if (engine.failover === null || engine.failover.phase === 'done') return;
      if (engine.state === 'halted') throw new BlockDeviceError('EIO', `the volume is halted: ${engine.error?.message}`);
      if (engine.state === 'closed') throw new BlockDeviceError('ESHUTDOWN', 'the volume is closed');
      if (this.failure !== null) throw toBlockDeviceError(this.failure, 'the failover is not durable');
      const flushFailure = this.flusher.failure;
      if (flushFailure !== null && engine.failover.phase === 'applying') {
        if (retried) throw toBlockDeviceError(flushFailure, 'the kept state cannot reach the backing file');
        retried = true;
        this.flusher.retry();
      }
      await engine.nextWake();
    }
  }

  /** Waits for step 2 or 3 in flight (close must not close the files under it). */
  async idle(): Promise<void> {
    while (this.running !== null || this.retiring !== null) await (this.running ?? this.retiring);
  }

  /** Starts (or, after a failure, retries) step 2 in the background. */
  private resume(): void {
    if (this.running !== null || this.engine.failover?.phase !== 'journaling') return;
    this.failure = null;
    this.engine.clearError('failover');
    this.running = this.makeDurable()
      .catch((err: unknown) => {
        if (err instanceof InvariantError) {
          this.engine.halt(err);
          return;
        }
        this.failure = err instanceof Error ? err : new Error(String(err));
        this.engine.setError('failover', err, `failover to ${this.engine.target} is not durable`);
      })
      .finally(() => {
        this.running = null;
        this.engine.wake();
      });
  }

  /** Step 2. */
  private async makeDurable(): Promise<void> {
    const { engine } = this;
    const status = engine.failover!;
    await this.flusher.idle();
    if (engine.state !== 'failed-over') return;
    // Blocks a failed pass wrote and released are only in the page cache: the journal does not hold them.
    await engine.backing.flush();
    const kept = engine.epochs.committed.slice();
    const plan = await planFlush(kept);
    const empty = plan.blocks.length === 0 && plan.holeRuns.length === 0 && plan.zeroRuns.length === 0;
    let journalBytes = 0;
    let journal = null;
    if (!empty) {
      const dir = engine.options.dataDir;
      journal = await writeJournal(engine.storage, join(dir, journalFileName), dir, plan, layerSource(engine.buffers, engine.spiller, kept), engine.geometry, engine.uuid);
      journalBytes = plan.blocks.length * engine.geometry.blockBytes;
    }
    if (engine.state !== 'failed-over') return;
    await engine.writeRecord({ lifecycle: 'failed-over', target: status.target, journal, failoverRequestedAt: status.requestedAt });
    await engine.meta.recordFailedOver(status.target);
    engine.lostFailover = null;
    const durableMs = performance.now() - this.started;
    engine.failover = { ...status, durableMs, phase: 'applying' };
    engine.emit('failover-durable', { to: status.target, durableMs, journalBytes });
    engine.wake();
    // A pass that failed before the failover is tried again now: the kept state is its work too.
    this.flusher.retry();
    // With nothing kept in memory there is no pass to wait for.
    this.afterPass();
  }

  /** Step 3: once no committed layer of the kept state is left, the journal is retired. */
  private afterPass(): void {
    const { engine } = this;
    const status = engine.failover;
    if (status === null || status.phase !== 'applying' || this.retiring !== null) return;
    if (engine.epochs.committed.some((layer) => layer.sealedEpoch <= status.epoch)) return;
    this.retiring = this.retire()
      .catch((err: unknown) => {
        this.failure = err instanceof Error ? err : new Error(String(err));
        engine.setError('failover', err, 'retiring the failover journal');
      })
      .finally(() => {
        this.retiring = null;
        engine.wake();
      });
  }

  private async retire(): Promise<void> {
    const { engine } = this;
    const status = engine.failover!;
    const ref = engine.record.journal;
    if (ref !== null) {
      await engine.writeRecord({ journal: null });
      await engine.storage.removeFile(join(engine.options.dataDir, ref.file));
    }
    engine.failover = { ...status, phase: 'done' };
    engine.emit('failover-applied', { to: status.target, appliedMs: performance.now() - this.started });
  }
}
