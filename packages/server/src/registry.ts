import { randomBytes } from 'node:crypto';
import { lstat, mkdir, open, readdir, readFile, rename, rm, stat, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { KiB } from '@gannet/block-device';
import { fileStorage, readRole, volumeOptionsSchema, type ResolvedVolumeOptions } from '@gannet/core';
import { z } from 'zod';
import {
  ConfigError,
  defaultVolumeName,
  roles,
  type Role,
  defaultVolumeSizeBytes,
  volumeLimitFields,
  volumeNameLengthMax,
  volumeNamePattern,
  type DaemonConfig,
  type VolumeConfig,
} from './config.js';

/**
 * The volume registry is the data directory itself: DATA_DIR/volumes/NAME/{volume.json, disk.img, meta/}.
 * volume.json records what a volume was created with and may not change later (size, block size,
 * strategy), so a restart with fewer flags serves the same volumes in the same shape.
 *
 * A directory there with a volume's name is a volume, whatever state it is in: one without a readable
 * volume.json is reported as broken, never skipped and never replaced by a new volume. Work in progress
 * lives in directories whose names start with a dot, which no volume name can: a creation builds its
 * directory as `.creating-NAME-*` and renames it into place, and a purge renames the volume to
 * `.purging-NAME-*` before deleting it, so a crash leaves either the whole volume or something the next
 * start removes. A deleted volume that is kept goes to DATA_DIR/volumes/.deleted/NAME.TIMESTAMP.
 */

export const volumesDirName = 'volumes';
/** Deleted volumes that are kept, inside volumes/ so that moving one there is a rename on its file system. */
export const deletedDirName = '.deleted';
export const volumeRecordName = 'volume.json';
export const backingFileName = 'disk.img';
export const metaDirName = 'meta';
/**
 * Present in a volume directory until the engine has made the volume's files: the engine opens a volume
 * at its final path (its epochs start there), so the rename happens before the engine runs, and a start
 * that finds this marker removes a creation that never finished (nothing was ever served from it).
 */
export const creatingMarkerName = '.creating';
export const volumeRecordBytesMax = 64 * KiB;
const creatingPrefix = '.creating-';
const purgingPrefix = '.purging-';
const randomSuffixBytes = 6;

const positiveInteger = z.number().int().positive();

const volumeRecordSchema = z
  .object({
    name: z.string().max(volumeNameLengthMax).regex(volumeNamePattern),
    /** Absent in the records of volumes made before roles existed, which were all secondary. */
    role: z.literal('secondary').optional(),
    sizeBytes: positiveInteger,
    blockBytes: positiveInteger,
    strategy: z.enum(['gannet', 'colo', 'passthrough']),
    createdAt: z.string(),
    /** Limits given when the volume was created through the API; the config file's values win over them. */
    settings: z
      .object({ memoryBytesMax: positiveInteger.optional(), pressureRatio: z.number().optional(), committedBytesMax: positiveInteger.optional() })
      .strict()
      .optional(),
  })
  .strict();

export type VolumeRecord = z.output<typeof volumeRecordSchema>;

/**
 * The record of a volume in the primary role: its disk and the primary's metadata (activity log, dirty
 * bitmap) live in the same directory layout, so the role is recorded to keep one daemon role from ever
 * opening the other's files.
 */
const primaryRecordSchema = z
  .object({
    name: z.string().max(volumeNameLengthMax).regex(volumeNamePattern),
    role: z.literal('primary'),
    sizeBytes: positiveInteger,
    createdAt: z.string(),
    /**
     * The volume was a secondary promoted to this role: its disk.img is the failed-over disk, adopted by
     * the primary (a full or digest sync of its next peer), and it is also served as NAME/secondary, the
     * export its VM was attached to.
     */
    promotedAt: z.string().optional(),
    /** The peer's control address (HOST:PORT) given at promotion, used instead of the daemon's peer. */
    peer: z.string().optional(),
  })
  .strict();

export type PrimaryRecord = z.output<typeof primaryRecordSchema>;

/** Fields fixed at creation: changing them under an existing backing file and journal is refused. */
const identityFields = ['sizeBytes', 'blockBytes', 'strategy'] as const;

/** What DATA_DIR/volumes holds under one volume name. */
export type DiskVolume<R = VolumeRecord> =
  | { readonly name: string; readonly dir: string; readonly record: R }
  | { readonly name: string; readonly dir: string; readonly problem: string };

export interface Scan<R = VolumeRecord> {
  readonly volumes: DiskVolume<R>[];
  /** Temporary directories of interrupted creations and purges: removed before anything is served. */
  readonly leftovers: string[];
  /** Volume directories whose creation never finished: discarded before anything is served. */
  readonly unfinished: { readonly name: string; readonly dir: string }[];
}

export function volumesRoot(dataDir: string): string {
  return join(dataDir, volumesDirName);
}

export function volumeDir(dataDir: string, name: string): string {
  return join(dataDir, volumesDirName, name);
}

function errnoOf(error: unknown): string | undefined {
  return (error as NodeJS.ErrnoException).code;
}

async function readRecord<S extends z.ZodType>(dir: string, name: string, role: Role, schema: S): Promise<z.output<S>> {
  const file = join(dir, volumeRecordName);
  const text = await readFile(file, 'utf8');
  if (text.length > volumeRecordBytesMax) throw new Error(`${file} is damaged: larger than ${volumeRecordBytesMax} bytes`);
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new Error(`${file} is damaged: not JSON (${(error as Error).message})`);
  }
  const recorded = (value as { role?: unknown } | null)?.role ?? 'secondary';
  if (recorded !== role && roles.includes(recorded as Role)) {
    throw new Error(
      `${file} records a volume of role ${recorded as string}, and this daemon runs role ${role}: refusing to open it ` +
        `(start a ${recorded as string} daemon on this data directory, or move the directory away)`,
    );
  }
  const parsed = schema.safeParse(value);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const segments = issue.path.map(String);
    if (issue.code === 'unrecognized_keys') segments.push(issue.keys[0]);
    throw new Error(`${file} is damaged: ${segments.join('.') || '(top level)'}: ${issue.message}`);
  }
  const record = parsed.data as { name: string };
  if (record.name !== name) throw new Error(`${file} records volume "${record.name}", but its directory is named "${name}"`);
  return parsed.data;
}

/** volume.json of the secondary-role volume in `dir`, checked; the error names the file and what is wrong with it. */
export function readVolumeRecord(dir: string, name: string): Promise<VolumeRecord> {
  return readRecord(dir, name, 'secondary', volumeRecordSchema);
}

/** volume.json of the primary-role volume in `dir`, checked as readVolumeRecord does. */
export function readPrimaryRecord(dir: string, name: string): Promise<PrimaryRecord> {
  return readRecord(dir, name, 'primary', primaryRecordSchema);
}

export type AnyVolumeRecord = VolumeRecord | PrimaryRecord;

export function isPrimaryRecord(record: AnyVolumeRecord): record is PrimaryRecord {
  return record.role === 'primary';
}

/** volume.json of a volume of either role, checked against the schema of the role it records. */
export async function readAnyRecord(dir: string, name: string): Promise<AnyVolumeRecord> {
  let role: unknown;
  try {
    role = (JSON.parse(await readFile(join(dir, volumeRecordName), 'utf8')) as { role?: unknown } | null)?.role;
  } catch {
    // readVolumeRecord names what is wrong with the file.
  }
  return role === 'primary' ? readPrimaryRecord(dir, name) : readVolumeRecord(dir, name);
}

/**
 * Replaces a volume's volume.json atomically (a new file renamed over it, both synced): a role change
 * is recorded by this one rename, so a crash leaves the volume in the old role or the new one.
 */
export async function rewriteRecord(dir: string, record: AnyVolumeRecord): Promise<void> {
  const temporary = join(dir, `.${volumeRecordName}.${suffix()}`);
  try {
    await writeFileDurably(temporary, `${JSON.stringify(record, null, 2)}\n`);
    await rename(temporary, join(dir, volumeRecordName));
  } catch (error) {
    await rm(temporary, { force: true });
    throw error;
  }
  await syncDirectory(dir);
}

/** The record of a volume changed to the secondary role: the engine's defaults for what the primary did not record. */
export function secondaryRecordOf(record: AnyVolumeRecord): VolumeRecord {
  if (!isPrimaryRecord(record)) return record;
  const defaults = volumeOptionsSchema.parse({ path: '-', dataDir: '-', sizeBytes: record.sizeBytes });
  return { name: record.name, role: 'secondary', sizeBytes: record.sizeBytes, blockBytes: defaults.blockBytes, strategy: 'gannet', createdAt: record.createdAt };
}

/** The record of a volume promoted to the primary role. */
export function primaryRecordOf(record: AnyVolumeRecord, promotedAt: string, peer?: string): PrimaryRecord {
  return { name: record.name, role: 'primary', sizeBytes: record.sizeBytes, createdAt: record.createdAt, promotedAt, ...(peer !== undefined && { peer }) };
}

/**
 * A role change commits in the engine (its role file in the volume's meta directory) and is then
 * recorded in volume.json. After a crash between the two, the engine's role wins: volume.json is
 * rewritten to it, so the volume opens in the role its files have.
 */
export async function reconcileRecord(dir: string, record: AnyVolumeRecord): Promise<AnyVolumeRecord> {
  const engineRole = await readRole(fileStorage, join(dir, metaDirName));
  const recorded = record.role ?? 'secondary';
  if (engineRole === null || engineRole.role === recorded) return record;
  const next = engineRole.role === 'primary' ? primaryRecordOf(record, engineRole.since) : secondaryRecordOf(record);
  await rewriteRecord(dir, next);
  return next;
}

/**
 * Every volume directory of the data directory, and the leftovers of interrupted work; `read` checks each
 * volume.json for the daemon's role (a volume of the other role is a problem, never opened).
 */
export async function scanVolumes(dataDir: string): Promise<Scan>;
export async function scanVolumes<R>(dataDir: string, read: (dir: string, name: string) => Promise<R>): Promise<Scan<R>>;
export async function scanVolumes<R>(
  dataDir: string,
  read: (dir: string, name: string) => Promise<R> = readVolumeRecord as unknown as (dir: string, name: string) => Promise<R>,
): Promise<Scan<R>> {
  const root = volumesRoot(dataDir);
  const scan: Scan<R> = { volumes: [], leftovers: [], unfinished: [] };
  let names: string[];
  try {
    names = await readdir(root);
  } catch (error) {
    if (errnoOf(error) === 'ENOENT') return scan;
    throw error;
  }
  for (const name of names.sort()) {
    const dir = join(root, name);
    if (name.startsWith(creatingPrefix) || name.startsWith(purgingPrefix)) {
      scan.leftovers.push(dir);
      continue;
    }
    // Not a name a volume can have (`lost+found` when volumes/ is a mount point, say).
    if (name.length > volumeNameLengthMax || !volumeNamePattern.test(name)) continue;
    if (!(await stat(dir)).isDirectory()) {
      scan.volumes.push({ name, dir, problem: `${dir} is not a directory` });
      continue;
    }
    const entries = await readdir(dir);
    if (entries.includes(creatingMarkerName)) {
      scan.unfinished.push({ name, dir });
      continue;
    }
    if (!entries.includes(volumeRecordName)) {
      const holds = entries.length === 0 ? 'is empty' : `holds ${entries.sort().join(', ')}`;
      scan.volumes.push({
        name,
        dir,
        problem: `${join(dir, volumeRecordName)} is missing (the directory ${holds}): restore it, or move the directory away`,
      });
      continue;
    }
    try {
      scan.volumes.push({ name, dir, record: await read(dir, name) });
    } catch (error) {
      scan.volumes.push({ name, dir, problem: (error as Error).message });
    }
  }
  return scan;
}

/** The engine options of a volume: its record's identity, then its recorded limits, then the config's. */
export function volumeOptions(dir: string, record: VolumeRecord, wanted: VolumeConfig = {}): ResolvedVolumeOptions {
  const limits: Partial<Record<(typeof volumeLimitFields)[number], number>> = { ...record.settings };
  for (const field of volumeLimitFields) if (wanted[field] !== undefined) limits[field] = wanted[field];
  return volumeOptionsSchema.parse({
    ...limits,
    sizeBytes: record.sizeBytes,
    blockBytes: record.blockBytes,
    strategy: record.strategy,
    path: join(dir, backingFileName),
    dataDir: join(dir, metaDirName),
  }) as ResolvedVolumeOptions;
}

/**
 * The record of a new volume. `settings` keeps the limits given at creation, for a volume the config
 * file does not name (one created through the API).
 */
export function newVolumeRecord(name: string, wanted: VolumeConfig, keepSettings: boolean): VolumeRecord {
  const options = volumeOptionsSchema.parse({ ...wanted, sizeBytes: wanted.sizeBytes ?? defaultVolumeSizeBytes, path: '-', dataDir: '-' });
  const settings: NonNullable<VolumeRecord['settings']> = {};
  for (const field of volumeLimitFields) if (wanted[field] !== undefined) settings[field] = wanted[field];
  return {
    name,
    role: 'secondary',
    sizeBytes: options.sizeBytes,
    blockBytes: options.blockBytes,
    strategy: options.strategy,
    createdAt: new Date().toISOString(),
    ...(keepSettings && Object.keys(settings).length > 0 && { settings }),
  };
}

/** Refuses configured values that contradict a volume's record, naming the field. */
export function checkIdentity(name: string, dir: string, record: VolumeRecord, wanted: VolumeConfig): void {
  for (const field of identityFields) {
    const value = wanted[field];
    if (value !== undefined && value !== record[field]) {
      throw new ConfigError(`volumes.${name}.${field}`, `is ${value} but the volume in ${dir} was created with ${record[field]} (it cannot change)`);
    }
  }
}

export interface VolumePlan {
  /** Volumes on disk, with the config's wishes for each (empty for those it does not name). */
  readonly existing: { readonly name: string; readonly dir: string; readonly record: VolumeRecord; readonly wanted: VolumeConfig }[];
  readonly broken: { readonly name: string; readonly dir: string; readonly problem: string }[];
  /** Configured volumes with no directory yet. */
  readonly create: { readonly name: string; readonly wanted: VolumeConfig }[];
  /** Groups whose members are all known volumes. */
  readonly groups: Map<string, string[]>;
}

/**
 * What the secondary role serves (see splitByRoles): every volume on disk plus every configured one;
 * group members may be volumes of the other role (`elsewhere`). Configured values that contradict a volume's
 * record, and groups naming unknown volumes, are refused with the field named.
 */
export function planVolumes(config: DaemonConfig, scan: Scan, elsewhere: ReadonlySet<string> = new Set()): VolumePlan {
  const configured = new Map(Object.entries(config.volumes));
  const plan: VolumePlan = { existing: [], broken: [], create: [], groups: new Map() };
  const onDisk = new Set<string>();
  for (const found of scan.volumes) {
    onDisk.add(found.name);
    if ('problem' in found) {
      plan.broken.push(found);
      continue;
    }
    const wanted = configured.get(found.name) ?? {};
    checkIdentity(found.name, found.dir, found.record, wanted);
    plan.existing.push({ name: found.name, dir: found.dir, record: found.record, wanted });
  }
  for (const [name, wanted] of configured) if (!onDisk.has(name)) plan.create.push({ name, wanted });
  const known = new Set([...onDisk, ...configured.keys(), ...elsewhere]);
  for (const [group, members] of Object.entries(config.groups)) {
    if (known.has(group)) throw new ConfigError(`groups.${group}`, `"${group}" is also a volume's name`);
    members.forEach((member, index) => {
      if (!known.has(member)) throw new ConfigError(`groups.${group}.${index}`, `no volume "${member}" (neither configured nor in ${volumesRoot(config.dataDir)})`);
    });
    plan.groups.set(group, members);
  }
  return plan;
}

/** One role's share of the data directory and the config, for its volume set's start. */
export interface RoleShare<R> {
  /** The config with the volumes this role opens or creates. */
  readonly config: DaemonConfig;
  readonly scan: Scan<R>;
}

/**
 * Splits the volumes on disk by the role their volume.json records, and the configured volumes not on
 * disk (created in the default role). A volume whose record cannot be read goes to the default role's
 * set, which shows it in state `error`. `vol0` of 1 GiB is created when the data directory holds no
 * volume at all and none is configured. Leftovers are for the caller to remove, once.
 */
export function splitByRoles(config: DaemonConfig, scan: Scan<AnyVolumeRecord>): { secondary: RoleShare<VolumeRecord>; primary: RoleShare<PrimaryRecord> } {
  const defaultRole = config.role;
  const secondary: DiskVolume<VolumeRecord>[] = [];
  const primary: DiskVolume<PrimaryRecord>[] = [];
  const roleOf = new Map<string, Role>();
  for (const found of scan.volumes) {
    const record = 'record' in found ? found.record : null;
    if (record !== null && isPrimaryRecord(record)) {
      primary.push({ name: found.name, dir: found.dir, record });
      roleOf.set(found.name, 'primary');
    } else if (record !== null) {
      secondary.push({ name: found.name, dir: found.dir, record });
      roleOf.set(found.name, 'secondary');
    } else if ('problem' in found) {
      (defaultRole === 'primary' ? primary : secondary).push(found);
      roleOf.set(found.name, defaultRole);
    }
  }
  const configured = Object.keys(config.volumes).length === 0 && scan.volumes.length === 0 ? { [defaultVolumeName]: {} } : config.volumes;
  const share = (role: Role) =>
    Object.fromEntries(Object.entries(configured).filter(([name]) => (roleOf.get(name) ?? defaultRole) === role));
  const empty = { leftovers: [], unfinished: [] };
  return {
    secondary: { config: { ...config, volumes: share('secondary') }, scan: { volumes: secondary, ...empty } },
    primary: { config: { ...config, volumes: share('primary'), groups: {} }, scan: { volumes: primary, ...empty } },
  };
}

async function writeFileDurably(file: string, text: string): Promise<void> {
  const handle = await open(file, 'wx', 0o644);
  try {
    await handle.writeFile(text);
    await handle.sync();
  } finally {
    await handle.close();
  }
}

export async function syncDirectory(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await lstat(path);
    return true;
  } catch (error) {
    if (errnoOf(error) === 'ENOENT') return false;
    throw error;
  }
}

const suffix = () => randomBytes(randomSuffixBytes).toString('hex');

/**
 * Makes the directory of a new volume: its record and the creation marker are written in a temporary
 * directory, which is then renamed into place. The caller has the engine create the volume's files there
 * and then calls `finishCreation`, or `discardVolume` on failure.
 */
export async function createVolumeDir(dataDir: string, record: VolumeRecord | PrimaryRecord): Promise<string> {
  const root = volumesRoot(dataDir);
  await mkdir(root, { recursive: true });
  const dir = volumeDir(dataDir, record.name);
  // rename() replaces an empty directory without a word.
  if (await exists(dir)) throw new Error(`${dir} already exists`);
  const temporary = join(root, `${creatingPrefix}${record.name}-${suffix()}`);
  await mkdir(temporary);
  try {
    await writeFileDurably(join(temporary, volumeRecordName), `${JSON.stringify(record, null, 2)}\n`);
    await writeFileDurably(join(temporary, creatingMarkerName), '');
    await syncDirectory(temporary);
    await rename(temporary, dir);
    await syncDirectory(root);
  } catch (error) {
    await rm(temporary, { recursive: true, force: true });
    throw error;
  }
  return dir;
}

/** The engine made the volume's files: from here on the directory is a volume. */
export async function finishCreation(dir: string): Promise<void> {
  await unlink(join(dir, creatingMarkerName));
  await syncDirectory(dir);
}

/** Deletes a volume directory; renamed out of the way first, so a crash part way leaves no half volume. */
export async function discardVolume(dataDir: string, dir: string, name: string): Promise<void> {
  const root = volumesRoot(dataDir);
  const doomed = join(root, `${purgingPrefix}${name}-${suffix()}`);
  await rename(dir, doomed);
  await syncDirectory(root);
  await rm(doomed, { recursive: true, force: true });
}

/**
 * Why the volume directory `dir` cannot be renamed, if it cannot: a mount point (or a directory on
 * another file system than volumes/) can only be emptied, which a delete must not do half way.
 */
export async function unmovable(dataDir: string, dir: string): Promise<string | undefined> {
  const [own, parent] = await Promise.all([stat(dir), stat(volumesRoot(dataDir))]);
  if (own.dev !== parent.dev) return `${dir} is a mount point (or on another file system than ${volumesRoot(dataDir)}), which cannot be moved aside or purged`;
  return undefined;
}

/** Moves a deleted volume to DATA_DIR/volumes/.deleted/NAME.TIMESTAMP; returns where. */
export async function moveAside(dataDir: string, dir: string, name: string): Promise<string> {
  const deleted = join(volumesRoot(dataDir), deletedDirName);
  await mkdir(deleted, { recursive: true, mode: 0o700 });
  const target = join(deleted, `${name}.${new Date().toISOString().replace(/[:.]/g, '-')}`);
  if (await exists(target)) throw new Error(`${target} already exists`);
  await rename(dir, target);
  await syncDirectory(deleted);
  await syncDirectory(volumesRoot(dataDir));
  return target;
}

/** Removes what interrupted creations and purges left (see scanVolumes). */
export async function removeLeftovers(dataDir: string, scan: Scan<unknown>): Promise<void> {
  for (const dir of scan.leftovers) await rm(dir, { recursive: true, force: true });
  for (const { name, dir } of scan.unfinished) await discardVolume(dataDir, dir, name);
}
