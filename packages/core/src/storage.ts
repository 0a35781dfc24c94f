import { open, readFile, rename, unlink } from 'node:fs/promises';
import { dirname } from 'node:path';
import { FileDevice, type BlockDevice } from '@gannet/block-device';
import { GannetError } from './errors.js';
import { openLevelKv, type KvStore } from './kv.js';

/**
 * The storage seam: everything of a volume that must survive a crash goes through here (the backing
 * file, the metadata store, the state file, the failover journal), so a test can put a simulated storage
 * under the engine that loses unsynced writes at a simulated power cut, or decorate the backing file with
 * faults (@gannet/block-device's FaultDevice), with no test hook in the engine itself. Spill files are
 * scratch (removed at every open) and stay plain files.
 */
export interface Storage {
  /**
   * The backing file at `path`: created sparse at `sizeBytes` when `create` is set and it is missing; an
   * existing file must have exactly that size.
   */
  openBacking(path: string, sizeBytes: number, options: { create: boolean }): Promise<BlockDevice>;
  /** The metadata store at `location` (a directory); `create` makes it when missing. */
  openMeta(location: string, options: { create: boolean }): Promise<KvStore>;
  /** A small file's whole content, or undefined when it does not exist. */
  readFile(path: string): Promise<Uint8Array | undefined>;
  /** Replaces a small file so that a crash leaves the old content or the new, never a mix. */
  writeFileAtomic(path: string, data: Uint8Array): Promise<void>;
  /** A new file of exactly `sizeBytes` (replacing one of that name), written through its device. */
  createFile(path: string, sizeBytes: number): Promise<BlockDevice>;
  /** An existing file, read-only. */
  openFile(path: string): Promise<BlockDevice>;
  /** Makes the directory's entries (a file just created) durable. */
  syncDirectory(dir: string): Promise<void>;
  removeFile(path: string): Promise<void>;
  /** Renames a file or directory (a damaged metadata store is moved aside, never deleted). */
  rename(from: string, to: string): Promise<void>;
  exists(path: string): Promise<boolean>;
}

async function syncDirectory(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

async function createSynced(path: string, sizeBytes: number): Promise<void> {
  const handle = await open(path, 'wx', 0o644);
  try {
    await handle.truncate(sizeBytes);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await syncDirectory(dirname(path));
}

/** Real files: FileDevices (reads past the backing file's end give zeroes), LevelDB, fsync and rename. */
export const fileStorage: Storage = {
  async openBacking(path, sizeBytes, options) {
    try {
      // A new backing file is made durable, size and directory entry, before the state file names it.
      if (options.create && !(await fileStorage.exists(path))) await createSynced(path, sizeBytes);
      return await FileDevice.open(path, { size: sizeBytes, atEnd: 'zero-fill' });
    } catch (err) {
      throw new GannetError('EMISMATCH', `backing file ${path} cannot be used: ${(err as Error).message}`, { cause: err });
    }
  },
  openMeta: (location, options) => openLevelKv(location, { createIfMissing: options.create }),
  async readFile(path) {
    try {
      return await readFile(path);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
  },
  async writeFileAtomic(path, data) {
    const temporary = `${path}.tmp`;
    const handle = await open(temporary, 'w', 0o644);
    try {
      await handle.writeFile(data);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(temporary, path);
    await syncDirectory(dirname(path));
  },
  createFile: (path, sizeBytes) => FileDevice.open(path, { create: sizeBytes, truncate: true }),
  openFile: (path) => FileDevice.open(path, { readOnly: true }),
  syncDirectory,
  async removeFile(path) {
    try {
      await unlink(path);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
  },
  rename: (from, to) => rename(from, to),
  async exists(path) {
    try {
      const handle = await open(path, 'r');
      await handle.close();
      return true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw err;
    }
  },
};
