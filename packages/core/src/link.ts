import type { BlockDevice } from '@gannet/block-device';
import type { Generation } from './generation.js';
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
  /**
   * Opens a session: the peer's state, then a data path. `generation` is the primary's: the peer
   * compares it with its own and refuses a split brain (SplitBrainError, code ESPLITBRAIN, carrying the
   * peer's generation). Rejects when the peer cannot be reached.
   */
  connect(generation: Generation): Promise<PeerSession>;
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
  /** The peer volume's generation; null (or a null current id): its data is unknown, it takes a full sync. */
  readonly generation: Generation | null;
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
   * With a generation (only when clearing), the peer adopts it in the same synced batch: it is then in
   * sync with that lineage.
   */
  setInconsistent(inconsistent: boolean, generation?: Generation): Promise<void>;
  /**
   * Digests of the peer's primary view, one per digestChunkBytes chunk from `offset` (chunk-aligned) over
   * `length` bytes (the last chunk may be cut at the end of the disk), digestBytes each, concatenated;
   * at most digestChunksPerCallMax chunks per call.
   */
  digests(offset: number, length: number): Promise<Uint8Array>;
  /** Ends the session at once: requests in flight fail, and nothing more of this session reaches the peer. */
  abort(): void;
}

/** A full sync compares the disks in chunks of this size, and sends only the chunks that differ. */
export const digestChunkBytes = 64 * 1024;
/** Bytes of one chunk's digest: sha256, truncated. */
export const digestBytes = 16;
/** Chunks one digests call covers at most: 64 MiB of disk, 16 KiB of answer. */
export const digestChunksPerCallMax = 1024;
