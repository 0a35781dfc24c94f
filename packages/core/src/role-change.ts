import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { spillDir } from './engine.js';
import { GannetError } from './errors.js';
import { nextGeneration } from './generation.js';
import { journalFileName } from './journal.js';
import { createSecondaryFiles, discardFiles, metaDirName } from './lifecycle.js';
import type { Peer } from './link.js';
import type { PrimaryOptions, VolumeOptions } from './options.js';
import { parseVolumeOptions } from './parse.js';
import { createPrimaryMeta, PrimaryVolume, primaryMetaDirName, readPrimaryMeta, type PrimaryOpenContext } from './primary.js';
import { readRole, writeRole } from './role-file.js';
import { stateFileName } from './state-file.js';
import { fileStorage, type Storage } from './storage.js';
import type { ReplicatedVolume } from './volume.js';

/**
 * Moving a volume between roles on one host, on the same backing file and dataDir. Each change builds
 * the new role's metadata beside the old role's (their names differ: role-file.ts) while the role file
 * still names the old role, then rewrites the role file (the commit), then removes the old role's files.
 * A crash before the commit leaves the old role whole (the half-built files are replaced by the next
 * attempt); after it, the new role is complete and the old role's open is refused. Each function may be
 * called again after a crash.
 */

/** The primary's options a promotion takes; the disk, its size and its dataDir are the secondary's. */
export type PromoteOptions = Omit<PrimaryOptions, 'path' | 'sizeBytes' | 'dataDir' | 'adoptBacking'>;

/**
 * Promotes a failed-over secondary to the primary of its volume: waits until its kept state and every
 * write are in the backing file (its FLUSH), closes it, and opens a PrimaryVolume on the same disk and
 * dataDir with the same volume uuid, its generation moved on from the secondary's (it became primary),
 * connecting to `peer`. Its first peer gets a full digest sync. The secondary's views answer ESHUTDOWN
 * from the close on: whoever serves them holds its clients' requests and sends them to the primary's
 * device once this resolves. If it rejects after the close, the dir still holds the secondary (reopen
 * it, or call this again on the reopened volume) unless the role file already names the primary (then
 * open the PrimaryVolume).
 */
export async function promoteToPrimary(volume: ReplicatedVolume, peer: Peer, options: PromoteOptions = {}, context: PrimaryOpenContext = {}): Promise<PrimaryVolume> {
  const storage = context.storage ?? fileStorage;
  const stats = volume.stats();
  if (stats.state !== 'failed-over') throw new GannetError('ESTATE', `promote: the volume is ${stats.state}: only a failed-over secondary becomes primary`);
  const { path, dataDir, sizeBytes } = volume.options;
  await volume.secondary.flush();
  await volume.close();
  const generation = stats.generation ?? null;
  if (generation === null || generation.current === null) {
    throw new GannetError('ESTATE', 'promote: the failed-over volume has no generation (it failed over before generations were kept)');
  }
  if ((await readRole(storage, dataDir)) === null) await writeRole(storage, dataDir, 'secondary');
  await removeTree(join(dataDir, primaryMetaDirName));
  await createPrimaryMeta(storage, dataDir, { uuid: stats.volumeId!, sizeBytes, generation: nextGeneration(generation) });
  await writeRole(storage, dataDir, 'primary');
  await removeSecondaryFiles(storage, dataDir);
  return PrimaryVolume.open({ ...options, path, sizeBytes, dataDir }, peer, { storage });
}

/**
 * Turns a closed primary volume into a secondary on the same disk and dataDir (same uuid): a stale copy
 * whose generation's current id is unknown (the lineage kept in its history), marked inconsistent, so the
 * next primary that attaches gives it a full digest sync, which sends only the chunks that differ. This is
 * also how a primary's changes are discarded after a split brain. `options` are the secondary's
 * (ReplicatedVolume.open takes the same afterwards). Called again after it committed, it only removes what
 * is left of the primary.
 */
export async function demoteToSecondary(input: VolumeOptions, context: { storage?: Storage } = {}): Promise<void> {
  const storage = context.storage ?? fileStorage;
  const options = parseVolumeOptions(input);
  const { dataDir } = options;
  const role = await readRole(storage, dataDir);
  if (role?.role === 'secondary') {
    await removeTree(join(dataDir, primaryMetaDirName));
    return;
  }
  const primary = await readPrimaryMeta(storage, dataDir);
  if (primary.sizeBytes !== options.sizeBytes) {
    throw new GannetError('EMISMATCH', `demote: the primary volume in ${dataDir} is ${primary.sizeBytes} bytes, the options say ${options.sizeBytes}`);
  }
  if (role === null) await writeRole(storage, dataDir, 'primary');
  await removeSecondaryFiles(storage, dataDir);
  await createSecondaryFiles(options, storage, { uuid: primary.uuid, generation: primary.generation });
  await writeRole(storage, dataDir, 'secondary');
  await removeTree(join(dataDir, primaryMetaDirName));
}

/**
 * Discards a closed secondary's data after a split brain (`resolve --discard-local` on the secondary's
 * host): a failed-over volume becomes a replicating secondary on its own disk again, with its
 * generation unknown, so the primary that attaches next gives it a full digest sync. Its exports must
 * not be serving a VM any more: that is the caller's to ensure. For a primary, use demoteToSecondary.
 */
export async function discardSecondary(input: VolumeOptions, context: { storage?: Storage } = {}): Promise<void> {
  const storage = context.storage ?? fileStorage;
  const options = parseVolumeOptions(input);
  const role = await readRole(storage, options.dataDir);
  if (role !== null && role.role !== 'secondary') throw new GannetError('ESTATE', `discard: ${options.dataDir} holds the ${role.role} role: demote it instead`);
  await discardFiles(options, storage);
}

async function removeSecondaryFiles(storage: Storage, dataDir: string): Promise<void> {
  await removeTree(join(dataDir, metaDirName));
  await removeTree(spillDir(dataDir));
  await storage.removeFile(join(dataDir, journalFileName));
  await storage.removeFile(join(dataDir, stateFileName));
}

function removeTree(path: string): Promise<void> {
  return rm(path, { recursive: true, force: true });
}
