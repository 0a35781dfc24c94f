import { randomUUID } from 'node:crypto';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { BlockDevice } from '@gannet/block-device';
import { epochLeaseCount } from './epochs.js';
import { GannetError } from './errors.js';
import { journalFileName } from './journal.js';
import { forgetGeneration, type Generation } from './generation.js';
import { MetaStore, type Identity, type Inconsistent, type LostFailover, type PersistedMeta } from './meta.js';
import type { ResolvedVolumeOptions } from './options.js';
import { mergeRanges } from './ranges.js';
import { checkRole } from './role-file.js';
import { VolumeStateFile, type VolumeStateRecord } from './state-file.js';
import type { Storage } from './storage.js';
import type { ByteRange, SplitBrain } from './types.js';

/** Name of the volume's metadata directory inside dataDir. */
export const metaDirName = 'gannet-meta';

/** What opening found, for the engine to start from. */
export interface Opened {
  readonly meta: MetaStore;
  readonly backing: BlockDevice;
  readonly stateFile: VolumeStateFile;
  readonly record: VolumeStateRecord;
  readonly epoch: number;
  readonly durableEpoch: number;
  readonly epochCeiling: number;
  readonly torn: ByteRange[];
  readonly lostFailover: LostFailover | null;
  readonly inconsistent: Inconsistent | null;
  readonly generation: Generation | null;
  readonly splitBrain: SplitBrain | null;
}

/**
 * Opens a volume's files, creating them only for a volume that has none of them, and checks them against
 * each other. The state file and the metadata store must name the same volume (uuid, geometry) and agree
 * on where its lifecycle stands, allowing for the one step a crash can leave between them (the state file
 * is written first at a failover's commit, the metadata first at its request). Anything else is refused
 * with the file named: a volume that exists is never mistaken for a new one, and damaged metadata is
 * never silently reset (`recover` rebuilds it from the state file, by an operator's choice).
 */
export async function openFiles(options: ResolvedVolumeOptions, storage: Storage): Promise<Opened> {
  await mkdir(options.dataDir, { recursive: true });
  await checkRole(storage, options.dataDir, 'secondary');
  const stateFile = new VolumeStateFile(storage, options.dataDir);
  const metaLocation = join(options.dataDir, metaDirName);
  let record = await stateFile.read();
  const metaExists = await storage.exists(metaLocation);
  const backingExists = await storage.exists(options.path);
  if (record === null && !metaExists && backingExists) {
    throw new GannetError(
      'EMETA',
      `the backing file ${options.path} exists but the volume has no state file (${stateFile.path}) and no metadata store: ` +
        'refusing to take it for a new volume; move it away to create one, or restore the volume files',
    );
  }
  if (record !== null && !metaExists) {
    throw new GannetError('EMETA', `the metadata store ${metaLocation} of the volume in ${stateFile.path} is missing (recover it to go on)`);
  }
  const meta = new MetaStore(await storage.openMeta(metaLocation, { create: record === null }), metaLocation);
  let backing: BlockDevice | null = null;
  try {
    const persisted = await meta.load();
    const fresh = persisted.identity === null;
    if (record === null) {
      record = await adopt(options, meta, stateFile, persisted, backingExists);
    } else {
      checkIdentity(options, record, persisted.identity, meta.location, stateFile.path);
      if (persisted.legacyIdentity) await meta.putIdentity(identityOf(record));
    }
    if (!(await storage.exists(options.path)) && persisted.identity !== null) {
      throw new GannetError('EMETA', `the backing file ${options.path} of the volume in ${stateFile.path} is missing`);
    }
    backing = await storage.openBacking(options.path, options.sizeBytes, { create: fresh });
    const { lostFailover, generation, inconsistent } = await reconcileLifecycle(record, persisted, meta, storage, options, stateFile.path);
    const epoch = fresh ? 0 : Math.max(persisted.epochCeiling, persisted.durableEpoch, record.epochCeiling) + 1;
    const epochCeiling = epoch + epochLeaseCount;
    const torn = record.lifecycle === 'failed-over' ? [] : mergeRanges([...persisted.torn, ...persisted.flushing]);
    record = { ...record, epochCeiling };
    await stateFile.write(record);
    if (record.lifecycle === 'replicating') await meta.reopen(torn, epochCeiling);
    else await meta.putEpochCeiling(epochCeiling);
    await meta.clearLegacy();
    return {
      meta,
      backing,
      stateFile,
      record,
      epoch,
      durableEpoch: persisted.durableEpoch,
      epochCeiling,
      torn,
      lostFailover,
      inconsistent: record.lifecycle === 'replicating' ? inconsistent : null,
      generation,
      splitBrain: persisted.splitBrain,
    };
  } catch (err) {
    await backing?.close().catch(() => undefined);
    await meta.close().catch(() => undefined);
    throw err;
  }
}

/**
 * A volume with metadata but no state file yet: new (its store was just made, or a creation stopped
 * before the state file), or written by a version without state files. Either way the state file is
 * made from what the metadata says.
 */
async function adopt(
  options: ResolvedVolumeOptions,
  meta: MetaStore,
  stateFile: VolumeStateFile,
  persisted: PersistedMeta,
  backingExists: boolean,
): Promise<VolumeStateRecord> {
  if (persisted.identity === null && backingExists) {
    throw new GannetError('EMETA', `the backing file ${options.path} exists but its metadata store ${meta.location} records no volume`);
  }
  const identity: Identity = persisted.identity?.uuid
    ? persisted.identity
    : { uuid: randomUUID(), sizeBytes: persisted.identity?.sizeBytes ?? options.sizeBytes, blockBytes: persisted.identity?.blockBytes ?? options.blockBytes };
  if (persisted.identity !== null) checkIdentity(options, identity, persisted.identity, meta.location, stateFile.path);
  const failedOver = persisted.state === 'failed-over';
  const record: VolumeStateRecord = {
    format: 1,
    uuid: identity.uuid,
    sizeBytes: identity.sizeBytes,
    blockBytes: identity.blockBytes,
    createdAt: new Date().toISOString(),
    lifecycle: failedOver ? 'failed-over' : 'replicating',
    target: failedOver ? persisted.target : null,
    journal: null,
    epochCeiling: persisted.epochCeiling,
    resync: null,
  };
  if (persisted.identity === null) await meta.create(identity, epochLeaseCount, { epoch: 0, torn: [] });
  else if (!persisted.identity.uuid) await meta.putIdentity(identity);
  await stateFile.write(record);
  return record;
}

interface Reconciled {
  readonly lostFailover: LostFailover | null;
  readonly generation: Generation | null;
  readonly inconsistent: Inconsistent | null;
}

/** Brings state file and metadata back in step after a crash between their writes; refuses what no crash explains. */
async function reconcileLifecycle(
  record: VolumeStateRecord,
  persisted: PersistedMeta,
  meta: MetaStore,
  storage: Storage,
  options: ResolvedVolumeOptions,
  statePath: string,
): Promise<Reconciled> {
  const journalPath = join(options.dataDir, journalFileName);
  const { generation, inconsistent } = persisted;
  if (record.lifecycle === 'replicating') {
    if (persisted.state === 'failed-over' && persisted.discard !== null) {
      // A discard committed (the state file says replicating) and stopped before its last batch.
      const discarded = forgetGeneration(generation ?? { current: null, history: [] });
      const mark = { since: persisted.discard.at };
      await meta.recordDiscarded(discarded, mark);
      await storage.removeFile(journalPath);
      return { lostFailover: null, generation: discarded, inconsistent: mark };
    }
    if (persisted.state === 'failed-over') {
      throw new GannetError('EMETA', `${meta.location} says failed over but the state file ${statePath} says replicating: one of them is damaged`);
    }
    if (persisted.state === 'failover-pending') {
      // Requested, but the process stopped before it was durable: the volume is at its checkpoint, and
      // at the generation it had then.
      const lost: LostFailover = { target: persisted.target!, requestedAt: persisted.failoverAt ?? 'unknown', lostAt: new Date().toISOString() };
      await meta.recordFailoverLost(lost, persisted.generationBefore);
      await storage.removeFile(journalPath);
      return { lostFailover: lost, generation: persisted.generationBefore, inconsistent };
    }
    return { lostFailover: persisted.lostFailover, generation, inconsistent };
  }
  if (persisted.state === 'replicating') {
    throw new GannetError('EMETA', `the state file ${statePath} says failed over to ${record.target} but ${meta.location} says replicating: one of them is damaged`);
  }
  if (persisted.state === 'failover-pending' || persisted.target !== record.target) {
    if (persisted.target !== record.target) {
      throw new GannetError('EMETA', `the state file ${statePath} and ${meta.location} name different failover targets (${record.target}, ${persisted.target})`);
    }
    await meta.recordFailedOver(record.target!);
  }
  if (record.journal === null) await storage.removeFile(journalPath);
  return { lostFailover: null, generation, inconsistent: null };
}

function identityOf(record: VolumeStateRecord): Identity {
  return { uuid: record.uuid, sizeBytes: record.sizeBytes, blockBytes: record.blockBytes };
}

function checkIdentity(
  options: ResolvedVolumeOptions,
  record: Pick<VolumeStateRecord, 'uuid' | 'sizeBytes' | 'blockBytes'>,
  stored: Identity | null,
  metaLocation: string,
  statePath: string,
): void {
  if (stored === null) throw new GannetError('EMETA', `the metadata store ${metaLocation} records no volume, but ${statePath} does`);
  if (stored.uuid && stored.uuid !== record.uuid) {
    throw new GannetError('EMETA', `the metadata store ${metaLocation} belongs to volume ${stored.uuid}, the state file ${statePath} to ${record.uuid}`);
  }
  if (stored.sizeBytes !== record.sizeBytes || stored.blockBytes !== record.blockBytes) {
    throw new GannetError('EMETA', `the metadata store ${metaLocation} and the state file ${statePath} disagree on the volume's geometry`);
  }
  if (record.sizeBytes !== options.sizeBytes || record.blockBytes !== options.blockBytes) {
    throw new GannetError(
      'EMISMATCH',
      `dataDir ${options.dataDir} holds a volume of sizeBytes ${record.sizeBytes} blockBytes ${record.blockBytes}, ` +
        `options say sizeBytes ${options.sizeBytes} blockBytes ${options.blockBytes}`,
    );
  }
}

/** What `recover` did. */
export interface Recovered {
  readonly lifecycle: 'replicating' | 'failed-over';
  /** Where the unreadable metadata store was moved, if there was one. */
  readonly movedTo: string | null;
  /** Whether the whole disk now needs a resync from the primary (a replicating volume lost its epochs). */
  readonly fullResync: boolean;
}

/**
 * Rebuilds a volume's metadata store from its state file, for a volume whose store is missing or
 * damaged. The old store is moved aside, not deleted. A failed-over volume is the plain disk it became
 * (a committed journal stays and is applied when it opens). A replicating one reopens at its backing
 * file's content, above every epoch it handed out, with the whole disk torn: it needs a full resync.
 */
export async function recoverFiles(options: ResolvedVolumeOptions, storage: Storage): Promise<Recovered> {
  await checkRole(storage, options.dataDir, 'secondary');
  const stateFile = new VolumeStateFile(storage, options.dataDir);
  const record = await stateFile.read();
  if (record === null) throw new GannetError('EMETA', `there is no state file ${stateFile.path} to recover the volume from`);
  const location = join(options.dataDir, metaDirName);
  let movedTo: string | null = null;
  if (await storage.exists(location)) {
    movedTo = `${location}.damaged-${new Date().toISOString().replace(/[:.]/g, '-')}`;
    await storage.rename(location, movedTo);
  }
  const meta = new MetaStore(await storage.openMeta(location, { create: true }), location);
  try {
    const ceiling = record.epochCeiling + epochLeaseCount;
    const fullResync = record.lifecycle === 'replicating';
    const torn = fullResync ? [{ offset: 0, length: record.sizeBytes }] : [];
    await meta.create(identityOf(record), ceiling, { epoch: record.epochCeiling, torn });
    if (record.lifecycle === 'failed-over') await meta.recordFailedOver(record.target!);
    await stateFile.write({ ...record, epochCeiling: ceiling, resync: fullResync ? 'full' : record.resync });
    return { lifecycle: record.lifecycle, movedTo, fullResync };
  } finally {
    await meta.close();
  }
}

/**
 * Makes a secondary volume's files (metadata store, state file) for a disk that exists already (a
 * demoted primary's, role-change.ts): replicating at epoch 0, its generation's current id unknown (the
 * lineage kept in the history) and marked inconsistent, so the first primary gives it a full digest
 * sync and failover onto it is refused until that sync is durable. Leftovers of an earlier attempt are
 * replaced; the caller commits by the role file.
 */
export async function createSecondaryFiles(
  options: ResolvedVolumeOptions,
  storage: Storage,
  init: { uuid: string; generation: Generation },
): Promise<void> {
  await mkdir(options.dataDir, { recursive: true });
  if (!(await storage.exists(options.path))) throw new GannetError('EMETA', `the backing file ${options.path} is missing: there is no disk to make a secondary of`);
  const location = join(options.dataDir, metaDirName);
  const meta = new MetaStore(await storage.openMeta(location, { create: true }), location);
  try {
    const identity: Identity = { uuid: init.uuid, sizeBytes: options.sizeBytes, blockBytes: options.blockBytes };
    await meta.create(identity, epochLeaseCount, { epoch: 0, torn: [] });
    const since = new Date().toISOString();
    await meta.putAdopted(forgetGeneration(init.generation), { since });
    await new VolumeStateFile(storage, options.dataDir).write({
      format: 1,
      uuid: init.uuid,
      sizeBytes: options.sizeBytes,
      blockBytes: options.blockBytes,
      createdAt: since,
      lifecycle: 'replicating',
      target: null,
      journal: null,
      epochCeiling: epochLeaseCount,
      resync: null,
    });
  } finally {
    await meta.close();
  }
}

/**
 * Discards a closed secondary volume's data (the side an operator gives up after a split brain): a
 * failed-over one becomes a replicating secondary on its own disk again, a replicating one stays so; its
 * generation's current id becomes unknown and the disk is marked inconsistent, so the next primary gives
 * it a full digest sync. A failed-over volume changes in three steps, crash-safe: the intent in the
 * metadata, the state file (the commit: from here an open finishes the discard), the metadata.
 */
export async function discardFiles(options: ResolvedVolumeOptions, storage: Storage): Promise<void> {
  const stateFile = new VolumeStateFile(storage, options.dataDir);
  const record = await stateFile.read();
  if (record === null) throw new GannetError('EMETA', `${options.dataDir} holds no secondary volume (no ${stateFile.path})`);
  if (record.journal !== null) {
    throw new GannetError('ESTATE', `the failover of the volume in ${options.dataDir} is not applied to its disk yet: open it until it is (its FLUSH returns), close it, then discard`);
  }
  const location = join(options.dataDir, metaDirName);
  const meta = new MetaStore(await storage.openMeta(location, { create: false }), location);
  try {
    const persisted = await meta.load();
    checkIdentity(options, record, persisted.identity, meta.location, stateFile.path);
    const discarded = forgetGeneration(persisted.generation ?? { current: null, history: [] });
    const at = new Date().toISOString();
    if (record.lifecycle === 'replicating') {
      if (persisted.state !== 'replicating') {
        // A discard that committed and stopped before its last batch: finish it.
        if (persisted.discard === null) throw new GannetError('ESTATE', `${meta.location} says ${persisted.state} while the state file ${stateFile.path} says replicating: open the volume once to settle it, close it, then discard`);
        await meta.recordDiscarded(discarded, { since: persisted.discard.at });
        return;
      }
      await meta.putAdopted(discarded, persisted.inconsistent ?? { since: at });
      return;
    }
    await meta.recordDiscardBegun(at);
    const { failoverRequestedAt: _requested, ...rest } = record;
    await stateFile.write({ ...rest, lifecycle: 'replicating', target: null, journal: null });
    await meta.recordDiscarded(discarded, { since: at });
    await storage.removeFile(join(options.dataDir, journalFileName));
  } finally {
    await meta.close();
  }
}
