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
