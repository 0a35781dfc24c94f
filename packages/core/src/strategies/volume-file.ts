import { mkdir, open, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { constants } from 'node:fs';
import { GannetError } from '../errors.js';

/**
 * A fixed-size file that the disk strategies (passthrough, colo) read and write at offsets: positional
 * I/O that loops until the whole range is done, fdatasync that is skipped when no write completed since
 * the last one, and truncate-based emptying. Holes read as zeroes, so a sparse file is a zeroed disk.
 */

/** Zeroes are written from one shared, never-written buffer in chunks of this size. */
export const zeroChunkBytes = 1024 * 1024;
const zeroChunk = new Uint8Array(zeroChunkBytes);

export class VolumeFile {
  readonly path: string;
  readonly sizeBytes: number;
  private readonly handle: FileHandle;
  /** Completed writes so far and at the start of the last finished fdatasync: equal means clean. */
  private writeGeneration = 0;
  private syncedGeneration = 0;

  private constructor(path: string, handle: FileHandle, sizeBytes: number) {
    this.path = path;
    this.handle = handle;
    this.sizeBytes = sizeBytes;
  }

  /**
   * Opens the backing file of a volume: created sparse at `sizeBytes` when missing; an existing file
   * must have exactly that size, because a silently resized disk is a corrupted one.
   */
  static async openBacking(path: string, sizeBytes: number): Promise<VolumeFile> {
    let handle: FileHandle;
    try {
      handle = await open(path, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL, 0o644);
      await handle.truncate(sizeBytes);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
      handle = await open(path, constants.O_RDWR);
      const { size } = await handle.stat();
      if (size !== sizeBytes) {
        await handle.close();
        throw new GannetError('EMISMATCH', `${path}: backing file is ${size} bytes, the volume is ${sizeBytes} bytes`);
      }
    }
    return new VolumeFile(path, handle, sizeBytes);
  }

  /** Opens a scratch file (COLO's hidden and active disks): always empty, sparse, `sizeBytes` long. */
  static async openScratch(path: string, sizeBytes: number): Promise<VolumeFile> {
    await mkdir(dirname(path), { recursive: true });
    const handle = await open(path, constants.O_RDWR | constants.O_CREAT | constants.O_TRUNC, 0o600);
    await handle.truncate(sizeBytes);
    return new VolumeFile(path, handle, sizeBytes);
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const { bytesRead } = await this.handle.read(buf, done, buf.length - done, offset + done);
      if (bytesRead === 0) {
        throw new Error(`${this.path}: short read at ${offset + done} (file shorter than ${this.sizeBytes} bytes?)`);
      }
      done += bytesRead;
    }
  }

  async write(data: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.handle.write(data, done, data.length - done, offset + done);
      done += bytesWritten;
    }
    this.writeGeneration++;
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    for (let at = offset; at < offset + length; at += zeroChunkBytes) {
      await this.write(zeroChunk.subarray(0, Math.min(zeroChunkBytes, offset + length - at)), at);
    }
  }

  /** fdatasync, unless every completed write is already covered by a finished one. */
  async sync(): Promise<void> {
    const generation = this.writeGeneration;
    if (generation === this.syncedGeneration) return;
    await this.handle.datasync();
    this.syncedGeneration = Math.max(this.syncedGeneration, generation);
  }

  /** Drops the whole content (the blocks go back to the filesystem) and keeps the size. */
  async empty(): Promise<void> {
    await this.handle.truncate(0);
    await this.handle.truncate(this.sizeBytes);
    // Discarded content has nothing left to make durable.
    this.syncedGeneration = this.writeGeneration;
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}
