import { mkdir } from 'node:fs/promises';
import { dirname } from 'node:path';
import { BlockDeviceError, FileDevice } from '@gannet/block-device';
import { GannetError } from '../errors.js';
import { diskViewCapabilities, VolumeView, type ViewRole } from '../view.js';

const readOnlyDiskViewCapabilities = Object.freeze({ ...diskViewCapabilities, readOnly: true });

/** What the disk baselines (colo, passthrough) do per view; zeroes and trims come as `data` null. */
export interface DiskViewOps {
  read(buf: Uint8Array, offset: number): Promise<void>;
  write(data: Uint8Array | null, offset: number, length: number, fua: boolean): Promise<void>;
  flush(): Promise<void>;
}

/**
 * A view of a disk baseline: the one VolumeView, with the capabilities these strategies have (flush and
 * FUA are fdatasync, zeroes are written, no cache hint, no allocation map), read-only while `readOnly()`
 * (the primary view after failover).
 */
export function diskView(role: ViewRole, size: number, blockBytes: number, ops: DiskViewOps, readOnly: () => boolean): VolumeView {
  const unsupported = () => Promise.reject(new BlockDeviceError('ENOTSUP', `${role} view: not offered by this strategy`));
  return new VolumeView(role, size, blockBytes, {
    capabilities: () => (readOnly() ? readOnlyDiskViewCapabilities : diskViewCapabilities),
    read: (_role, buf, offset) => ops.read(buf, offset),
    write: (_role, src, offset, length, options) => ops.write(src, offset, length, options.fua),
    flush: () => ops.flush(),
    extents: unsupported,
    cache: unsupported,
  });
}

/** The volume's backing file: created sparse at `sizeBytes` when missing, else it must have that size. */
export async function openBackingFile(path: string, sizeBytes: number): Promise<FileDevice> {
  try {
    return await FileDevice.open(path, { create: sizeBytes });
  } catch (err) {
    throw new GannetError('EMISMATCH', `backing file ${path} cannot be used: ${(err as Error).message}`, { cause: err });
  }
}

/** A scratch file (COLO's hidden and active disks): always empty, sparse, `sizeBytes` long. */
export async function openScratchFile(path: string, sizeBytes: number): Promise<FileDevice> {
  await mkdir(dirname(path), { recursive: true });
  return FileDevice.open(path, { create: sizeBytes, truncate: true });
}
