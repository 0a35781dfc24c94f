import { mkdir, open, readdir, readFile, rename } from 'node:fs/promises';
import { join } from 'node:path';
import { volumeOptionsSchema, type ResolvedVolumeOptions } from '@gannet/core';
import { z } from 'zod';
import { ConfigError, defaultVolumeName, defaultVolumeSizeBytes, volumeNamePattern, type DaemonConfig } from './config.js';

/**
 * The volume registry is the data directory itself: DATA_DIR/volumes/NAME/{volume.json, disk.img, meta/}.
 * volume.json records what a volume was created with and may not change later (size, block size,
 * strategy), so a restart with fewer flags serves the same volumes in the same shape. It is written
 * (atomically, then fsynced) before the engine creates the backing file, so a crash between the two
 * leaves a volume that the next start simply opens.
 */

export const volumesDirName = 'volumes';
export const volumeRecordName = 'volume.json';
export const backingFileName = 'disk.img';
export const metaDirName = 'meta';
export const volumeRecordBytesMax = 64 * 1024;

const volumeRecordSchema = z
  .object({
    name: z.string().regex(volumeNamePattern),
    sizeBytes: z.number().int().positive(),
    blockBytes: z.number().int().positive(),
    strategy: z.enum(['gannet', 'colo', 'passthrough']),
    createdAt: z.string(),
  })
  .strict();

export type VolumeRecord = z.output<typeof volumeRecordSchema>;

/** Fields fixed at creation: changing them under an existing backing file and journal is refused. */
const identityFields = ['sizeBytes', 'blockBytes', 'strategy'] as const;

export interface VolumeSpec {
  readonly name: string;
  readonly dir: string;
  readonly options: ResolvedVolumeOptions;
  readonly created: boolean;
}

export function volumeDir(dataDir: string, name: string): string {
  return join(dataDir, volumesDirName, name);
}

export async function readVolumeRecords(dataDir: string): Promise<Map<string, VolumeRecord>> {
  const root = join(dataDir, volumesDirName);
  const records = new Map<string, VolumeRecord>();
  let names: string[];
  try {
    names = await readdir(root);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return records;
    throw error;
  }
  for (const name of names.sort()) {
    if (!volumeNamePattern.test(name)) continue;
    const file = join(root, name, volumeRecordName);
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') continue;
      throw error;
    }
    if (text.length > volumeRecordBytesMax) throw new Error(`${file}: larger than ${volumeRecordBytesMax} bytes`);
    const parsed = volumeRecordSchema.safeParse(JSON.parse(text));
    if (!parsed.success) throw new Error(`${file}: ${parsed.error.issues[0].path.join('.')}: ${parsed.error.issues[0].message}`);
    if (parsed.data.name !== name) throw new Error(`${file}: records volume "${parsed.data.name}", expected "${name}"`);
    records.set(name, parsed.data);
  }
  return records;
}

async function writeFileDurably(file: string, text: string): Promise<void> {
  const temporary = `${file}.tmp`;
  const handle = await open(temporary, 'w', 0o644);
  try {
    await handle.writeFile(text);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await rename(temporary, file);
}

async function syncDirectory(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * The volumes to serve: every volume on disk plus every configured one; `vol0` of 1 GiB when there are
 * none. Configured values that contradict a volume's record are refused with the field named.
 */
export async function resolveVolumes(config: DaemonConfig): Promise<VolumeSpec[]> {
  const records = await readVolumeRecords(config.dataDir);
  const configured = new Map(Object.entries(config.volumes));
  if (configured.size === 0 && records.size === 0) configured.set(defaultVolumeName, {});
  const names = [...new Set([...records.keys(), ...configured.keys()])].sort();
  const specs: VolumeSpec[] = [];
  for (const name of names) {
    const record = records.get(name);
    const wanted = configured.get(name) ?? {};
    const dir = volumeDir(config.dataDir, name);
    if (record) {
      for (const field of identityFields) {
        const value = wanted[field];
        if (value !== undefined && value !== record[field]) {
          throw new ConfigError(
            `volumes.${name}.${field}`,
            `is ${value} but the volume in ${dir} was created with ${record[field]} (it cannot change)`,
          );
        }
      }
    }
    const options = volumeOptionsSchema.parse({
      ...wanted,
      ...(record && { sizeBytes: record.sizeBytes, blockBytes: record.blockBytes, strategy: record.strategy }),
      sizeBytes: record?.sizeBytes ?? wanted.sizeBytes ?? defaultVolumeSizeBytes,
      path: join(dir, backingFileName),
      dataDir: join(dir, metaDirName),
    }) as ResolvedVolumeOptions;
    specs.push({ name, dir, options, created: record === undefined });
  }
  return specs;
}

/** Records a new volume before the engine creates its files. */
export async function createVolumeRecord(spec: VolumeSpec): Promise<void> {
  await mkdir(spec.dir, { recursive: true });
  const record: VolumeRecord = {
    name: spec.name,
    sizeBytes: spec.options.sizeBytes,
    blockBytes: spec.options.blockBytes,
    strategy: spec.options.strategy,
    createdAt: new Date().toISOString(),
  };
  await writeFileDurably(join(spec.dir, volumeRecordName), `${JSON.stringify(record, null, 2)}\n`);
  await syncDirectory(spec.dir);
}
