import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { performance } from 'node:perf_hooks';
import { assert, InvariantError } from './assert.js';
import { isSlot, isSpilled } from './buffer.js';
import { Engine, spillDir } from './engine.js';
import { groupCheckpoint, type GroupCheckpointable } from './epochs.js';
import { deviceDigests } from './digest.js';
import { GannetError, SplitBrainError } from './errors.js';
import { Failover } from './failover.js';
import { Flusher } from './flusher.js';
import { compareGenerations, copyGeneration, sameGeneration, type Generation, type GenerationRelation } from './generation.js';
import { BufferedIo } from './io.js';
import { openFiles, recoverFiles, type Recovered } from './lifecycle.js';
import { parseVolumeOptions } from './parse.js';
import type { ResolvedVolumeOptions, VolumeOptions } from './options.js';
import { Spiller } from './spill.js';
import { fileStorage, type Storage } from './storage.js';
import type { FailoverOptions, Volume, VolumeEvents, VolumeStats } from './types.js';
import { VolumeHost } from './volume-host.js';
import { VolumeView, type ViewRole } from './view.js';

export { metaDirName } from './lifecycle.js';

/** What open() takes besides the options: where the durable state lives (tests decorate it). */
export interface OpenContext {
  readonly storage?: Storage;
}

/**
 * GANNET's storage side: one volume, two views over one backing file (see epochs.ts for the layering).
 * This class ties the parts together and holds what is about the volume as a whole: opening it,
 * checkpoint, failover, close. The parts: BufferedIo (io.ts) reads and writes the buffers, Flusher
 * (flusher.ts) moves committed epochs to the backing file, Failover (failover.ts) ends replication,
 * Epochs (epochs.ts) holds the layers, VolumeHost (volume-host.ts) serves the views, lifecycle.ts opens
 * and recovers the files.
 */
export class ReplicatedVolume extends EventEmitter<VolumeEvents> implements Volume, GroupCheckpointable {
  readonly primary: VolumeView;
  readonly secondary: VolumeView;
  readonly sizeBytes: number;
  readonly options: ResolvedVolumeOptions;
  /** Changes at every open: a primary knows by it that the volume lost what it buffered. */
  readonly instance = randomUUID();

  private readonly engine: Engine;
  private readonly flusher: Flusher;
  private readonly failoverPart: Failover;
  private readonly host: VolumeHost;
  private closing: Promise<void> | null = null;

  readonly [groupCheckpoint] = {
    prepare: (): Promise<void> => this.engine.epochs.lease.ensure(this.engine.epochs.epoch + 1),
    check: (): void => this.checkCanCheckpoint(),
    seal: (): number => this.seal(performance.now()),
  };

  private constructor(engineOf: (events: EventEmitter<VolumeEvents>) => Engine) {
    super();
    this.engine = engineOf(this);
    this.options = this.engine.options;
    this.sizeBytes = this.options.sizeBytes;
    this.flusher = new Flusher(this.engine);
    const io = new BufferedIo(this.engine, this.flusher);
    this.failoverPart = new Failover(this.engine, this.flusher);
    this.host = new VolumeHost(this.engine, io, this.flusher, this.failoverPart);
    this.primary = new VolumeView('primary', this.sizeBytes, this.options.blockBytes, this.host);
    this.secondary = new VolumeView('secondary', this.sizeBytes, this.options.blockBytes, this.host);
  }

  /**
   * Creates the volume (backing file created sparse, metadata store and state file in dataDir) or reopens
   * it. A reopened volume is at its last durable checkpoint (stats().durableEpoch), with the ranges an
   * interrupted flush may have torn in stats().tornRanges, or failed over (a committed failover's journal
   * is served at once and applied in the background); its epoch is above every epoch it reported before.
   */
  static async open(input: VolumeOptions, context: OpenContext = {}): Promise<ReplicatedVolume> {
    const options = gannetOptions(input);
    const storage = context.storage ?? fileStorage;
    const opened = await openFiles(options, storage);
    await Spiller.clear(spillDir(options.dataDir));
    const { record } = opened;
    const volume = new ReplicatedVolume(
      (events) =>
        new Engine(
          {
            options,
            storage,
            meta: opened.meta,
            stateFile: opened.stateFile,
            record,
            backing: opened.backing,
            state: record.lifecycle,
            target: record.target ?? undefined,
            epoch: opened.epoch,
            durableEpoch: opened.durableEpoch,
            epochCeiling: opened.epochCeiling,
            torn: opened.torn,
            lostFailover: opened.lostFailover,
            inconsistent: opened.inconsistent,
            generation: opened.generation,
            splitBrain: opened.splitBrain,
          },
          events,
        ),
    );
    if (record.lifecycle === 'failed-over') {
      try {
        await volume.failoverPart.reopen(record.target!);
      } catch (err) {
        await volume.close().catch(() => undefined);
        throw err;
      }
    }
    return volume;
  }

  /**
   * Rebuilds the metadata store of a volume whose store is missing or damaged, from its state file (the
   * old store is moved aside). See lifecycle.ts: a failed-over volume is its disk; a replicating one
   * needs a full resync. The volume is then opened as usual.
   */
  static async recover(input: VolumeOptions, context: OpenContext = {}): Promise<Recovered> {
    return recoverFiles(gannetOptions(input), context.storage ?? fileStorage);
  }

  /** The volume's uuid, for good (its state file and metadata agree on it). */
  get volumeId(): string {
    return this.engine.uuid;
  }

  /**
   * Marks the disk inconsistent, durably, while a primary resyncs it (failover is then refused unless
   * forced), or consistent again once the resync's last checkpoint is durable. Only while replicating.
   */
  async setInconsistent(inconsistent: boolean, generation?: Generation): Promise<void> {
    const { engine } = this;
    if (engine.state !== 'replicating' || this.closing !== null) throw new GannetError('ESTATE', `setInconsistent: the volume is ${this.closing !== null ? 'closed' : engine.state}`);
    if (inconsistent && generation !== undefined) throw new GannetError('EOPTIONS', 'generation: only adopted when the mark is cleared (the resync is durable)');
    const adopt = generation !== undefined && !sameGeneration(generation, engine.generation) ? generation : undefined;
    if (inconsistent === (engine.inconsistent !== null) && adopt === undefined) return;
    const mark = inconsistent ? (engine.inconsistent ?? { since: new Date().toISOString() }) : null;
    await engine.meta.putInconsistent(mark, adopt);
    engine.inconsistent = mark;
    if (adopt !== undefined) engine.generation = copyGeneration(adopt);
  }

  /**
   * A primary attaches with its generation: how this volume stands to it (generation.ts). A split brain
   * (both wrote since they split, or unrelated lineages) is recorded in stats().splitBrain, emitted, and
   * refused with SplitBrainError (ESPLITBRAIN): nothing of that primary may reach this disk. Any other
   * answer clears an earlier split brain (an operator discarded one side). The record is stored (one
   * synced batch when it changes), so a restarted volume still shows it.
   */
  async acceptPrimary(generation: Generation | null): Promise<GenerationRelation> {
    const { engine } = this;
    if (this.closing !== null || engine.state === 'closed') throw new GannetError('ESTATE', 'attach: the volume is closed');
    const relation = compareGenerations(engine.generation, generation);
    if (relation !== 'split-brain') {
      if (engine.splitBrain !== null) {
        await engine.meta.putSplitBrain(null);
        engine.splitBrain = null;
      }
      return relation;
    }
    const local = copyGeneration(engine.generation!);
    const peer = copyGeneration(generation!);
    if (engine.splitBrain === null || !sameGeneration(engine.splitBrain.peer, peer) || !sameGeneration(engine.splitBrain.local, local)) {
      const record = { local, peer, since: engine.splitBrain?.since ?? new Date().toISOString() };
      await engine.meta.putSplitBrain(record);
      engine.splitBrain = record;
      engine.emit('split-brain', { local, peer });
    }
    throw new SplitBrainError(
      `split brain: this volume (generation ${local.current}) and the primary (generation ${peer.current}) both wrote since they split; ` +
        'discard the changes of one side to resync it from the other',
      local,
      peer,
    );
  }

  /** Digests of the primary view (P over C over B), for a primary's full sync: see PeerSession.digests. */
  digests(offset: number, length: number): Promise<Uint8Array> {
    if (this.closing !== null || this.engine.state === 'closed') return Promise.reject(new GannetError('ESTATE', 'digests: the volume is closed'));
    return deviceDigests(this.primary, offset, length);
  }

  stats(): VolumeStats {
    const { engine } = this;
    const { epochs, buffers } = engine;
    const bs = this.options.blockBytes;
    let committed = 0;
    for (const layer of epochs.committed) committed += layer.memBlocks * bs;
    const failover = engine.failover;
    return {
      strategy: 'gannet',
      state: engine.state,
      volumeId: engine.uuid,
      sizeBytes: this.sizeBytes,
      epoch: epochs.epoch,
      durableEpoch: epochs.durableEpoch,
      ...(engine.target !== undefined ? { failoverTarget: engine.target } : {}),
      bufferedBytes: {
        primary: epochs.W === null ? epochs.P.memBlocks * bs : 0,
        secondary: (epochs.W ?? epochs.S).memBlocks * bs,
        committed,
      },
      spilledBytes: buffers.spilledBytes,
      tornRanges: engine.torn.map((r) => ({ offset: r.offset, length: r.length })),
      ...(engine.error !== null ? { error: { code: engine.error.code, message: engine.error.message, since: engine.error.since } } : {}),
      ...(failover !== null
        ? {
            failover: {
              target: failover.target,
              requestedAt: failover.requestedAt,
              phase: failover.phase,
              ...(failover.foregroundMs !== undefined ? { foregroundMs: failover.foregroundMs } : {}),
              ...(failover.durableMs !== undefined ? { durableMs: failover.durableMs } : {}),
            },
          }
        : {}),
      ...(engine.lostFailover !== null ? { lostFailover: { ...engine.lostFailover } } : {}),
      ...(engine.inconsistent !== null ? { inconsistent: { ...engine.inconsistent } } : {}),
      generation: engine.generation === null ? null : copyGeneration(engine.generation),
      ...(engine.splitBrain !== null ? { splitBrain: { local: copyGeneration(engine.splitBrain.local), peer: copyGeneration(engine.splitBrain.peer), since: engine.splitBrain.since } } : {}),
    };
  }

  /** Where the open epoch's buffer of `role` keeps the block at `offset`: a memory slot, spilled, or not at all. */
  residence(role: ViewRole, offset: number): 'memory' | 'spilled' | 'none' {
    const entry = this.engine.epochs.top(role).dataEntry(Math.floor(offset / this.options.blockBytes));
    return entry === undefined ? 'none' : isSlot(entry) ? 'memory' : isSpilled(entry) ? 'spilled' : 'none';
  }

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
    const { lease, epoch } = this.engine.epochs;
    if (!lease.covers(epoch + 1)) return lease.ensure(epoch + 1).then(() => this.checkpoint());
    return Promise.resolve(this.seal(start));
  }

  private checkCanCheckpoint(): void {
    const { state, error } = this.engine;
    if (this.closing !== null || state === 'closed') throw new GannetError('ESTATE', 'checkpoint: the volume is closed');
    if (state === 'halted') throw new GannetError('EHALTED', `checkpoint: the volume is halted: ${error?.message}`);
    if (state !== 'replicating') throw new GannetError('ESTATE', `checkpoint: the volume is ${state}, checkpoints end at failover`);
    const failure = this.flusher.failure;
    if (failure !== null) {
      this.flusher.retry();
      const code = (failure as { code?: string }).code === 'ENOSPC' ? 'ENOSPC' : 'EIO';
      throw new GannetError(code, `checkpoint refused: flushing committed data to the backing file failed: ${failure.message}`, { cause: failure });
    }
  }

  private seal(start: number): number {
    assert(this.engine.state === 'replicating', 'seal while replicating');
    let epoch: number;
    try {
      epoch = this.engine.epochs.seal();
    } catch (err) {
      if (err instanceof InvariantError) this.engine.halt(err);
      throw err;
    }
    this.flusher.kick();
    this.engine.wake();
    this.emit('checkpoint', { epoch, pauseMs: performance.now() - start });
    return epoch;
  }

  /**
   * Ends replication with one side's state (see failover.ts): returns once both views serve it, which
   * takes no longer with GiBs buffered; the kept state becomes durable and reaches the backing file in
   * the background (stats().failover, the 'failover-durable' and 'failover-applied' events). Calling it
   * again with the same target answers the same, and retries a background step that failed.
   */
  async failover(options: FailoverOptions = {}): Promise<void> {
    if (this.closing !== null) throw new GannetError('ESTATE', 'failover: the volume is closed');
    if (this.engine.state === 'halted') throw new GannetError('EHALTED', `failover: the volume is halted: ${this.engine.error?.message}`);
    await this.failoverPart.start(options);
  }

  /**
   * Waits for committed data (and after failover, the kept state and every write) to reach the backing
   * file, records the epoch, closes file and store. A halted volume writes nothing more.
   */
  close(): Promise<void> {
    this.closing ??= this.closeNow();
    return this.closing;
  }

  private async closeNow(): Promise<void> {
    const { engine } = this;
    engine.closing = true;
    let unflushed: Error | null = null;
    const halted = engine.state === 'halted';
    if (!halted) {
      await this.failoverPart.idle();
      if (engine.state === 'replicating') {
        this.flusher.retry();
        this.flusher.kick();
        await this.flusher.idle();
        if (engine.epochs.committed.length > 0) {
          unflushed = new GannetError('EIO', `close: epochs up to ${engine.epochs.committed.at(-1)!.sealedEpoch} could not be flushed`, {
            cause: this.flusher.failure,
          });
        }
      } else if (engine.state === 'failed-over') {
        await this.host.drain().catch((err: Error) => (unflushed ??= err));
        await this.failoverPart.idle();
      }
      await engine.epochs.lease.settle().catch((err: Error) => (unflushed ??= err));
      await engine.meta.putEpochCeiling(engine.epochs.epoch).catch((err: Error) => (unflushed ??= err));
    }
    engine.epochs.dropAll();
    engine.state = 'closed';
    engine.wake();
    await engine.choresDone();
    await engine.backing.close().catch((err: Error) => (unflushed ??= err));
    await engine.meta.close().catch((err: Error) => (unflushed ??= err));
    if (unflushed !== null) throw unflushed;
  }
}

function gannetOptions(input: VolumeOptions): ResolvedVolumeOptions {
  const options = parseVolumeOptions(input);
  if (options.strategy !== 'gannet') {
    throw new GannetError('EOPTIONS', `strategy: ReplicatedVolume is the gannet strategy, not ${options.strategy}`);
  }
  return options;
}
