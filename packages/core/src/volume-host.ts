import { allCapabilities, BlockDeviceError, toBlockDeviceError, type Capabilities, type Extent } from '@gannet/block-device';
import { InvariantError, storageError } from './assert.js';
import type { Engine } from './engine.js';
import type { Failover } from './failover.js';
import type { Flusher } from './flusher.js';
import type { BufferedIo } from './io.js';
import type { ViewHost, ViewRole, ViewWriteOptions } from './view.js';

const resolved = Promise.resolve();
const bufferedCapabilities: Capabilities = allCapabilities;
const plainCapabilities: Capabilities = Object.freeze({ ...allCapabilities, fastZero: false });
const readOnlyCapabilities: Capabilities = Object.freeze({ ...plainCapabilities, readOnly: true });

/**
 * What the two views of a gannet volume do, in every state of the volume:
 * - replicating: reads through P or S over C over B, writes into P or S, FLUSH and FUA acknowledged
 *   without disk I/O (buffered data is protected by the replication protocol, as in COLO);
 * - failed over: both views read W over the kept state over B; the primary view refuses writes; the
 *   secondary view is a plain disk: once the kept state is in the backing file, a write whose blocks no
 *   layer holds goes straight to the file, others into W; FLUSH and FUA are durable (they wait for the
 *   kept state first, then seal W and wait for the flusher, then fdatasync);
 * - halted or closed: every request fails (EIO naming the broken invariant; ESHUTDOWN).
 * An invariant that breaks under a request halts the volume.
 */
export class VolumeHost implements ViewHost {
  constructor(
    private readonly engine: Engine,
    private readonly io: BufferedIo,
    private readonly flusher: Flusher,
    private readonly failover: Failover,
  ) {}

  capabilities(role: ViewRole): Capabilities {
    if (this.engine.state !== 'failed-over') return bufferedCapabilities;
    return role === 'primary' ? readOnlyCapabilities : plainCapabilities;
  }

  read(role: ViewRole, buf: Uint8Array, offset: number): Promise<void> {
    const refused = this.refusal();
    if (refused !== null) return Promise.reject(refused);
    return this.guard(this.io.read(role, buf, offset));
  }

  /** Most writes while replicating are whole blocks with room for them: applied now, with no await. */
  write(role: ViewRole, src: Uint8Array | null, offset: number, length: number, options: ViewWriteOptions): Promise<void> {
    if (this.engine.state === 'replicating' && !this.engine.closing) {
      try {
        if (this.io.tryWrite(role, src, offset, length, options.noHole)) return resolved;
      } catch (err) {
        return Promise.reject(this.halting(err));
      }
    }
    return this.guard(this.writeSlow(role, src, offset, length, options));
  }

  flush(role: ViewRole): Promise<void> {
    const refused = this.refusal();
    if (refused !== null) return Promise.reject(refused);
    if (this.engine.state === 'failed-over' && role === 'secondary') return this.guard(this.drain());
    return resolved;
  }

  async extents(role: ViewRole, offset: number, length: number): Promise<Extent[]> {
    const refused = this.refusal();
    if (refused !== null) throw refused;
    return this.io.extents(role, offset, length);
  }

  async cache(): Promise<void> {
    const refused = this.refusal();
    if (refused !== null) throw refused;
  }

  /**
   * After failover: makes every write acknowledged so far durable. Waits for the kept state to be in the
   * backing file, seals W if it holds anything, waits for the flusher to write it, and fdatasyncs (which
   * also covers the writes that went straight to the file).
   */
  async drain(): Promise<void> {
    const { engine } = this;
    await this.failover.applied();
    const { epochs } = engine;
    if (epochs.W !== null && !epochs.W.empty) {
      if (!epochs.lease.covers(epochs.epoch + 1)) await epochs.lease.ensure(epochs.epoch + 1);
      epochs.sealWrites();
      this.flusher.kick();
    }
    const epoch = epochs.epoch;
    let retried = false;
    while (epochs.committed.some((layer) => layer.sealedEpoch <= epoch)) {
      if (engine.state === 'halted' || engine.state === 'closed') throw this.refusal() ?? new BlockDeviceError('ESHUTDOWN', 'the volume is closed');
      const failure = this.flusher.failure;
      if (failure !== null) {
        if (retried) throw toBlockDeviceError(failure, 'writes after failover cannot reach the backing file');
        retried = true;
        this.flusher.retry();
      }
      await engine.nextWake();
    }
    await engine.backing.flush().catch((err: unknown) => {
      throw storageError(err, 'backing file');
    });
  }

  private async writeSlow(role: ViewRole, src: Uint8Array | null, offset: number, length: number, options: ViewWriteOptions): Promise<void> {
    const { engine } = this;
    for (let attempt = 0; attempt < 4; attempt++) {
      const refused = this.refusal();
      if (refused !== null) throw refused;
      if (engine.state === 'failed-over') {
        if (role === 'primary') throw new BlockDeviceError('EPERM', 'the primary view is read-only after failover');
        if (engine.failover?.phase === 'done' && !this.io.held(offset, length)) {
          await this.writeThrough(src, offset, length, options);
          return;
        }
        if (await this.io.write('secondary', src, offset, length, options.noHole)) {
          if (options.fua) await this.drain();
          return;
        }
        continue;
      }
      if (await this.io.write(role, src, offset, length, options.noHole)) return;
    }
    throw new BlockDeviceError('EIO', 'write: the volume kept changing state');
  }

  private async writeThrough(src: Uint8Array | null, offset: number, length: number, options: ViewWriteOptions): Promise<void> {
    const { backing } = this.engine;
    try {
      if (src === null) await backing.writeZeroes(offset, length, { fua: options.fua, noHole: options.noHole });
      else await backing.write(src, offset, options.fua ? { fua: true } : undefined);
    } catch (err) {
      throw storageError(err, 'backing file');
    }
  }

  /** Why the volume takes no requests now, or null. */
  private refusal(): BlockDeviceError | null {
    const { engine } = this;
    if (engine.state === 'halted') return new BlockDeviceError('EIO', `the volume is halted: ${engine.error?.message}`);
    if (engine.closing || engine.state === 'closed') return new BlockDeviceError('ESHUTDOWN', 'the volume is closed');
    return null;
  }

  /** A broken invariant under a request halts the volume; the request fails with EIO. */
  private guard<T>(work: Promise<T>): Promise<T> {
    return work.catch((err: unknown) => {
      throw this.halting(err);
    });
  }

  private halting(err: unknown): unknown {
    if (!(err instanceof InvariantError)) return err;
    this.engine.halt(err);
    return new BlockDeviceError('EIO', `the volume is halted: ${err.message}`, { cause: err });
  }
}
