import type { BlockDevice } from '@gannet/block-device';
import type { ByteRange, VolumeState } from './types.js';

/**
 * The primary role's view of its peer, the secondary host's volume: what primary.ts needs and nothing
 * about how it gets there. The daemon implements it with an NBD connection to the peer's NAME/primary
 * export and the peer's control API; `volumePeer` (volume-peer.ts) with a ReplicatedVolume in the same
 * process. Every call may hang (a stopped peer) or fail: the primary puts its own deadline on each.
 */
export interface Peer {
  /** Names the peer in status and messages (host:port of its control API). */
  readonly address: string;
  /** Opens a session: the peer's state, then a data path. Rejects when the peer cannot be reached. */
  connect(): Promise<PeerSession>;
}

/** What the peer says about its volume when a session opens. */
export interface PeerInfo {
  /** The peer volume's uuid: a different one is a different disk, which needs a full sync. */
  readonly volumeId: string;
  /** Changes each time the peer opens the volume: a new one has lost what it buffered. */
  readonly instance: string;
  readonly sizeBytes: number;
  readonly state: VolumeState;
  readonly epoch: number;
  readonly durableEpoch: number;
  /** Ranges an interrupted flush left torn on the peer: they are sent again. */
  readonly tornRanges: readonly ByteRange[];
  /** Marked inconsistent by a resync that has not settled (its last checkpoint not yet durable). */
  readonly inconsistent: boolean;
}

/**
 * One connection to one instance of the peer's volume. Once that instance is gone (the peer restarted or
 * closed it), every call of the session rejects, also those that only read the peer's state: a restarted
 * peer has lost what it buffered, and only a new session (a new `instance`) resyncs it.
 */
export interface PeerSession {
  readonly info: PeerInfo;
  /** The peer's primary view (NAME/primary): every write, zero and trim is forwarded here. */
  readonly device: BlockDevice;
  /** Checkpoints the peer: the epoch it started, and its durable epoch then. */
  checkpoint(): Promise<{ epoch: number; durableEpoch: number }>;
  /** The peer's durable epoch now. */
  durableEpoch(): Promise<number>;
  /**
   * Marks the peer's disk inconsistent, durably, while a resync runs (it refuses to fail over onto a
   * half-synced disk unless forced), and clears the mark once the resync's last checkpoint is durable.
   */
  setInconsistent(inconsistent: boolean): Promise<void>;
  /** Ends the session at once: requests in flight fail, and nothing more of this session reaches the peer. */
  abort(): void;
}
