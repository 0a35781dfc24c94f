import { BlockDeviceError, FilterDevice, type BlockDevice, type ZeroRequest } from '@gannet/block-device';
import { GannetError } from './errors.js';
import type { Generation } from './generation.js';
import type { Peer, PeerSession } from './link.js';
import type { ReplicatedVolume } from './volume.js';

/**
 * A peer in the same process: a ReplicatedVolume (the secondary role's engine) behind the Peer seam, for
 * a replicator that runs both halves itself, and for tests. `target()` names the volume now (null: the
 * peer is down); it may be a new one for each session, as after a restart. `wrap` decorates the data
 * path (a FaultDevice, in tests). Aborting a session fails its requests in flight at once, and nothing of
 * the session reaches the volume afterwards, even a request a decorator was holding: as a connection
 * reset, whose unread data the peer never sees.
 */
export function volumePeer(target: () => ReplicatedVolume | null, options: { address?: string; wrap?: (device: BlockDevice) => BlockDevice } = {}): Peer {
  const address = options.address ?? 'in-process';
  return {
    address,
    async connect(generation: Generation): Promise<PeerSession> {
      const volume = target();
      if (volume === null) throw new GannetError('EPEER', `${address}: no volume to connect to`);
      if (volume.stats().state === 'closed') throw gone();
      // A split brain is refused before anything of the session exists (SplitBrainError).
      await volume.acceptPrimary(generation);
      const s = volume.stats();
      const gate = new Gate(volume.primary);
      const device = new SessionDevice(options.wrap !== undefined ? options.wrap(gate) : gate, gate);
      // A session belongs to this instance of the volume: once it is closed (the peer restarted), every
      // call fails, as a connection to a restarted daemon would, even one that only reads its state.
      const live = <T>(work: () => Promise<T>): Promise<T> =>
        device.aborted ? Promise.reject(aborted()) : volume.stats().state === 'closed' ? Promise.reject(gone()) : device.race(work());
      return {
        info: {
          volumeId: volume.volumeId,
          instance: volume.instance,
          sizeBytes: volume.sizeBytes,
          state: s.state,
          epoch: s.epoch,
          durableEpoch: s.durableEpoch,
          tornRanges: s.tornRanges,
          inconsistent: s.inconsistent !== undefined,
          generation: s.generation ?? null,
        },
        device,
        checkpoint: () => live(async () => ({ epoch: await volume.checkpoint(), durableEpoch: volume.stats().durableEpoch })),
        durableEpoch: () => live(async () => volume.stats().durableEpoch),
        setInconsistent: (inconsistent, generation) => live(() => volume.setInconsistent(inconsistent, generation)),
        digests: (offset, length) => live(() => volume.digests(offset, length)),
        abort: () => device.abort(),
      };
    },
  };
}

function gone(): GannetError {
  return new GannetError('EPEER', 'the peer volume of this session was closed');
}

function aborted(): BlockDeviceError {
  return new BlockDeviceError('ESHUTDOWN', 'the session to the peer was aborted');
}

/** The last step before the volume: shut for good when the session is aborted. */
class Gate extends FilterDevice {
  shut = false;

  protected override _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    return this.shut ? Promise.reject(aborted()) : super._write(data, offset, fua);
  }

  protected override _zero(offset: number, length: number, request: ZeroRequest): Promise<void> {
    return this.shut ? Promise.reject(aborted()) : super._zero(offset, length, request);
  }

  protected override _trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.shut ? Promise.reject(aborted()) : super._trim(offset, length, fua);
  }

  protected override _close(): Promise<void> {
    return Promise.resolve();
  }
}

/** The peer's view for one session: after abort, what is in flight fails at once and nothing new passes. */
class SessionDevice extends FilterDevice {
  aborted = false;
  private readonly stops = new Set<(err: Error) => void>();

  constructor(
    next: BlockDevice,
    private readonly gate: Gate,
  ) {
    super(next);
  }

  abort(): void {
    this.aborted = true;
    this.gate.shut = true;
    for (const stop of this.stops) stop(aborted());
    this.stops.clear();
  }

  race<T>(work: Promise<T>): Promise<T> {
    if (this.aborted) return Promise.reject(aborted());
    return new Promise<T>((resolve, reject) => {
      this.stops.add(reject);
      work.then(resolve, reject).finally(() => this.stops.delete(reject));
    });
  }

  protected override _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    return this.race(super._write(data, offset, fua));
  }

  protected override _zero(offset: number, length: number, request: ZeroRequest): Promise<void> {
    return this.race(super._zero(offset, length, request));
  }

  protected override _trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.race(super._trim(offset, length, fua));
  }

  protected override _flush(): Promise<void> {
    return this.race(super._flush());
  }

  /** The session never closes the peer's view: the volume owns it. */
  protected override _close(): Promise<void> {
    return Promise.resolve();
  }
}
