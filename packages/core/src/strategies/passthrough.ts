import { EventEmitter } from 'node:events';
import { BlockDeviceError, type FileDevice } from '@gannet/block-device';
import { GannetError } from '../errors.js';
import type { VolumeOptions } from '../options.js';
import { parseVolumeOptions } from '../parse.js';
import type { FailoverTarget, Volume, VolumeEvents, VolumeState, VolumeStats } from '../types.js';
import { RangeLock } from './range-lock.js';
import { readStrategyMeta, writeStrategyMeta, type StrategyMeta } from './strategy-meta.js';
import { diskView, openBackingFile } from './disk.js';
import type { VolumeView } from '../view.js';

/**
 * The native baseline: both views are the backing file itself (FileDevice semantics, flush =
 * fdatasync). Nothing is buffered, so a checkpoint only numbers a new epoch and a failover only changes
 * state (after it, the primary view refuses writes with EPERM as in every strategy). It is what a VM
 * without replication gets, and the benchmark's "native" column.
 *
 * The lock here only orders whole-volume steps (failover, close) after the requests already in flight:
 * every request takes it shared, so requests never wait on each other.
 */
class PassthroughVolume extends EventEmitter<VolumeEvents> implements Volume {
  readonly sizeBytes: number;
  readonly primary: VolumeView;
  readonly secondary: VolumeView;
  private readonly backing: FileDevice;
  private readonly lock = new RangeLock();
  private readonly dataDir: string;
  private state: VolumeState;
  private epoch: number;
  private failoverTarget: FailoverTarget | undefined;

  constructor(backing: FileDevice, blockBytes: number, dataDir: string, meta: StrategyMeta) {
    super();
    this.dataDir = dataDir;
    this.epoch = meta.epoch;
    this.failoverTarget = meta.failoverTarget;
    this.state = meta.failoverTarget === undefined ? 'replicating' : 'failed-over';
    this.backing = backing;
    this.sizeBytes = backing.size;
    const write = (data: Uint8Array | null, offset: number, length: number) =>
      data === null ? this.backing.writeZeroes(offset, length) : this.backing.write(data, offset);
    const failedOver = () => this.state === 'failed-over';
    const never = () => false;
    this.primary = diskView('primary', this.sizeBytes, blockBytes, {
      read: (buf, offset) => this.shared(() => this.backing.read(buf, offset)),
      write: (data, offset, length, fua) => this.primaryWrite(() => write(data, offset, length), fua),
      flush: () => this.shared(() => this.backing.flush()),
    }, failedOver);
    this.secondary = diskView('secondary', this.sizeBytes, blockBytes, {
      read: (buf, offset) => this.shared(() => this.backing.read(buf, offset)),
      write: (data, offset, length, fua) => this.shared(() => this.writeThrough(() => write(data, offset, length), fua)),
      flush: () => this.shared(() => this.backing.flush()),
    }, never);
  }

  private async shared<T>(work: () => Promise<T>): Promise<T> {
    const release = await this.lock.acquire(0, Infinity, false);
    try {
      if (this.state === 'closed') throw new BlockDeviceError('ESHUTDOWN', 'passthrough: volume closed');
      return await work();
    } finally {
      release();
    }
  }

  private async writeThrough(work: () => Promise<void>, fua: boolean): Promise<void> {
    await work();
    if (fua) await this.backing.flush();
  }

  private primaryWrite(work: () => Promise<void>, fua: boolean): Promise<void> {
    if (this.state !== 'replicating') {
      return Promise.reject(new BlockDeviceError('EPERM', `passthrough: the primary view is read-only once ${this.state}`));
    }
    return this.shared(async () => {
      if (this.state === 'failed-over') throw new BlockDeviceError('EPERM', 'passthrough: the primary view is read-only after failover');
      await this.writeThrough(work, fua);
    });
  }

  /** The state as of now: it may change while a request waits for the lock. */
  private stateNow(): VolumeState {
    return this.state;
  }

  async checkpoint(): Promise<number> {
    if (this.state !== 'replicating') throw new GannetError('ESTATE', `passthrough: cannot checkpoint a volume that is ${this.state}`);
    this.epoch++;
    this.emit('checkpoint', { epoch: this.epoch, pauseMs: 0 });
    return this.epoch;
  }

  async failover(options?: { to?: FailoverTarget }): Promise<void> {
    const to = options?.to ?? 'secondary';
    if (this.state !== 'replicating') throw new GannetError('ESTATE', `passthrough: cannot fail over a volume that is ${this.state}`);
    const started = performance.now();
    this.state = 'failing-over';
    const release = await this.lock.acquire(0, Infinity, true);
    try {
      await this.backing.flush();
      await writeStrategyMeta(this.dataDir, { strategy: 'passthrough', epoch: this.epoch, failoverTarget: to });
      this.state = 'failed-over';
      this.failoverTarget = to;
    } catch (error) {
      this.state = 'replicating';
      throw error;
    } finally {
      release();
    }
    this.emit('failover', { to, durationMs: performance.now() - started });
  }

  stats(): VolumeStats {
    return {
      strategy: 'passthrough',
      state: this.state,
      sizeBytes: this.sizeBytes,
      epoch: this.epoch,
      // Every write is in the backing file already: there is no commit pipeline to lag behind.
      durableEpoch: this.epoch,
      ...(this.failoverTarget !== undefined && { failoverTarget: this.failoverTarget }),
      bufferedBytes: { primary: 0, secondary: 0, committed: 0 },
      spilledBytes: 0,
      tornRanges: [],
    };
  }

  async close(): Promise<void> {
    if (this.state === 'closed') return;
    const release = await this.lock.acquire(0, Infinity, true);
    try {
      if (this.stateNow() === 'closed') return;
      this.state = 'closed';
      try {
        await writeStrategyMeta(this.dataDir, {
          strategy: 'passthrough',
          epoch: this.epoch,
          ...(this.failoverTarget !== undefined && { failoverTarget: this.failoverTarget }),
        });
      } finally {
        await this.backing.close();
      }
    } finally {
      release();
    }
  }
}

/** Opens the passthrough ("native") baseline on `options.path`; `dataDir` holds only strategy.json. */
export async function openPassthroughVolume(options: VolumeOptions): Promise<Volume> {
  const resolved = parseVolumeOptions({ ...options, strategy: options.strategy ?? 'passthrough' });
  if (resolved.strategy !== 'passthrough') throw new GannetError('EOPTIONS', `openPassthroughVolume: strategy is ${resolved.strategy}`);
  const meta = await readStrategyMeta(resolved.dataDir, 'passthrough');
  const backing = await openBackingFile(resolved.path, resolved.sizeBytes);
  return new PassthroughVolume(backing, resolved.blockBytes, resolved.dataDir, meta);
}
