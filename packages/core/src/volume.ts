import { EventEmitter } from 'node:events';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { allCapabilities, BlockDeviceError, toBlockDeviceError, type BlockDevice, type Capabilities, type Extent } from '@gannet/block-device';
import { assert } from './assert.js';
import { isSlot, isSpilled } from './buffer.js';
import { Engine, spillDir } from './engine.js';
import { Spiller } from './spill.js';
import { epochLeaseCount, groupCheckpoint, type GroupCheckpointable } from './epochs.js';
import { GannetError } from './errors.js';
import { Failover } from './failover.js';
import { Flusher } from './flusher.js';
import { BufferedIo } from './io.js';
import type { PersistedMeta } from './meta.js';
import { parseVolumeOptions } from './parse.js';
import type { ResolvedVolumeOptions, VolumeOptions } from './options.js';
import { mergeRanges } from './ranges.js';
import { fileStorage, type Storage } from './storage.js';
import type { FailoverTarget, Volume, VolumeEvents, VolumeStats } from './types.js';
import { VolumeView, type ViewHost, type ViewRole, type ViewWriteOptions } from './view.js';

const resolved = Promise.resolve();

/** Name of the volume's metadata directory inside dataDir. */
export const metaDirName = 'gannet-meta';

/** What open() takes besides the options: where the durable state lives (tests decorate it). */
export interface OpenContext {
  readonly storage?: Storage;
}

const bufferedCapabilities: Capabilities = allCapabilities;
const plainCapabilities: Capabilities = Object.freeze({ ...allCapabilities, fastZero: false });
const readOnlyCapabilities: Capabilities = Object.freeze({ ...plainCapabilities, readOnly: true });

/**
 * GANNET's storage side: one volume, two views over one backing file (see epochs.ts for the layering).
 * This class ties the parts together and holds what is about the volume as a whole: opening it,
 * checkpoint, failover, close, and the plain disk the secondary view becomes after failover. The parts:
 * BufferedIo (io.ts) reads and writes the buffers, Flusher (flusher.ts) moves committed epochs to the
 * backing file, Failover (failover.ts) ends replication, Epochs (epochs.ts) holds the layers.
 *
 * FLUSH and FUA while replicating are acknowledged without disk I/O: buffered data is protected by the
 * replication protocol (the primary VM holds the same writes and a failed secondary is re-seeded from it),
 * as in COLO. After failover the volume is a plain disk and FLUSH/FUA are fdatasync.
 */
export class ReplicatedVolume extends EventEmitter<VolumeEvents> implements Volume, GroupCheckpointable {
  readonly primary: VolumeView;
  readonly secondary: VolumeView;
  readonly sizeBytes: number;
  readonly options: ResolvedVolumeOptions;

  private readonly engine: Engine;
  private readonly io: BufferedIo;
  private readonly flusher: Flusher;
  private readonly failoverPart: Failover;
  private closing: Promise<void> | null = null;
  private failing: Promise<void> | null = null;
  private failoverError: Error | null = null;

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
    this.io = new BufferedIo(this.engine, this.flusher);
    this.failoverPart = new Failover(this.engine, this.flusher);
    const host: ViewHost = {
      capabilities: (role) => this.capabilities(role),
      read: (role, buf, offset) => this.viewRead(role, buf, offset),
      write: (role, src, offset, length, options) => this.viewWrite(role, src, offset, length, options),
      flush: (role) => this.viewFlush(role),
      extents: (role, offset, length) => this.viewExtents(role, offset, length),
      cache: () => this.settled(),
    };
    this.primary = new VolumeView('primary', this.sizeBytes, this.options.blockBytes, host);
    this.secondary = new VolumeView('secondary', this.sizeBytes, this.options.blockBytes, host);
  }

  /**
   * Creates the volume (backing file created sparse, metadata store in dataDir) or reopens it. A reopened
   * volume is at its last durable checkpoint (stats().durableEpoch), with the ranges an interrupted flush
   * may have torn in stats().tornRanges, or fully failed over; its epoch is max(recorded epoch ceiling,
   * durable epoch) + 1, above every epoch it reported before.
   */
  static async open(input: VolumeOptions, context: OpenContext = {}): Promise<ReplicatedVolume> {
    const options = parseVolumeOptions(input);
    if (options.strategy !== 'gannet') {
      throw new GannetError('EOPTIONS', `strategy: ReplicatedVolume is the gannet strategy, not ${options.strategy}`);
    }
    const storage = context.storage ?? fileStorage;
    await mkdir(options.dataDir, { recursive: true });
    const meta = await storage.openMeta(join(options.dataDir, metaDirName));
    let backing: BlockDevice | null = null;
    try {
      const persisted = await meta.load();
      const fresh = persisted.identity === null;
      if (!fresh) checkIdentity(persisted, options);
      backing = await storage.openBacking(options.path, options.sizeBytes, { create: fresh });
      await meta.clearLegacySpill();
      await Spiller.clear(spillDir(options.dataDir));
      if (persisted.state !== 'failing-over') await meta.clearJournal();
      const epoch = fresh ? 0 : Math.max(persisted.epochCeiling, persisted.durableEpoch) + 1;
      const torn = mergeRanges([...persisted.torn, ...persisted.flushing]);
      if (fresh) await meta.create({ sizeBytes: options.sizeBytes, blockBytes: options.blockBytes }, epoch + epochLeaseCount);
      else await meta.reopen(torn, epoch + epochLeaseCount);
      const opened = backing;
      const volume = new ReplicatedVolume(
        (events) =>
          new Engine(
            {
              options,
              meta,
              backing: opened,
              state: persisted.state,
              target: persisted.target ?? undefined,
              epoch,
              durableEpoch: persisted.durableEpoch,
              epochCeiling: epoch + epochLeaseCount,
              torn,
            },
            events,
          ),
      );
      if (persisted.state === 'failing-over') {
        assert(persisted.target !== null, 'a failing-over volume records its target');
        await volume.failoverPart.replay(persisted.target);
      }
      return volume;
    } catch (err) {
      await backing?.close().catch(() => undefined);
      await meta.close().catch(() => undefined);
      throw err;
    }
  }

  stats(): VolumeStats {
    const { engine } = this;
    const { epochs, buffers } = engine;
    const bs = this.options.blockBytes;
    let committed = 0;
    for (const layer of epochs.committed) committed += layer.memBlocks * bs;
    return {
      strategy: 'gannet',
      state: engine.state,
      sizeBytes: this.sizeBytes,
      epoch: epochs.epoch,
      durableEpoch: epochs.durableEpoch,
      ...(engine.target !== undefined ? { failoverTarget: engine.target } : {}),
      bufferedBytes: { primary: epochs.P.memBlocks * bs, secondary: epochs.S.memBlocks * bs, committed },
      spilledBytes: buffers.spilledBytes,
      tornRanges: engine.torn.map((r) => ({ offset: r.offset, length: r.length })),
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
    const { state } = this.engine;
    if (this.closing !== null || state === 'closed') throw new GannetError('ESTATE', 'checkpoint: the volume is closed');
    if (state !== 'replicating') throw new GannetError('ESTATE', `checkpoint: the volume is ${state}, checkpoints end at failover`);
    const failure = this.flusher.failure;
    if (failure !== null) {
      this.flusher.retry();
      throw new GannetError('EIO', `checkpoint refused: flushing committed data to the backing file failed: ${failure.message}`, {
        cause: failure,
      });
    }
  }

  private seal(start: number): number {
    assert(this.engine.state === 'replicating', 'seal while replicating');
    const epoch = this.engine.epochs.seal();
    this.flusher.kick();
    this.engine.wake();
    this.emit('checkpoint', { epoch, pauseMs: performance.now() - start });
    return epoch;
  }

  async failover(options: { to?: FailoverTarget } = {}): Promise<void> {
    const { engine } = this;
    const to = options.to ?? 'secondary';
    if (to !== 'secondary' && to !== 'checkpoint' && to !== 'primary') {
      throw new GannetError('EOPTIONS', `to: must be secondary, checkpoint or primary, not ${String(to)}`);
    }
    if (engine.state === 'failed-over' || engine.state === 'failing-over') {
      if (engine.target !== to) throw new GannetError('ESTATE', `failover: already failed over to ${engine.target}`);
      if (this.failing !== null) await this.failing;
      if (this.failoverError !== null) throw this.failoverError;
      return;
    }
    if (engine.state === 'closed' || this.closing !== null) throw new GannetError('ESTATE', 'failover: the volume is closed');
    const start = performance.now();
    engine.state = 'failing-over';
    engine.target = to;
    engine.wake();
    this.failing = this.failoverPart.run(to);
    try {
      await this.failing;
    } catch (err) {
      this.failoverError = new GannetError('EIO', `failover to ${to} failed: ${(err as Error).message}`, { cause: err });
      engine.reportError(this.failoverError);
      throw this.failoverError;
    } finally {
      this.failing = null;
      engine.wake();
    }
    this.emit('failover', { to, durationMs: performance.now() - start });
  }

  /** Waits for committed data to reach the backing file, records the epoch, closes file and store. */
  close(): Promise<void> {
    this.closing ??= this.closeNow();
    return this.closing;
  }

  private async closeNow(): Promise<void> {
    const { engine } = this;
    engine.closing = true;
    if (this.failing !== null) await this.failing.catch(() => undefined);
    let unflushed: Error | null = null;
    if (engine.state === 'replicating') {
      this.flusher.retry();
      this.flusher.kick();
      await this.flusher.idle();
      if (engine.epochs.committed.length > 0) {
        unflushed = new GannetError('EIO', `close: epochs up to ${engine.epochs.committed.at(-1)!.sealedEpoch} could not be flushed`, {
          cause: this.flusher.failure,
        });
      }
    }
    await engine.epochs.lease.settle();
    try {
      await engine.meta.putEpochCeiling(engine.epochs.epoch);
    } catch (err) {
      unflushed ??= err as Error;
    }
    engine.epochs.dropAll();
    engine.state = 'closed';
    engine.wake();
    await engine.choresDone();
    await engine.backing.close().catch((err: Error) => (unflushed ??= err));
    await engine.meta.close().catch((err: Error) => (unflushed ??= err));
    if (unflushed !== null) throw unflushed;
  }

  // ---- views: buffered while replicating, a plain disk (primary read-only) after failover ---------

  private capabilities(role: ViewRole): Capabilities {
    if (this.engine.state !== 'failed-over') return bufferedCapabilities;
    return role === 'primary' ? readOnlyCapabilities : plainCapabilities;
  }

  /** Waits out a failover in progress; throws when the volume is closed or its failover failed. */
  private async settled(): Promise<void> {
    const { engine } = this;
    if (engine.state === 'failing-over' && this.failing !== null) await this.failing.catch(() => undefined);
    if (this.closing !== null || engine.state === 'closed') throw new BlockDeviceError('ESHUTDOWN', 'the volume is closed');
    if (engine.state === 'failing-over') {
      throw new BlockDeviceError('EIO', 'the volume failed to fail over; reopen it to finish', { cause: this.failoverError });
    }
  }

  private async viewRead(role: ViewRole, buf: Uint8Array, offset: number): Promise<void> {
    await this.settled();
    if (this.engine.state === 'failed-over') {
      await this.engine.backing.read(buf, offset).catch((err: unknown) => {
        throw toBlockDeviceError(err, 'backing file');
      });
      return;
    }
    await this.io.read(role, buf, offset);
  }

  /** Most writes while replicating are whole blocks with room for them: applied now, with no await. */
  private viewWrite(role: ViewRole, src: Uint8Array | null, offset: number, length: number, options: ViewWriteOptions): Promise<void> {
    if (this.engine.state === 'replicating' && this.closing === null && this.io.tryWrite(role, src, offset, length, options.noHole)) {
      return resolved;
    }
    return this.viewWriteSlow(role, src, offset, length, options);
  }

  private async viewWriteSlow(role: ViewRole, src: Uint8Array | null, offset: number, length: number, options: ViewWriteOptions): Promise<void> {
    for (let attempt = 0; attempt < 4; attempt++) {
      await this.settled();
      if (this.engine.state === 'failed-over') {
        if (role === 'primary') throw new BlockDeviceError('EPERM', 'the primary view is read-only after failover');
        const { backing } = this.engine;
        const fua = options.fua ? { fua: true } : undefined;
        try {
          if (src === null) await backing.writeZeroes(offset, length, { fua: options.fua, noHole: options.noHole });
          else await backing.write(src, offset, fua);
        } catch (err) {
          throw toBlockDeviceError(err, 'backing file');
        }
        return;
      }
      if (await this.io.write(role, src, offset, length, options.noHole)) return;
    }
    throw new BlockDeviceError('EIO', 'write: the volume kept changing state');
  }

  private async viewFlush(role: ViewRole): Promise<void> {
    await this.settled();
    if (this.engine.state === 'failed-over' && role === 'secondary') {
      await this.engine.backing.flush().catch((err: unknown) => {
        throw toBlockDeviceError(err, 'backing file');
      });
    }
  }

  private async viewExtents(role: ViewRole, offset: number, length: number): Promise<Extent[]> {
    await this.settled();
    if (this.engine.state === 'failed-over') return [{ length, flags: 0 }];
    return this.io.extents(role, offset, length);
  }
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

