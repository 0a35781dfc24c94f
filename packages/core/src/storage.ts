import { FileDevice, type BlockDevice } from '@gannet/block-device';
import { GannetError } from './errors.js';
import { MetaStore } from './meta.js';

/**
 * The storage seam: where a volume's durable state lives. The engine reads and writes its backing file
 * only as a BlockDevice and its metadata only through MetaStore, both opened here, so a test can hand it
 * a decorated device (faults, delays, holds: @gannet/block-device's FaultDevice) without any test hook
 * in the engine itself.
 */
export interface Storage {
  /**
   * The backing file at `path`: created sparse at `sizeBytes` when missing and `create` is set; an
   * existing file must have exactly that size.
   */
  openBacking(path: string, sizeBytes: number, options: { create: boolean }): Promise<BlockDevice>;
  /** The metadata store at `location` (a directory). */
  openMeta(location: string): Promise<MetaStore>;
}

/** Real files: a FileDevice (reads past its end give zeroes) and a LevelDB store. */
export const fileStorage: Storage = {
  async openBacking(path, sizeBytes, options) {
    try {
      return await FileDevice.open(path, options.create ? { create: sizeBytes, atEnd: 'zero-fill' } : { size: sizeBytes, atEnd: 'zero-fill' });
    } catch (err) {
      throw new GannetError('EMISMATCH', `backing file ${path} cannot be used: ${(err as Error).message}`, { cause: err });
    }
  },
  openMeta: (location) => MetaStore.open(location),
};
