export * from './types.js';
export * from './options.js';
export { GannetError, PeerIsPrimaryError, SplitBrainError, isGannetError, type GannetErrorCode } from './errors.js';
export { InvariantError } from './assert.js';
export { ReplicatedVolume, metaDirName, type OpenContext } from './volume.js';
export { VolumeView, type ViewRole } from './view.js';
export { checkpointGroup, groupCheckpoint, epochLeaseCount, type GroupCheckpointable } from './epochs.js';
export { openVolume } from './open.js';
export { parseVolumeOptions } from './parse.js';
export { fileStorage, type Storage } from './storage.js';
export { MetaStore } from './meta.js';
export type { KvOp, KvRange, KvStore } from './kv.js';
export type { Recovered } from './lifecycle.js';
export { openColoVolume, openPassthroughVolume } from './strategies/index.js';
export { Rng } from './rng.js';
export { PrimaryVolume, readPrimaryMeta, primaryMetaDirName, type PrimaryMetaSummary, type PrimaryState, type PrimaryStats, type PrimaryEvents, type LinkState, type ResyncStatus, type PrimaryOpenContext } from './primary.js';
export { digestBytes, digestChunkBytes, digestChunksPerCallMax, type Peer, type PeerInfo, type PeerSession } from './link.js';
export { chunkDigest, checkDigestRange, deviceDigests } from './digest.js';
export {
  compareGenerations,
  generationHistoryMax,
  generationSchema,
  newGeneration,
  nextGeneration,
  forgetGeneration,
  sameGeneration,
  unknownGeneration,
  type Generation,
  type GenerationRelation,
} from './generation.js';
export { promoteToPrimary, demoteToSecondary, discardSecondary, type PromoteOptions } from './role-change.js';
export { readRole, roleFileName, type VolumeRole, type RoleRecord } from './role-file.js';
export { volumePeer } from './volume-peer.js';
