import { EventEmitter } from 'node:events';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { BlockDeviceError, EXTENT_ZERO, settleAll, type Extent } from 'nbd-server-js';
import { assert } from './assert.js';
import { Backing } from './backing.js';
import { BlockBuffers, isSlot, isSpilled, ZERO, zeroRangeEntriesMax, type Layer } from './buffer.js';
import { EpochLease, epochLeaseCount, groupCheckpoint, type GroupCheckpointable } from './checkpoint.js';
import { GannetError } from './errors.js';
import {
  layerSource,
  planFlush,
  planRuns,
  runRanges,
  writeRuns,
  writeZeroRuns,
  zeroRunRanges,
  type BlockSource,
  type FlushPlan,
  type Run,
} from './flusher.js';
import { journalZeroRecordBytes, MetaStore, type JournalEntry, type PersistedMeta } from './meta.js';
import { parseVolumeOptions } from './parse.js';
import type { ResolvedVolumeOptions, VolumeOptions } from './options.js';
import { mergeRanges, subtractRanges } from './ranges.js';
import { Spiller } from './spill.js';
import type { ByteRange, FailoverTarget, Volume, VolumeEvents, VolumeState, VolumeStats } from './types.js';
import { VolumeView, type ViewHost, type ViewMode, type ViewRole, type ViewWriteOptions } from './view.js';

/** Name of the volume's LevelDB directory inside dataDir. */
export const metaDirName = 'gannet-meta';
/** Journal bytes per synced LevelDB batch during failover. */
const journalChunkBytes = 16 * 1024 * 1024;
/** A write retries when a checkpoint replaced its buffer while it fetched old block content. */
const writeAttemptsMax = 64;
/** A read retries a spilled block whose layer was flushed and dropped while it was being fetched. */
const readAttemptsMax = 8;
/** Blocks examined per extents call (the caller asks again for the rest). */
const extentsBlocksMax = 64 * 1024;

/**
 * GANNET's storage side. Two views share one backing file:
 *   primary view   = P over C over B   (PVM writes, forwarded; applied to B at the next checkpoint)
 *   secondary view = S over C over B   (SVM writes; dropped at the next checkpoint)
 * where P and S are the buffers of the current epoch, C the committed (sealed) P buffers not yet on disk,
 * newest first, and B the backing file.
 *
 * checkpoint(): seal P into C, drop S, start a new epoch: no data is copied or written (O(1) in the bytes
 * buffered). A background flusher writes C to B in offset order, fdatasyncs, records the durable epoch in
 * LevelDB, and only then drops C; reads consult C until then.
 *
 * Writes: whole blocks are copied into a slab slot once. A write covering part of a block needs the
 * block's old content from the layer below (read C over B); we fill the slot from below rather than keep a
 * byte-validity mask, which would cost a mask per block and make every read merge layers byte by byte.
 * The fill may await (LevelDB, the file); after the await the write re-checks that its buffer is still the
 * current one and the block's entry did not change, else it fetches again. All blocks of a write are then
 * applied synchronously, so a checkpoint (itself synchronous) falls wholly before or after a write: a
 * checkpoint covers exactly the primary writes acknowledged before it was requested.
 *
 * FLUSH and FUA while replicating are acknowledged without disk I/O: buffered data is protected by the
 * replication protocol (the primary VM holds the same writes and a failed secondary is re-seeded from it),
 * as in COLO. After failover the volume is a plain disk and FLUSH/FUA are fdatasync.
 *
 * Failover writes the kept buffer merged over the unflushed committed data to a LevelDB journal (block
 * contents, and one record per run of zeroed blocks), then the state record 'failing-over' (with the
 * target), applies the journal to B, fdatasyncs, and records 'failed-over' while deleting the journal in
 * one batch. Replaying the journal is idempotent (it holds final contents, its records never overlap), so
 * a crash anywhere in between is finished by the next open.
 */
export class ReplicatedVolume extends EventEmitter<VolumeEvents> implements Volume, GroupCheckpointable {
  readonly primary: VolumeView;
  readonly secondary: VolumeView;
  readonly sizeBytes: number;
  readonly options: ResolvedVolumeOptions;

  private readonly blockBytes: number;
  private readonly buffers: BlockBuffers;
  private readonly meta: MetaStore;
  private readonly backing: Backing;
  private readonly spiller: Spiller;
  private readonly lease: EpochLease;

  private state: VolumeState;
  private target: FailoverTarget | undefined;
  private epoch: number;
  private durableEpoch: number;
  private torn: ByteRange[];
  private P: Layer;
  private S: Layer;
  /** Sealed P buffers not yet dropped, oldest first. */
  private readonly committed: Layer[] = [];

  private closing: Promise<void> | null = null;
  private flushing: Promise<void> | null = null;
  private flushError: Error | null = null;
  private failing: Promise<void> | null = null;
  private failoverError: Error | null = null;
  private reservedBytes = 0;
  private overPressure = false;
  private waiters: (() => void)[] = [];
  private readonly chores = new Set<Promise<void>>();

  readonly [groupCheckpoint] = {
    prepare: (): Promise<void> => this.lease.ensure(this.epoch + 1),
    check: (): void => this.checkCanCheckpoint(),
    seal: (): number => this.seal(performance.now()),
  };

  private constructor(
    options: ResolvedVolumeOptions,
    meta: MetaStore,
    backing: Backing,
    persisted: { state: VolumeState; target: FailoverTarget | undefined; epoch: number; durableEpoch: number; epochCeiling: number; torn: ByteRange[] },
  ) {
    super();
    this.options = options;
    this.sizeBytes = options.sizeBytes;
    this.blockBytes = options.blockBytes;
    this.meta = meta;
    this.backing = backing;
    this.buffers = new BlockBuffers({
      blockBytes: options.blockBytes,
      sizeBytes: options.sizeBytes,
      memoryBytesMax: options.memoryBytesMax,
    });
    this.spiller = new Spiller(this.buffers, meta, () => this.liveLayers());
    this.state = persisted.state;
    this.target = persisted.target;
    this.epoch = persisted.epoch;
    this.durableEpoch = persisted.durableEpoch;
    this.torn = persisted.torn;
    this.lease = new EpochLease(persisted.epochCeiling, (ceiling) => this.meta.putEpochCeiling(ceiling));
    this.P = this.buffers.newLayer('primary', this.epoch);
    this.S = this.buffers.newLayer('secondary', this.epoch);
    const host: ViewHost = {
      mode: (role) => this.viewMode(role),
      read: (role, buf, offset) => this.viewRead(role, buf, offset),
      write: (role, src, offset, length, options) => this.viewWrite(role, src, offset, length, options),
      flush: (role) => this.viewFlush(role),
      extents: (role, offset, length) => this.viewExtents(role, offset, length),
      ready: (role) => this.viewReady(role),
    };
    this.primary = new VolumeView('primary', this.sizeBytes, this.blockBytes, host);
    this.secondary = new VolumeView('secondary', this.sizeBytes, this.blockBytes, host);
  }

  /**
   * Creates the volume (backing file created sparse, metadata store in dataDir) or reopens it. A reopened
   * volume is at its last durable checkpoint (stats().durableEpoch), with the ranges an interrupted flush
   * may have torn in stats().tornRanges, or fully failed over; its epoch is max(recorded epoch ceiling,
   * durable epoch) + 1, above every epoch it reported before.
   */
  static async open(input: VolumeOptions): Promise<ReplicatedVolume> {
    const options = parseVolumeOptions(input);
    if (options.strategy !== 'gannet') {
      throw new GannetError('EOPTIONS', `strategy: ReplicatedVolume is the gannet strategy, not ${options.strategy}`);
    }
    await mkdir(options.dataDir, { recursive: true });
    const meta = await MetaStore.open(join(options.dataDir, metaDirName));
    let backing: Backing | null = null;
    try {
      const persisted = await meta.load();
      const fresh = persisted.identity === null;
      if (!fresh) checkIdentity(persisted, options);
      backing = await Backing.open(options.path, options.sizeBytes, { create: fresh });
      await meta.clearAllSpill();
      if (persisted.state !== 'failing-over') await meta.clearJournal();
      const epoch = fresh ? 0 : Math.max(persisted.epochCeiling, persisted.durableEpoch) + 1;
      const torn = mergeRanges([...persisted.torn, ...persisted.flushing]);
      if (fresh) {
        await meta.create({ sizeBytes: options.sizeBytes, blockBytes: options.blockBytes }, epoch + epochLeaseCount);
      } else {
        await meta.reopen(torn, epoch + epochLeaseCount);
      }
      const volume = new ReplicatedVolume(options, meta, backing, {
        state: persisted.state,
        target: persisted.target ?? undefined,
        epoch,
        durableEpoch: persisted.durableEpoch,
        epochCeiling: epoch + epochLeaseCount,
        torn,
      });
      if (persisted.state === 'failing-over') {
        assert(persisted.target !== null, 'a failing-over volume records its target');
        await volume.replayJournal(persisted.target);
      }
      return volume;
    } catch (err) {
      await backing?.close().catch(() => undefined);
      await meta.close().catch(() => undefined);
      throw err;
    }
  }

  stats(): VolumeStats {
    let committed = 0;
    for (const layer of this.committed) committed += layer.memBlocks * this.blockBytes;
    return {
      strategy: 'gannet',
      state: this.state,
      sizeBytes: this.sizeBytes,
      epoch: this.epoch,
      durableEpoch: this.durableEpoch,
      ...(this.target !== undefined ? { failoverTarget: this.target } : {}),
      bufferedBytes: {
        primary: this.P.memBlocks * this.blockBytes,
        secondary: this.S.memBlocks * this.blockBytes,
        committed,
      },
      spilledBytes: this.buffers.spilledBytes,
      tornRanges: this.torn.map((r) => ({ offset: r.offset, length: r.length })),
    };
  }

  // ---- checkpoint ---------------------------------------------------------------------------------

  /**
   * Seals P into C, drops S, returns the new epoch. Synchronous up to the returned promise (it only waits
   * when checkpoints outrun the background epoch lease, which needs tens of thousands in one fsync).
   */
  checkpoint(): Promise<number> {
    const start = performance.now();
    try {
      this.checkCanCheckpoint();
    } catch (err) {
      return Promise.reject(err);
    }
    if (!this.lease.covers(this.epoch + 1)) {
      return this.lease.ensure(this.epoch + 1).then(() => this.checkpoint());
    }
    return Promise.resolve(this.seal(start));
  }

  private checkCanCheckpoint(): void {
    if (this.closing !== null || this.state === 'closed') throw new GannetError('ESTATE', 'checkpoint: the volume is closed');
    if (this.state !== 'replicating') {
      throw new GannetError('ESTATE', `checkpoint: the volume is ${this.state}, checkpoints end at failover`);
    }
    if (this.flushError !== null) {
      const err = this.flushError;
      this.retryFlush();
      throw new GannetError('EIO', `checkpoint refused: flushing committed data to the backing file failed: ${err.message}`, {
        cause: err,
      });
    }
  }

  /** The O(1) foreground part: no per-block work. */
  private seal(start: number): number {
    assert(this.state === 'replicating', 'seal while replicating');
    assert(this.lease.covers(this.epoch + 1), 'the new epoch is covered by the durable epoch lease');
    const sealed = this.P;
    assert(sealed.role === 'primary' && !sealed.pinned && !sealed.dropped, 'P is a live buffer');
    assert(this.committed.at(-1) !== sealed && this.S !== sealed, 'committed sets are disjoint from the live buffers');
    sealed.role = 'committed';
    this.epoch += 1;
    sealed.sealedEpoch = this.epoch;
    this.committed.push(sealed);
    this.dropLayer(this.S);
    this.P = this.buffers.newLayer('primary', this.epoch);
    this.S = this.buffers.newLayer('secondary', this.epoch);
    this.lease.advanced(this.epoch);
    this.kickFlusher();
    this.wake();
    const epoch = this.epoch;
    this.emit('checkpoint', { epoch, pauseMs: performance.now() - start });
    return epoch;
  }

  // ---- background flush ---------------------------------------------------------------------------

  private kickFlusher(): void {
    if (this.flushing !== null || this.flushError !== null || this.state !== 'replicating') return;
    if (this.committed.length === 0) return;
    this.flushing = this.flushLoop();
  }

  private async flushLoop(): Promise<void> {
    // Started on the next turn of the event loop: nothing of the flush runs inside checkpoint().
    await new Promise<void>((resolve) => setImmediate(resolve));
    let failure: GannetError | null = null;
    while (this.committed.length > 0 && this.flushError === null && this.state === 'replicating') {
      const layers = this.committed.slice();
      try {
        await this.flushPass(layers);
      } catch (err) {
        for (const layer of layers) layer.pinned = false;
        this.flushError = err instanceof Error ? err : new Error(String(err));
        failure = new GannetError('EIO', `flush of epochs up to ${layers.at(-1)!.sealedEpoch} failed: ${this.flushError.message}`, {
          cause: err,
        });
      }
    }
    // Idle before anyone hears of the failure, so a listener's checkpoint() can start the retry.
    this.flushing = null;
    this.wake();
    if (failure !== null) this.reportError(failure);
  }

  /**
   * One pass writes every committed layer there is (newest entry wins), so a backlog of small epochs
   * costs one sort and one fdatasync. The ranges are recorded before the first write: if the process dies
   * mid-pass, the next open reports them as torn.
   */
  private async flushPass(layers: Layer[]): Promise<void> {
    const start = performance.now();
    for (const layer of layers) layer.pinned = true;
    const plan = await planFlush(layers);
    const runs = planRuns(plan.blocks, this.blockBytes);
    const ranges = this.planRanges(runs, plan);
    if (ranges.length > 0) await this.meta.recordFlushing(ranges);
    const bytes = await this.writePlan(runs, layerSource(this.buffers, this.meta, layers), plan);
    // Also what makes punched holes and zeroed ranges durable: fdatasync flushes allocation changes.
    if (bytes > 0) await this.backing.datasync();
    const durable = layers.at(-1)!.sealedEpoch;
    assert(durable > this.durableEpoch && durable <= this.epoch, 'the durable epoch only grows, up to the epoch');
    const torn = subtractRanges(this.torn, ranges);
    await this.meta.recordDurable(durable, torn);
    this.durableEpoch = durable;
    this.torn = torn;
    assert(this.committed.slice(0, layers.length).every((l, i) => l === layers[i]), 'flushed layers are the oldest');
    this.committed.splice(0, layers.length);
    for (const layer of layers) this.dropLayer(layer);
    this.wake();
    this.emit('flushed', { epoch: durable, bytes, durationMs: performance.now() - start });
  }

  /** Writes a plan's data runs, then its hole and zero runs; returns the bytes they cover. */
  private async writePlan(runs: readonly Run[], source: BlockSource, plan: Pick<FlushPlan, 'holeRuns' | 'zeroRuns'>): Promise<number> {
    let bytes = await writeRuns(this.backing, runs, source, this.geometry());
    bytes += await writeZeroRuns(this.backing, plan.holeRuns, 'punch-hole', this.geometry());
    bytes += await writeZeroRuns(this.backing, plan.zeroRuns, 'zero-range', this.geometry());
    return bytes;
  }

  /** The byte ranges a plan writes: what an interruption may leave torn. */
  private planRanges(runs: readonly Run[], plan: Pick<FlushPlan, 'holeRuns' | 'zeroRuns'>): ByteRange[] {
    return mergeRanges([
      ...runRanges(runs, this.blockBytes, this.sizeBytes),
      ...zeroRunRanges(plan.holeRuns, this.blockBytes, this.sizeBytes),
      ...zeroRunRanges(plan.zeroRuns, this.blockBytes, this.sizeBytes),
    ]);
  }

  /** After an I/O error the next checkpoint is refused and starts a retry: a transient fault heals. */
  private retryFlush(): void {
    if (this.flushing !== null || this.state !== 'replicating') return;
    this.flushError = null;
    this.kickFlusher();
  }

  private async flushIdle(): Promise<void> {
    while (this.flushing !== null) await this.flushing;
  }

  // ---- failover -----------------------------------------------------------------------------------

  async failover(options: { to?: FailoverTarget } = {}): Promise<void> {
    const to = options.to ?? 'secondary';
    if (to !== 'secondary' && to !== 'checkpoint' && to !== 'primary') {
      throw new GannetError('EOPTIONS', `to: must be secondary, checkpoint or primary, not ${String(to)}`);
    }
    if (this.state === 'failed-over' || this.state === 'failing-over') {
      if (this.target !== to) throw new GannetError('ESTATE', `failover: already failed over to ${this.target}`);
      if (this.failing !== null) await this.failing;
      if (this.failoverError !== null) throw this.failoverError;
      return;
    }
    if (this.state === 'closed' || this.closing !== null) throw new GannetError('ESTATE', 'failover: the volume is closed');
    const start = performance.now();
    this.state = 'failing-over';
    this.target = to;
    this.wake();
    this.failing = this.runFailover(to);
    try {
      await this.failing;
    } catch (err) {
      this.failoverError = new GannetError('EIO', `failover to ${to} failed: ${(err as Error).message}`, { cause: err });
      this.reportError(this.failoverError);
      throw this.failoverError;
    } finally {
      this.failing = null;
      this.wake();
    }
    this.emit('failover', { to, durationMs: performance.now() - start });
  }

  private async runFailover(to: FailoverTarget): Promise<void> {
    await this.flushIdle();
    const kept = to === 'secondary' ? this.S : to === 'primary' ? this.P : null;
    const layers = kept === null ? this.committed.slice() : [...this.committed, kept];
    for (const layer of this.liveLayers()) layer.pinned = true;
    const plan = await planFlush(layers);
    const source = layerSource(this.buffers, this.meta, layers);
    await this.meta.clearJournal();
    let chunk: JournalEntry[] = [];
    let chunkBytes = 0;
    const add = async (entry: JournalEntry, bytes: number) => {
      chunk.push(entry);
      chunkBytes += bytes;
      if (chunkBytes >= journalChunkBytes) {
        await this.meta.putJournal(chunk);
        chunk = [];
        chunkBytes = 0;
      }
    };
    for (const block of plan.blocks) {
      const found = source(block);
      const data = found instanceof Promise ? await found : found;
      await add({ block, data }, this.blockBytes);
    }
    for (const holes of plan.holeRuns) await add({ holes }, journalZeroRecordBytes);
    for (const zeroes of plan.zeroRuns) await add({ zeroes }, journalZeroRecordBytes);
    if (chunk.length > 0) await this.meta.putJournal(chunk);
    await this.meta.recordFailingOver(to);
    const runs = planRuns(plan.blocks, this.blockBytes);
    await this.writePlan(runs, source, plan);
    await this.finishFailover(to, this.planRanges(runs, plan), plan);
    for (const layer of [...this.committed, this.P, this.S]) this.dropLayer(layer);
    this.committed.length = 0;
  }

  /** Open found 'failing-over': the journal is complete (the state record follows it), apply it again. */
  private async replayJournal(to: FailoverTarget): Promise<void> {
    const start = performance.now();
    const blocks: number[] = [];
    const holeRuns: Run[] = [];
    const zeroRuns: Run[] = [];
    const ranges: ByteRange[] = [];
    for await (const chunk of this.meta.readJournal(journalChunkBytes)) {
      const data = new Map<number, Uint8Array | null>();
      const chunkHoleRuns: Run[] = [];
      const chunkZeroRuns: Run[] = [];
      for (const e of chunk) {
        if ('holes' in e) {
          chunkHoleRuns.push(e.holes);
        } else if ('zeroes' in e) {
          chunkZeroRuns.push(e.zeroes);
        } else {
          data.set(e.block, e.data);
          blocks.push(e.block);
        }
      }
      const runs = planRuns([...data.keys()], this.blockBytes);
      const chunkPlan = { holeRuns: chunkHoleRuns, zeroRuns: chunkZeroRuns };
      await this.writePlan(runs, (b) => data.get(b)!, chunkPlan);
      ranges.push(...this.planRanges(runs, chunkPlan));
      holeRuns.push(...chunkHoleRuns);
      zeroRuns.push(...chunkZeroRuns);
    }
    await this.finishFailover(to, mergeRanges(ranges), { blocks, holeRuns, zeroRuns });
    this.emit('failover', { to, durationMs: performance.now() - start });
  }

  private async finishFailover(
    to: FailoverTarget,
    ranges: ByteRange[],
    journal: { blocks: Iterable<number>; holeRuns: Iterable<Run>; zeroRuns: Iterable<Run> },
  ): Promise<void> {
    await this.backing.datasync();
    const torn = subtractRanges(this.torn, ranges);
    await this.meta.recordFailedOver(to, journal, torn);
    this.torn = torn;
    this.state = 'failed-over';
    this.target = to;
  }

  // ---- close --------------------------------------------------------------------------------------

  /** Waits for committed data to reach the backing file, records the epoch, closes file and store. */
  close(): Promise<void> {
    this.closing ??= this.closeNow();
    return this.closing;
  }

  private async closeNow(): Promise<void> {
    if (this.failing !== null) await this.failing.catch(() => undefined);
    let unflushed: Error | null = null;
    if (this.state === 'replicating') {
      if (this.flushError !== null) this.retryFlush();
      this.kickFlusher();
      await this.flushIdle();
      if (this.committed.length > 0) {
        unflushed = new GannetError('EIO', `close: epochs up to ${this.committed.at(-1)!.sealedEpoch} could not be flushed`, {
          cause: this.flushError,
        });
      }
    }
    await this.lease.settle();
    try {
      await this.meta.putEpochCeiling(this.epoch);
    } catch (err) {
      unflushed ??= err as Error;
    }
    for (const layer of [...this.committed, this.P, this.S]) if (!layer.dropped) this.dropLayer(layer);
    this.committed.length = 0;
    this.state = 'closed';
    this.wake();
    await this.spiller.idle();
    await Promise.all(this.chores);
    await this.backing.close().catch((err: Error) => (unflushed ??= err));
    await this.meta.close().catch((err: Error) => (unflushed ??= err));
    if (unflushed !== null) throw unflushed;
  }

  // ---- views --------------------------------------------------------------------------------------

  private viewMode(role: ViewRole): ViewMode {
    if (this.state === 'failed-over') return role === 'primary' ? 'read-only' : 'plain';
    return 'buffered';
  }

  /** Waits out a failover in progress; throws when the volume is closed or its failover failed. */
  private async settled(): Promise<void> {
    if (this.state === 'failing-over' && this.failing !== null) await this.failing.catch(() => undefined);
    if (this.closing !== null || this.state === 'closed') throw new BlockDeviceError('ESHUTDOWN', 'the volume is closed');
    if (this.state === 'failing-over') {
      throw new BlockDeviceError('EIO', 'the volume failed to fail over; reopen it to finish', { cause: this.failoverError });
    }
  }

  private async viewReady(_role: ViewRole): Promise<void> {
    await this.settled();
  }

  private async viewRead(role: ViewRole, buf: Uint8Array, offset: number): Promise<void> {
    await this.settled();
    if (buf.length === 0) return;
    if (this.state === 'failed-over') return this.backing.read(buf, offset).catch(toEio);
    await this.readLayers(role, buf, offset, 0);
  }

  private async viewWrite(
    role: ViewRole,
    src: Uint8Array | null,
    offset: number,
    length: number,
    options: ViewWriteOptions,
  ): Promise<void> {
    for (let attempt = 0; attempt < 4; attempt++) {
      await this.settled();
      if (this.state === 'failed-over') {
        if (role === 'primary') throw new BlockDeviceError('EPERM', 'the primary view is read-only after failover');
        if (length === 0) return;
        try {
          if (src === null) await this.backing.clearRange(offset, length, options.noHole ? 'zero-range' : 'punch-hole');
          else await this.backing.write(src, offset);
          if (options.fua) await this.backing.datasync();
        } catch (err) {
          toEio(err);
        }
        return;
      }
      if (length === 0) return;
      if (await this.bufferedWrite(role, src, offset, length, options.noHole)) return;
    }
    throw new BlockDeviceError('EIO', 'write: the volume kept changing state');
  }

  private async viewFlush(role: ViewRole): Promise<void> {
    await this.settled();
    if (this.state === 'failed-over' && role === 'secondary') await this.backing.datasync().catch(toEio);
  }

  // ---- the buffered write path --------------------------------------------------------------------

  /** Returns false when the volume left the replicating state (the caller starts over). */
  private async bufferedWrite(
    role: ViewRole,
    src: Uint8Array | null,
    offset: number,
    length: number,
    noHole: boolean,
  ): Promise<boolean> {
    const bs = this.blockBytes;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + length - 1) / bs);
    const partial: number[] = [];
    if (!this.covers(first, offset, length)) partial.push(first);
    if (last !== first && !this.covers(last, offset, length)) partial.push(last);
    const blocks = last - first + 1;
    // Whole blocks of a zero cost one range however many there are; partial ones are data.
    const entries = src === null ? partial.length + zeroRangeEntriesMax : blocks;
    if (!this.buffers.indexRoom(entries)) {
      throw new BlockDeviceError('ENOMEM', `write of ${blocks} blocks exceeds the block index limit; checkpoint first`);
    }
    if (role === 'primary' && !(await this.committedRoom())) return false;
    const reserve = (src === null ? partial.length : blocks) * bs;
    if (!(await this.reserveMemory(reserve))) return false;
    try {
      for (let attempt = 0; attempt < writeAttemptsMax; attempt++) {
        if (this.state !== 'replicating') return false;
        const layer = role === 'primary' ? this.P : this.S;
        const seen = partial.map((b) => layer.entry(b));
        const fills = partial.map((b, i) => (needsFill(seen[i]) ? this.readBlockFrom(layer, b, seen[i]) : null));
        const filled = fills.some((f) => f !== null) ? await Promise.all(fills) : fills;
        if (this.state !== 'replicating') return false;
        if (layer !== (role === 'primary' ? this.P : this.S)) continue;
        const fillOf = new Map<number, Uint8Array | null>();
        let stale = false;
        partial.forEach((b, i) => {
          const now = layer.entry(b);
          if (now !== undefined && (isSlot(now) || now === ZERO)) fillOf.set(b, null);
          else if (now === seen[i] && filled[i] !== null) fillOf.set(b, filled[i] as Uint8Array);
          else stale = true;
        });
        if (stale) continue;
        this.applyWrite(layer, src, offset, length, noHole, fillOf);
        return true;
      }
      throw new BlockDeviceError('EIO', 'write: the buffer kept changing under a partial-block write');
    } finally {
      this.reservedBytes -= reserve;
      assert(this.reservedBytes >= 0, 'reserved bytes never negative');
      this.wake();
    }
  }

  /**
   * Synchronous: every block of one write lands in the same buffer, hence the same epoch. A zero's whole
   * blocks become one hole range (one zero range with `noHole`), so its work is bounded by the index, not
   * by its length.
   */
  private applyWrite(
    layer: Layer,
    src: Uint8Array | null,
    offset: number,
    length: number,
    noHole: boolean,
    fillOf: Map<number, Uint8Array | null>,
  ): void {
    const bs = this.blockBytes;
    const end = offset + length;
    if (src === null) {
      const first = Math.floor(offset / bs);
      const last = Math.floor((end - 1) / bs);
      const wholeFirst = this.covers(first, offset, length) ? first : first + 1;
      const wholeEnd = this.covers(last, offset, length) ? last + 1 : last;
      if (wholeFirst > first) this.writePart(layer, first, null, offset, length, fillOf);
      if (wholeFirst < wholeEnd) this.buffers.zeroRange(layer, wholeFirst, wholeEnd, noHole);
      if (last > first && wholeEnd === last) this.writePart(layer, last, null, offset, length, fillOf);
    } else {
      for (let b = Math.floor(offset / bs); b * bs < end; b++) this.writePart(layer, b, src, offset, length, fillOf);
    }
    this.checkPressure();
  }

  /** The part of a write at [offset, offset + length) that falls in block `b`. */
  private writePart(
    layer: Layer,
    b: number,
    src: Uint8Array | null,
    offset: number,
    length: number,
    fillOf: Map<number, Uint8Array | null>,
  ): void {
    const start = Math.max(offset, b * this.blockBytes);
    const n = Math.min(offset + length, (b + 1) * this.blockBytes) - start;
    assert(n > 0, `block ${b} overlaps the write`);
    this.buffers.writeBlock(layer, b, start - b * this.blockBytes, n, src, start - offset, fillOf.get(b) ?? null);
  }

  /** Whether [offset, offset + length) covers all of block `b` (up to the end of the volume). */
  private covers(b: number, offset: number, length: number): boolean {
    const start = b * this.blockBytes;
    return offset <= start && offset + length >= start + this.buffers.blockLength(b);
  }

  /**
   * The content of block `b` as `layer` sees it, when `layer` has no slot for it: its own spilled copy,
   * or the committed layers (newest first) over the backing file.
   */
  private async readBlockFrom(layer: Layer, b: number, entry: number | undefined): Promise<Uint8Array | null> {
    const dst = Buffer.alloc(this.blockBytes);
    if (entry !== undefined && isSpilled(entry)) {
      const data = await this.meta.getSpill(layer.id, b);
      if (data === undefined) return null;
      dst.set(data.subarray(0, this.blockBytes));
      return dst;
    }
    await this.readLayers(null, dst.subarray(0, this.buffers.blockLength(b)), b * this.blockBytes, 0);
    return dst;
  }

  // ---- reads --------------------------------------------------------------------------------------

  /**
   * Reads [offset, offset + buf.length) through the view of `role` (null: the checkpoint view, C over B).
   * Memory blocks are copied synchronously; runs of blocks no layer holds are read from the file in one
   * call straight into `buf`; spilled blocks come from LevelDB.
   */
  private async readLayers(role: ViewRole | null, buf: Uint8Array, offset: number, attempt: number): Promise<void> {
    assert(attempt < readAttemptsMax, 'a read does not keep racing with flushes');
    const bs = this.blockBytes;
    const top = role === null ? null : role === 'primary' ? this.P : this.S;
    const pending: Promise<void>[] = [];
    const end = offset + buf.length;
    let backingStart = -1;
    const flushBacking = (upTo: number) => {
      if (backingStart < 0) return;
      const at = backingStart;
      pending.push(this.backing.read(buf.subarray(at - offset, upTo - offset), at).catch(toEio));
      backingStart = -1;
    };
    for (let pos = offset; pos < end; ) {
      const b = Math.floor(pos / bs);
      const inBlock = pos - b * bs;
      const n = Math.min(bs - inBlock, end - pos);
      const at = pos - offset;
      const [layer, entry] = this.lookup(top, b);
      if (layer === null) {
        if (backingStart < 0) backingStart = pos;
      } else {
        flushBacking(pos);
        if (isSlot(entry)) {
          this.buffers.copyOut(entry, inBlock, n, buf, at);
          this.buffers.touch(entry);
        } else if (entry === ZERO) {
          buf.fill(0, at, at + n);
        } else {
          const dst = buf.subarray(at, at + n);
          // `pos` moves on before the fetch settles: the retry needs this block's offset.
          const blockPos = pos;
          pending.push(
            this.meta.getSpill(layer.id, b).then((data) => {
              if (data !== undefined) dst.set(data.subarray(inBlock, inBlock + n));
              else return this.readLayers(role, dst, blockPos, attempt + 1);
            }),
          );
        }
      }
      pos += n;
    }
    flushBacking(end);
    if (pending.length > 0) await settleAll(pending);
  }

  /** The topmost layer holding block `b` in the view topped by `top`, and its entry. */
  private lookup(top: Layer | null, b: number): [Layer, number] | [null, 0] {
    if (top !== null) {
      const e = top.entry(b);
      if (e !== undefined) return [top, e];
    }
    for (let i = this.committed.length - 1; i >= 0; i--) {
      const layer = this.committed[i];
      const e = layer.entry(b);
      if (e !== undefined) return [layer, e];
    }
    return [null, 0];
  }

  private async viewExtents(role: ViewRole, offset: number, length: number): Promise<Extent[]> {
    await this.settled();
    if (length === 0) return [];
    if (this.state === 'failed-over') return [{ length, flags: 0 }];
    const bs = this.blockBytes;
    const top = role === 'primary' ? this.P : this.S;
    const end = Math.min(offset + length, (Math.floor(offset / bs) + extentsBlocksMax) * bs);
    const extents: { length: number; flags: number }[] = [];
    for (let pos = offset; pos < end; ) {
      const b = Math.floor(pos / bs);
      const n = Math.min((b + 1) * bs, end) - pos;
      const [layer, entry] = this.lookup(top, b);
      const flags = layer !== null && entry === ZERO ? EXTENT_ZERO : 0;
      const last = extents[extents.length - 1];
      if (last !== undefined && last.flags === flags) last.length += n;
      else extents.push({ length: n, flags });
      pos += n;
    }
    return extents;
  }

  // ---- memory: reservation, spill, backpressure, pressure -----------------------------------------

  /**
   * Reserves memory for a write's new slots, spilling cold blocks at the hard limit. A write larger than
   * the whole budget proceeds once nothing else is in memory, so memory stays under memoryBytesMax plus
   * one request. Returns false when the volume left the replicating state.
   */
  private async reserveMemory(bytes: number): Promise<boolean> {
    const max = this.options.memoryBytesMax;
    for (;;) {
      if (this.state !== 'replicating') return false;
      const used = this.buffers.memBytes + this.reservedBytes;
      if (used + bytes <= max || used === 0) {
        this.reservedBytes += bytes;
        return true;
      }
      let freed: number;
      try {
        freed = await this.spiller.spill(used + bytes - max);
      } catch (err) {
        throw new BlockDeviceError('EIO', `spilling buffered blocks to the metadata store failed: ${(err as Error).message}`, {
          cause: err,
        });
      }
      // Nothing spillable (pinned by a flush, or reserved by other writes): wait for a release, unless
      // memory moved while the spill looked.
      if (freed > 0) this.wake();
      else if (freed < 0 && this.buffers.memBytes + this.reservedBytes >= used) await this.nextWake();
    }
  }

  private committedBytes(): number {
    let blocks = 0;
    for (const layer of this.committed) blocks += layer.memBlocks + layer.spilledBlocks;
    return blocks * this.blockBytes;
  }

  /** Backpressure: primary writes wait while committed data exceeds committedBytesMax. */
  private async committedRoom(): Promise<boolean> {
    while (this.committedBytes() > this.options.committedBytesMax) {
      if (this.state !== 'replicating') return false;
      if (this.flushError !== null) {
        throw new BlockDeviceError('EIO', 'committed data cannot reach the backing file', { cause: this.flushError });
      }
      await this.nextWake();
    }
    return true;
  }

  /**
   * 'pressure' asks the replicator for an early checkpoint, once per crossing of the threshold by the
   * buffered data (in memory or spilled). Only a checkpoint or flush (dropping buffers) re-arms it.
   */
  private checkPressure(): void {
    const threshold = this.options.memoryBytesMax * this.options.pressureRatio;
    const bufferedBytes = this.buffers.memBytes + this.buffers.spilledBytes;
    if (!this.overPressure && bufferedBytes > threshold) {
      this.overPressure = true;
      this.emit('pressure', { bufferedBytes, memoryBytesMax: this.options.memoryBytesMax });
    }
  }

  private rearmPressure(): void {
    const bufferedBytes = this.buffers.memBytes + this.buffers.spilledBytes;
    if (bufferedBytes <= this.options.memoryBytesMax * this.options.pressureRatio) this.overPressure = false;
  }

  private nextWake(): Promise<void> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /** Memory was released or the state changed: waiters re-check their condition. */
  private wake(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const resolve of waiters) resolve();
  }

  private dropLayer(layer: Layer): void {
    this.buffers.dropLayer(layer);
    // A spill batch in flight may still be writing this layer's keys: clear after it, not before.
    if (layer.hasSpillKeys) this.background(this.spiller.idle().then(() => this.meta.clearLayerSpill(layer.id)));
    this.rearmPressure();
  }

  /** Housekeeping nobody waits for, except close (the store must outlive it). */
  private background(work: Promise<void>): void {
    const tracked = work.catch((err: Error) => this.reportError(err)).finally(() => this.chores.delete(tracked));
    this.chores.add(tracked);
  }

  private geometry(): { blockBytes: number; sizeBytes: number } {
    return { blockBytes: this.blockBytes, sizeBytes: this.sizeBytes };
  }

  private *liveLayers(): Iterable<Layer> {
    yield this.P;
    yield this.S;
    yield* this.committed;
  }

  /** 'error' is emitted only with a listener: an unheard I/O error surfaces at the next checkpoint. */
  private reportError(err: Error): void {
    if (this.listenerCount('error') > 0) this.emit('error', err);
  }
}

function needsFill(entry: number | undefined): boolean {
  return entry === undefined || isSpilled(entry);
}

function checkIdentity(persisted: PersistedMeta, options: ResolvedVolumeOptions): void {
  const id = persisted.identity!;
  if (id.sizeBytes !== options.sizeBytes || id.blockBytes !== options.blockBytes) {
    throw new GannetError(
      'EMISMATCH',
      `dataDir ${options.dataDir} holds a volume of sizeBytes ${id.sizeBytes} blockBytes ${id.blockBytes}, ` +
        `options say sizeBytes ${options.sizeBytes} blockBytes ${options.blockBytes}`,
    );
  }
}

/** File errors on a view become EIO, the errno NBD clients expect. */
function toEio(err: unknown): never {
  if (err instanceof BlockDeviceError) throw err;
  throw new BlockDeviceError('EIO', `backing file: ${(err as Error).message}`, { cause: err });
}

/** Internal seams for tests (fault injection), not API: may change without notice. */
export const _internal = {
  backingOf(volume: ReplicatedVolume): Backing {
    return (volume as unknown as { backing: Backing }).backing;
  },
  /** Lowers the block index limit, so a test reaches it without millions of entries. */
  limitIndex(volume: ReplicatedVolume, entries: number): void {
    (volume as unknown as { buffers: { indexEntriesMax: number } }).buffers.indexEntriesMax = entries;
  },
  /** Where the primary buffer keeps block `b`: in a memory slot, spilled to LevelDB, or not at all. */
  primaryHolds(volume: ReplicatedVolume, b: number): 'memory' | 'spilled' | 'none' {
    const entry = (volume as unknown as { P: Layer }).P.map.get(b);
    return entry === undefined ? 'none' : isSlot(entry) ? 'memory' : isSpilled(entry) ? 'spilled' : 'none';
  },
};
