import { join } from 'node:path';
import { z } from 'zod';
import { GannetError } from './errors.js';
import type { Storage } from './storage.js';

/** The volume's state file, beside its metadata store in dataDir. */
export const stateFileName = 'volume-state.json';
export const stateFileBytesMax = 64 * 1024;

const journalRef = z
  .object({
    file: z.string().regex(/^[A-Za-z0-9._-]+$/),
    bytes: z.number().int().positive(),
    checksum: z.number().int().nonnegative(),
  })
  .strict();

const stateSchema = z
  .object({
    format: z.literal(1),
    uuid: z.uuid(),
    sizeBytes: z.number().int().positive(),
    blockBytes: z.number().int().positive(),
    createdAt: z.string(),
    lifecycle: z.enum(['replicating', 'failed-over']),
    target: z.enum(['secondary', 'checkpoint', 'primary']).nullable(),
    /** A committed failover whose journal is not yet applied to the backing file. */
    journal: journalRef.nullable(),
    /** A copy of the epoch lease, written before the metadata's: a recovered volume starts above it. */
    epochCeiling: z.number().int().nonnegative(),
    /** Set by a recovery that lost the replication metadata: the whole disk needs a resync. */
    resync: z.enum(['full']).nullable(),
    /** When the failover that the record commits was asked for (absent in records written before it). */
    failoverRequestedAt: z.string().optional(),
  })
  .strict()
  .refine((s) => (s.lifecycle === 'failed-over') === (s.target !== null), { message: 'target is set exactly when failed over', path: ['target'] })
  .refine((s) => s.journal === null || s.lifecycle === 'failed-over', { message: 'only a failed-over volume has a journal', path: ['journal'] });

export type VolumeStateRecord = z.output<typeof stateSchema>;
export type JournalRef = z.output<typeof journalRef>;

/**
 * The volume's identity and lifecycle in a small JSON file, replaced atomically (written to a temporary
 * file, fsynced, renamed, the directory fsynced), so a crash leaves the old record or the new one. It is
 * the commit point of a failover, and it outlives the metadata store: a volume whose metadata is lost or
 * damaged is never mistaken for a new one, and `ReplicatedVolume.recover` rebuilds the metadata from it.
 */
export class VolumeStateFile {
  readonly path: string;

  constructor(
    private readonly storage: Storage,
    dataDir: string,
  ) {
    this.path = join(dataDir, stateFileName);
  }

  /** The record, or null when there is no state file. A damaged one is refused with its problem named. */
  async read(): Promise<VolumeStateRecord | null> {
    const bytes = await this.storage.readFile(this.path);
    if (bytes === undefined) return null;
    if (bytes.byteLength > stateFileBytesMax) throw this.damaged(`is larger than ${stateFileBytesMax} bytes`);
    let value: unknown;
    try {
      value = JSON.parse(Buffer.from(bytes).toString('utf8'));
    } catch (err) {
      throw this.damaged(`is not JSON (${(err as Error).message})`);
    }
    const parsed = stateSchema.safeParse(value);
    if (!parsed.success) {
      const issue = parsed.error.issues[0];
      throw this.damaged(`field ${issue.path.join('.') || '(top)'}: ${issue.message}`);
    }
    return parsed.data;
  }

  async write(record: VolumeStateRecord): Promise<void> {
    const checked = stateSchema.parse(record);
    await this.storage.writeFileAtomic(this.path, Buffer.from(`${JSON.stringify(checked, null, 2)}\n`));
  }

  private damaged(problem: string): GannetError {
    return new GannetError('EMETA', `the volume state file ${this.path} is damaged: ${problem}`);
  }
}
