import type { EventEmitter } from 'node:events';
import { join } from 'node:path';
import { blockErrorCode, type BlockDevice } from '@gannet/block-device';
import { InvariantError } from './assert.js';
import { BlockBuffers, type Layer } from './buffer.js';
import { EpochLease, Epochs } from './epochs.js';
import type { Generation } from './generation.js';
import type { Inconsistent, LostFailover, MetaStore } from './meta.js';
import type { ResolvedVolumeOptions } from './options.js';
import type { Geometry } from './plan.js';
import { Spiller } from './spill.js';
import type { VolumeStateFile, VolumeStateRecord } from './state-file.js';
import type { Storage } from './storage.js';
import type { ByteRange, FailoverStatus, FailoverTarget, SplitBrain, VolumeError, VolumeEvents, VolumeState } from './types.js';

/** Which part set an error (and may clear it). */
export type ErrorSource = 'flush' | 'failover' | 'halt';

/** How often idle slabs beyond the quiet reserve are handed back (see SlabPool.trim). */
export const slabTrimIntervalMs = 1000;

/** Where a volume keeps its spill files (scratch: emptied at every open). */
export function spillDir(dataDir: string): string {
  return join(dataDir, 'spill');
}

/** What a volume's parts share: its files, buffers, epochs and state, and the signals between them. */
export interface EngineInit {
  readonly options: ResolvedVolumeOptions;
  readonly storage: Storage;
  readonly meta: MetaStore;
  readonly stateFile: VolumeStateFile;
  readonly record: VolumeStateRecord;
  readonly backing: BlockDevice;
  readonly state: VolumeState;
  readonly target: FailoverTarget | undefined;
  readonly epoch: number;
  readonly durableEpoch: number;
  readonly epochCeiling: number;
  readonly torn: ByteRange[];
  readonly lostFailover: LostFailover | null;
  readonly inconsistent: Inconsistent | null;
  readonly generation: Generation | null;
  readonly splitBrain: SplitBrain | null;
}

/**
 * The state of one GANNET volume that its parts (the buffered I/O, the flusher, the failover) share, and
 * the ways they signal each other: `wake` when memory is released or the state changes (writes waiting
 * for room re-check), `emit` for the volume's events, `background` for housekeeping only close waits for.
 */
export class Engine {
  readonly options: ResolvedVolumeOptions;
  readonly geometry: Geometry;
  readonly storage: Storage;
  readonly meta: MetaStore;
  readonly stateFile: VolumeStateFile;
  readonly backing: BlockDevice;
  readonly buffers: BlockBuffers;
  readonly spiller: Spiller;
  readonly epochs: Epochs;
  /** The state file's content as last written. */
  record: VolumeStateRecord;
  state: VolumeState;
  target: FailoverTarget | undefined;
  /** Ranges an interrupted flush may have left half-written (they need a resync from the primary). */
  torn: ByteRange[];
  failover: (FailoverStatus & { readonly epoch: number }) | null = null;
  /** A failover the last run requested but never made durable (until the next one is). */
  lostFailover: LostFailover | null;
  /** A resync from the primary has the disk half-way: failover is refused unless forced. */
  inconsistent: Inconsistent | null;
  /** The volume's lineage (generation.ts); null: none yet (fresh), its first sync is a full one. */
  generation: Generation | null;
  /** The last primary that attached had written since they split: both histories, and since when. */
  splitBrain: SplitBrain | null;
  /** Set once close() has begun. */
  closing = false;
  /** Called after every flush pass (the failover retires its journal once the kept state is applied). */
  onPassDone: (() => void) | null = null;
  private errorValue: (VolumeError & { readonly source: ErrorSource }) | null = null;
  private overPressure = false;
  private readonly trimTimer: NodeJS.Timeout;
  private waiters: (() => void)[] = [];
  private readonly chores = new Set<Promise<void>>();

  constructor(
    init: EngineInit,
    private readonly events: EventEmitter<VolumeEvents>,
  ) {
    this.options = init.options;
    this.geometry = { blockBytes: init.options.blockBytes, sizeBytes: init.options.sizeBytes };
    this.storage = init.storage;
    this.meta = init.meta;
    this.stateFile = init.stateFile;
    this.record = init.record;
    this.backing = init.backing;
    this.state = init.state;
    this.target = init.target;
    this.torn = init.torn;
    this.lostFailover = init.lostFailover;
    this.inconsistent = init.inconsistent;
    this.generation = init.generation;
    this.splitBrain = init.splitBrain;
    this.buffers = new BlockBuffers({
      blockBytes: init.options.blockBytes,
      sizeBytes: init.options.sizeBytes,
      memoryBytesMax: init.options.memoryBytesMax,
      indexEntriesMax: init.options.indexEntriesMax,
    });
    const lease = new EpochLease(init.epochCeiling, (ceiling) => this.persistCeiling(ceiling));
    this.epochs = new Epochs(this.buffers, lease, init.epoch, init.durableEpoch, (layer) => this.dropLayer(layer));
    this.spiller = new Spiller(this.buffers, spillDir(init.options.dataDir), () => this.epochs.live());
    this.trimTimer = setInterval(() => this.buffers.trimIdle(), slabTrimIntervalMs);
    this.trimTimer.unref();
  }

  get uuid(): string {
    return this.record.uuid;
  }

  get error(): VolumeError | null {
    return this.errorValue;
  }

  /** Whether the volume takes writes into its buffers: replicating, or failed over (into W). */
  get buffering(): boolean {
    return this.state === 'replicating' || this.state === 'failed-over';
  }

  /** Whether the flusher may move committed layers to the backing file now (not before a failover's journal commits). */
  get flushAllowed(): boolean {
    if (this.state === 'replicating') return true;
    return this.state === 'failed-over' && this.failover !== null && this.failover.phase !== 'journaling';
  }

  /**
   * Something holds the volume back (a full disk under the flusher, a failover that cannot become
   * durable): shown in status until the same part clears it. Reported through the 'error' event.
   */
  setError(source: ErrorSource, err: unknown, context: string): void {
    const code = blockErrorCode(err);
    const message = `${context}: ${(err as Error)?.message ?? String(err)}`;
    if (this.state !== 'halted' && (this.errorValue?.code !== code || this.errorValue.message !== message)) {
      this.errorValue = { code, message, since: new Date().toISOString(), source };
    }
    this.reportError(err instanceof Error ? err : new Error(message));
  }

  clearError(source: ErrorSource): void {
    if (this.errorValue?.source === source) this.errorValue = null;
  }

  /**
   * An invariant broke: the buffers may no longer describe the disk, so nothing more is written, to the
   * backing file or the store, and every request fails, until an operator reopens the volume.
   */
  halt(err: InvariantError): void {
    if (this.state === 'halted' || this.state === 'closed') return;
    this.state = 'halted';
    this.errorValue = { code: 'EHALTED', message: err.message, since: new Date().toISOString(), source: 'halt' };
    this.reportError(err);
    this.wake();
  }

  emit<K extends keyof VolumeEvents>(event: K, ...args: VolumeEvents[K]): void {
    (this.events.emit as (event: K, ...args: VolumeEvents[K]) => boolean)(event, ...args);
  }

  /** 'error' is emitted only with a listener: an unheard error still shows in status. */
  reportError(err: Error): void {
    if (this.events.listenerCount('error') > 0) this.emit('error', err);
  }

  nextWake(): Promise<void> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /** Memory was released or the state changed: waiters re-check their condition. */
  wake(): void {
    if (this.waiters.length === 0) return;
    const waiters = this.waiters;
    this.waiters = [];
    for (const resolve of waiters) resolve();
  }

  /** Replaces the state file with `record` merged in. */
  async writeRecord(change: Partial<VolumeStateRecord>): Promise<void> {
    const record = { ...this.record, ...change };
    await this.stateFile.write(record);
    this.record = record;
  }

  /** The lease goes to the state file first: a recovery that lost the metadata starts above it. */
  private async persistCeiling(ceiling: number): Promise<void> {
    await this.writeRecord({ epochCeiling: ceiling });
    await this.meta.putEpochCeiling(ceiling);
  }

  private dropLayer(layer: Layer): void {
    const spilled = layer.hasSpillKeys;
    this.buffers.dropLayer(layer);
    if (spilled) this.background(this.spiller.forget(layer));
    this.rearmPressure();
  }

  /** Housekeeping nobody waits for, except close (the store must outlive it). */
  background(work: Promise<void>): void {
    const tracked = work.catch((err: Error) => this.reportError(err)).finally(() => this.chores.delete(tracked));
    this.chores.add(tracked);
  }

  async choresDone(): Promise<void> {
    clearInterval(this.trimTimer);
    await this.spiller.idle();
    await Promise.all(this.chores);
  }

  /**
   * 'pressure' asks the replicator for an early checkpoint, once per crossing of the threshold by the
   * buffered data (in memory or spilled). Only a checkpoint or flush (dropping buffers) re-arms it.
   */
  checkPressure(): void {
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
}
