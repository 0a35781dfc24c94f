import { GiB, KiB, MiB } from '@gannet/block-device';
import { z } from 'zod';
import { indexEntriesMaxDefault } from './buffer.js';

export const blockBytesMin = 512;
export const blockBytesMax = 1 * MiB;
export const volumeSizeBytesMax = 2 ** 52;

const powerOfTwo = (n: number) => n > 0 && (n & (n - 1)) === 0;

/** Options of one volume; every field named, with defaults and limits, validated at the edge. */
export const volumeOptionsSchema = z
  .object({
    path: z.string().min(1),
    sizeBytes: z.number().int().positive().max(volumeSizeBytesMax),
    dataDir: z.string().min(1),
    strategy: z.enum(['gannet', 'colo', 'passthrough']).default('gannet'),
    blockBytes: z
      .number()
      .int()
      .min(blockBytesMin)
      .max(blockBytesMax)
      .refine(powerOfTwo, 'must be a power of two')
      .default(4 * KiB),
    memoryBytesMax: z.number().int().min(1 * MiB).default(1 * GiB),
    pressureRatio: z.number().gt(0).lte(1).default(0.75),
    committedBytesMax: z.number().int().min(1 * MiB).default(2 * GiB),
    /** Block index entries (blocks with data, zeroed ranges) over all of the volume's buffers. */
    indexEntriesMax: z.number().int().min(16).max(indexEntriesMaxDefault).default(indexEntriesMaxDefault),
  })
  .strict();

export type VolumeOptions = z.input<typeof volumeOptionsSchema>;
export type ResolvedVolumeOptions = z.output<typeof volumeOptionsSchema>;

/** The primary role's dirty map: one bit per block of this size. */
export const dirtyBlockBytes = 4 * KiB;
/** The activity log's unit: writing into an extent not in the log costs one synced metadata batch. */
export const activityExtentBytes = 4 * MiB;

/** Options of a volume in the primary role (primary.ts): its local disk and how it replicates to the peer. */
export const primaryOptionsSchema = z
  .object({
    path: z.string().min(1),
    sizeBytes: z.number().int().positive().max(volumeSizeBytesMax),
    dataDir: z.string().min(1),
    /** Take an existing file without metadata as the volume's disk (the peer then gets a full sync). */
    adoptBacking: z.boolean().default(false),
    /** peer: a write is acknowledged once it is on the local disk and in the peer's buffer; local: once local. */
    ackMode: z.enum(['peer', 'local']).default('peer'),
    /** In local mode, the bytes forwarded and not yet acknowledged by the peer; past it, writes wait. */
    forwardBytesMax: z.number().int().min(1 * MiB).max(4 * GiB).default(64 * MiB),
    /** A peer that answers nothing for this long is hung: the link is dropped and the volume degraded. */
    peerTimeoutMs: z.number().int().min(50).max(600_000).default(5000),
    /** First wait before connecting again; doubles up to peerReconnectMsMax. */
    peerReconnectMs: z.number().int().min(10).max(600_000).default(500),
    peerReconnectMsMax: z.number().int().min(10).max(3_600_000).default(10_000),
    /** Resync rate limit; what the VM writes meanwhile is not counted. */
    resyncBytesPerSecondMax: z.number().int().min(1 * MiB).default(256 * MiB),
    /** A resync checkpoints the peer after this much, so the peer's buffer drains to its disk as it goes. */
    resyncCheckpointBytes: z.number().int().min(1 * MiB).default(256 * MiB),
    /** Extents in the activity log: what a resync after a crash of the primary sends at most, besides the bitmap. */
    activityExtentsMax: z.number().int().min(4).max(65_536).default(1024),
  })
  .strict()
  .refine((o) => o.peerReconnectMsMax >= o.peerReconnectMs, { message: 'must be at least peerReconnectMs', path: ['peerReconnectMsMax'] });

export type PrimaryOptions = z.input<typeof primaryOptionsSchema>;
export type ResolvedPrimaryOptions = z.output<typeof primaryOptionsSchema>;
