import type { EventEmitter } from 'node:events';
import type { BlockDevice } from '@gannet/block-device';
import { BlockBuffers, type Layer } from './buffer.js';
import { EpochLease, Epochs } from './epochs.js';
import type { MetaStore } from './meta.js';
import type { ResolvedVolumeOptions } from './options.js';
import type { Geometry } from './plan.js';
import { Spiller } from './spill.js';
import { join } from 'node:path';
import type { ByteRange, FailoverTarget, VolumeEvents, VolumeState } from './types.js';

/** How often idle slabs beyond the quiet reserve are handed back (see SlabPool.trim). */
export const slabTrimIntervalMs = 1000;

/** Where a volume keeps its spill files (scratch: emptied at every open). */
export function spillDir(dataDir: string): string {
  return join(dataDir, 'spill');
}

/** What a volume's parts share: its files, buffers, epochs and state, and the signals between them. */
export interface EngineInit {
  readonly options: ResolvedVolumeOptions;
  readonly meta: MetaStore;
  readonly backing: BlockDevice;
  readonly state: VolumeState;
  readonly target: FailoverTarget | undefined;
  readonly epoch: number;
  readonly durableEpoch: number;
  readonly epochCeiling: number;
  readonly torn: ByteRange[];
}

/**
 * The state of one GANNET volume that its parts (the buffered I/O, the flusher, the failover) share, and
 * the ways they signal each other: `wake` when memory is released or the state changes (writes waiting
 * for room re-check), `emit` for the volume's events, `background` for housekeeping only close waits for.
 */
export class Engine {
  readonly options: ResolvedVolumeOptions;
  readonly geometry: Geometry;
  readonly meta: MetaStore;
  readonly backing: BlockDevice;
  readonly buffers: BlockBuffers;
  readonly spiller: Spiller;
  readonly epochs: Epochs;
  state: VolumeState;
  target: FailoverTarget | undefined;
  /** Ranges an interrupted flush may have left half-written (they need a resync from the primary). */
  torn: ByteRange[];
  /** Set once close() has begun. */
  closing = false;
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
    this.meta = init.meta;
    this.backing = init.backing;
    this.state = init.state;
    this.target = init.target;
    this.torn = init.torn;
    this.buffers = new BlockBuffers({
      blockBytes: init.options.blockBytes,
      sizeBytes: init.options.sizeBytes,
      memoryBytesMax: init.options.memoryBytesMax,
      indexEntriesMax: init.options.indexEntriesMax,
    });
    const lease = new EpochLease(init.epochCeiling, (ceiling) => this.meta.putEpochCeiling(ceiling));
    this.epochs = new Epochs(this.buffers, lease, init.epoch, init.durableEpoch, (layer) => this.dropLayer(layer));
    this.spiller = new Spiller(this.buffers, spillDir(init.options.dataDir), () => this.epochs.live());
    this.trimTimer = setInterval(() => this.buffers.trimIdle(), slabTrimIntervalMs);
    this.trimTimer.unref();
  }

  emit<K extends keyof VolumeEvents>(event: K, ...args: VolumeEvents[K]): void {
    (this.events.emit as (event: K, ...args: VolumeEvents[K]) => boolean)(event, ...args);
  }

  /** 'error' is emitted only with a listener: an unheard I/O error surfaces at the next checkpoint. */
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
