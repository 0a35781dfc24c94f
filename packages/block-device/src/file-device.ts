/**
 * A regular file as a block device, byte for byte: the one file class of the project. The standalone
 * NBD server serves one, the engine's backing file is one, and the disk baselines keep their backing,
 * hidden and active files in them. The size is the file's exact size, which need not be a multiple of
 * 512.
 *
 * I/O is positional (pread/pwritev) on one shared descriptor, so one `fdatasync` covers writes from every
 * connection (multiConn); flush and FUA are `fdatasync`, skipped when no write completed since the last
 * one. Small requests (<= 64 KiB) are served synchronously from the page cache (reads only while they
 * keep hitting it, see `#readSync`); larger ones go through the thread pool.
 *
 * Policies, chosen at open: what a read past the end of the file gives (`atEnd`: zeroes, or EIO for a
 * file that shrank under us), and whether flush and FUA reach the disk (`sync`: 'data' is fdatasync,
 * 'none' is for scratch data that a restart throws away).
 *
 * Batches (`writeBatch`) go to a writer thread of their own (worker/file-writer.mjs) that writes every run
 * with synchronous pwritev: one message per batch on the event loop, however many runs. Data in
 * SharedArrayBuffers (the engine's slabs) is written from where it is; other data is copied once into a
 * shared buffer for the thread.
 *
 * Trim and zero punch holes (fallocate PUNCH_HOLE, through fs-native-extensions: Node has no fallocate),
 * at most `rangeOpsInFlightMax` at a time; where the file system cannot punch, trim does nothing (it is
 * advisory) and zero writes zeroes. NO_HOLE zeroes are written, so they stay allocated. Node has no
 * posix_fadvise or SEEK_HOLE: cache does nothing and extents report data (capabilities say so).
 */
import fs from 'node:fs';
import { createRequire } from 'node:module';
import { Worker } from 'node:worker_threads';
import { AbstractBlockDevice, type ZeroRequest } from './abstract.js';
import type { Capabilities, WriteRun } from './device.js';
import { BlockDeviceError, toBlockDeviceError } from './errors.js';
import { MiB, zeroChunkBytes, zeroes } from './units.js';

const fsExt = createRequire(import.meta.url)('fs-native-extensions') as {
  trim(fd: number, offset: number, length: number): Promise<void>;
};

/** Writes up to this size go to the page cache synchronously (see `#writeSync`). */
export const fileSyncWriteBytesMax = 64 * 1024;
/** Reads up to this size are tried synchronously while they hit the page cache (see `#readSync`). */
export const fileSyncReadBytesMax = 64 * 1024;
/** A synchronous read slower than this waited for the disk, not the page cache. */
export const fileSyncReadSlowMs = 0.5;
/** After a slow synchronous read, reads go to the thread pool for this long. */
export const fileSyncReadBackoffMs = 20;
/** Entries per pwritev call (IOV_MAX on Linux). */
export const iovecCountMax = 1024;
/** Zeroes per pwritev call when zeroes are written, so one long zero range never hogs a pool thread. */
export const fileZeroWriteBytesMax = 64 * MiB;
/** Hole punches in flight per file; the rest wait their turn. */
export const rangeOpsInFlightMax = 4;

/** The writer thread's code: plain JavaScript beside src and dist, so the same path works from both. */
const writerUrl = new URL('../worker/file-writer.mjs', import.meta.url);

interface WriterJob {
  readonly resolve: () => void;
  readonly reject: (err: Error) => void;
}

export type EndOfFilePolicy = 'zero-fill' | 'error';
export type SyncPolicy = 'data' | 'none';

export interface FileDeviceOptions {
  readonly readOnly?: boolean;
  /**
   * Create the file with this size (sparse) if it does not exist; if it exists, its size must equal
   * this (EINVAL otherwise), so a typo cannot silently shrink or grow a disk.
   */
  readonly create?: number;
  /** An existing file must have exactly this size (EINVAL otherwise). */
  readonly size?: number;
  /** Empty the file at open (scratch files): its old content is dropped, its size kept. */
  readonly truncate?: boolean;
  /** What a read past the end of the file gives; default 'error' (EIO). */
  readonly atEnd?: EndOfFilePolicy;
  /** Default 'data': flush and FUA are fdatasync. */
  readonly sync?: SyncPolicy;
}

function fsOpen(path: string, flags: number | string): Promise<number> {
  return new Promise((resolve, reject) => fs.open(path, flags, 0o644, (err, fd) => (err ? reject(err) : resolve(fd))));
}

function fsFstat(fd: number): Promise<fs.Stats> {
  return new Promise((resolve, reject) => fs.fstat(fd, (err, stats) => (err ? reject(err) : resolve(stats))));
}

function fsFtruncate(fd: number, length: number): Promise<void> {
  return new Promise((resolve, reject) => fs.ftruncate(fd, length, (err) => (err ? reject(err) : resolve())));
}

function fsClose(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.close(fd, (err) => (err ? reject(err) : resolve())));
}

function fsFdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
}

function fsRead(fd: number, buf: Uint8Array, at: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => fs.read(fd, buf, at, length, position, (err, n) => (err ? reject(err) : resolve(n))));
}

function fsWritev(fd: number, buffers: readonly Uint8Array[], position: number): Promise<number> {
  return new Promise((resolve, reject) =>
    fs.writev(fd, buffers as NodeJS.ArrayBufferView[], position, (err, n) => (err ? reject(err) : resolve(n))),
  );
}

/** The buffers left after the first `skip` bytes of `buffers`. */
function skipBytes(buffers: readonly Uint8Array[], skip: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  let left = skip;
  for (const b of buffers) {
    if (left >= b.byteLength) {
      left -= b.byteLength;
      continue;
    }
    out.push(left > 0 ? b.subarray(left) : b);
    left = 0;
  }
  return out;
}

export class FileDevice extends AbstractBlockDevice {
  readonly capabilities: Capabilities;
  readonly path: string;
  readonly #fd: number;
  readonly #atEnd: EndOfFilePolicy;
  readonly #sync: SyncPolicy;
  /** Until this time (performance.now()), reads go to the thread pool: a recent one missed the cache. */
  #syncReadsFromMs = 0;
  /** Completed writes, and the count at the start of the last finished fdatasync: equal means clean. */
  #writeGeneration = 0;
  #syncedGeneration = 0;
  #punchUnsupported = false;
  #rangeOps = 0;
  readonly #rangeOpWaiters: (() => void)[] = [];
  #writer: Worker | null = null;
  readonly #writerJobs = new Map<number, WriterJob>();
  #nextWriterJob = 1;

  private constructor(path: string, fd: number, size: number, readOnly: boolean, atEnd: EndOfFilePolicy, sync: SyncPolicy) {
    super(size);
    this.path = path;
    this.#fd = fd;
    this.#atEnd = atEnd;
    this.#sync = sync;
    this.capabilities = Object.freeze({
      readOnly,
      flush: true,
      fua: true,
      trim: true,
      zero: true,
      fastZero: true,
      cache: false,
      multiConn: true,
      extents: false,
    });
  }

  static async open(path: string, options: FileDeviceOptions = {}): Promise<FileDevice> {
    const readOnly = options.readOnly === true;
    const { create, truncate } = options;
    const expected = create ?? options.size;
    if (create !== undefined && (readOnly || !Number.isSafeInteger(create) || create < 0)) {
      throw new BlockDeviceError('EINVAL', `open ${path}: create=${create} needs a writable open and a size >= 0`);
    }
    if (truncate === true && create === undefined) throw new BlockDeviceError('EINVAL', `open ${path}: truncate needs create`);
    let fd: number;
    let created = false;
    try {
      if (create === undefined) {
        fd = await fsOpen(path, readOnly ? 'r' : 'r+');
      } else {
        try {
          fd = await fsOpen(path, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL);
          created = true;
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
          fd = await fsOpen(path, 'r+');
        }
      }
    } catch (err) {
      throw toBlockDeviceError(err, `open ${path}`);
    }
    try {
      if (truncate === true && !created) await fsFtruncate(fd, 0);
      if (created || truncate === true) await fsFtruncate(fd, create!);
      const stats = await fsFstat(fd);
      if (!stats.isFile()) throw new BlockDeviceError('EINVAL', `open ${path}: not a regular file`);
      if (expected !== undefined && stats.size !== expected) {
        throw new BlockDeviceError('EINVAL', `open ${path}: the file is ${stats.size} bytes, expected ${expected}`);
      }
      return new FileDevice(path, fd, stats.size, readOnly, options.atEnd ?? 'error', options.sync ?? 'data');
    } catch (err) {
      await fsClose(fd).catch(() => undefined);
      throw toBlockDeviceError(err, `open ${path}`);
    }
  }

  /** Drops the whole content (the blocks go back to the file system) and keeps the size. */
  async empty(): Promise<void> {
    if (!this.isOpen) throw new BlockDeviceError('ESHUTDOWN', `empty ${this.path}: the device is closed`);
    try {
      await fsFtruncate(this.#fd, 0);
      await fsFtruncate(this.#fd, this.size);
    } catch (err) {
      throw toBlockDeviceError(err, `empty ${this.path}`);
    }
    // Discarded content has nothing left to make durable.
    this.#syncedGeneration = this.#writeGeneration;
  }

  protected async _read(buf: Uint8Array, offset: number): Promise<void> {
    try {
      for (let done = 0; done < buf.byteLength; ) {
        const rest = buf.byteLength - done;
        const n =
          rest <= fileSyncReadBytesMax && performance.now() >= this.#syncReadsFromMs
            ? this.#readSync(buf, done, rest, offset + done)
            : await fsRead(this.#fd, buf, done, rest, offset + done);
        if (n === 0) {
          if (this.#atEnd === 'zero-fill') {
            buf.fill(0, done);
            return;
          }
          throw new BlockDeviceError('EIO', `read ${this.path}: end of file at ${offset + done}, expected size ${this.size}`);
        }
        done += n;
      }
    } catch (err) {
      throw toBlockDeviceError(err, `read ${this.path} at ${offset}`);
    }
  }

  protected _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    return this._writev([data], offset, fua);
  }

  protected override async _writev(buffers: readonly Uint8Array[], offset: number, fua: boolean): Promise<void> {
    try {
      await this.#writeAll(buffers, offset);
      if (fua) await this.#datasync();
    } catch (err) {
      throw toBlockDeviceError(err, `write ${this.path} at ${offset}`);
    }
  }

  protected override async _writeBatch(runs: readonly WriteRun[]): Promise<void> {
    const sabs: SharedArrayBuffer[] = [];
    const sabIndex = new Map<SharedArrayBuffer, number>();
    let copyBytes = 0;
    let planLength = 0;
    for (const run of runs) {
      planLength += 2 + 3 * run.buffers.length;
      for (const b of run.buffers) if (!(b.buffer instanceof SharedArrayBuffer)) copyBytes += b.byteLength;
    }
    const copy = copyBytes > 0 ? new Uint8Array(new SharedArrayBuffer(copyBytes)) : null;
    let copied = 0;
    const plan = new Float64Array(planLength);
    let i = 0;
    for (const run of runs) {
      plan[i++] = run.offset;
      plan[i++] = run.buffers.length;
      for (const b of run.buffers) {
        let sab: SharedArrayBuffer;
        let at: number;
        if (b.buffer instanceof SharedArrayBuffer) {
          sab = b.buffer;
          at = b.byteOffset;
        } else {
          copy!.set(b, copied);
          sab = copy!.buffer as SharedArrayBuffer;
          at = copied;
          copied += b.byteLength;
        }
        let index = sabIndex.get(sab);
        if (index === undefined) {
          index = sabs.push(sab) - 1;
          sabIndex.set(sab, index);
        }
        plan[i++] = index;
        plan[i++] = at;
        plan[i++] = b.byteLength;
      }
    }
    const id = this.#nextWriterJob++;
    const done = new Promise<void>((resolve, reject) => this.#writerJobs.set(id, { resolve, reject }));
    this.#startWriter().postMessage({ id, fd: this.#fd, sabs, plan });
    try {
      await done;
    } catch (err) {
      throw toBlockDeviceError(err, `write ${this.path}`);
    }
    this.#writeGeneration++;
  }

  protected override async _flush(): Promise<void> {
    try {
      await this.#datasync();
    } catch (err) {
      throw toBlockDeviceError(err, `flush ${this.path}`);
    }
  }

  /** Punches a hole; where the file system cannot, trim is advisory and does nothing. */
  protected override async _trim(offset: number, length: number, fua: boolean): Promise<void> {
    try {
      await this.#punch(offset, length);
      if (fua) await this.#datasync();
    } catch (err) {
      throw toBlockDeviceError(err, `trim ${this.path} at ${offset}`);
    }
  }

  protected override async _zero(offset: number, length: number, request: ZeroRequest): Promise<void> {
    try {
      const punched = !request.noHole && (await this.#punch(offset, length));
      if (!punched) {
        if (request.fastZero) throw new BlockDeviceError('ENOTSUP', `zero ${this.path}: zeroes would be written, not fast`);
        await this.#writeZeroes(offset, length);
      }
      if (request.fua) await this.#datasync();
    } catch (err) {
      throw toBlockDeviceError(err, `zero ${this.path} at ${offset}`);
    }
  }

  protected override async _close(): Promise<void> {
    if (this.#writer !== null) await this.#writer.terminate();
    try {
      await fsClose(this.#fd);
    } catch (err) {
      throw toBlockDeviceError(err, `close ${this.path}`);
    }
  }

  /** The writer thread, started with the first batch; it does not keep the process alive. */
  #startWriter(): Worker {
    if (this.#writer !== null) return this.#writer;
    const writer = new Worker(writerUrl);
    writer.unref();
    writer.on('message', (reply: { id: number; error?: { code: string; message: string } }) => {
      const job = this.#writerJobs.get(reply.id);
      if (job === undefined) return;
      this.#writerJobs.delete(reply.id);
      if (reply.error === undefined) job.resolve();
      else job.reject(Object.assign(new Error(reply.error.message), { code: reply.error.code }));
    });
    writer.on('error', (err) => this.#failWriter(err));
    writer.on('exit', (code) => this.#failWriter(new Error(`the writer thread exited with ${code}`)));
    this.#writer = writer;
    return writer;
  }

  /** The writer thread died: its jobs fail, and the next batch starts a new one. */
  #failWriter(err: Error): void {
    this.#writer = null;
    for (const job of this.#writerJobs.values()) job.reject(err);
    this.#writerJobs.clear();
  }

  async #datasync(): Promise<void> {
    const generation = this.#writeGeneration;
    if (this.#sync === 'none' || generation === this.#syncedGeneration) return;
    await fsFdatasync(this.#fd);
    this.#syncedGeneration = Math.max(this.#syncedGeneration, generation);
  }

  /**
   * Writes every byte of `buffers` at `position`, continuing after short writes. Small writes are made
   * synchronously: a buffered pwrite only copies into the page cache, and the thread-pool round trip
   * costs more than the copy (fio 4K random writes at QD32: 2x the IOPS). Reads stay asynchronous when
   * they miss the cache, because then they wait for the disk.
   */
  async #writeAll(buffers: readonly Uint8Array[], position: number): Promise<void> {
    let total = 0;
    for (const b of buffers) total += b.byteLength;
    let pending = buffers;
    let pos = position;
    let left = total;
    while (left > 0) {
      const batch = pending.length > iovecCountMax ? pending.slice(0, iovecCountMax) : pending;
      let batchBytes = 0;
      for (const b of batch) batchBytes += b.byteLength;
      const n =
        left <= fileSyncWriteBytesMax
          ? fs.writevSync(this.#fd, batch as NodeJS.ArrayBufferView[], pos)
          : await fsWritev(this.#fd, batch, pos);
      if (n <= 0) throw new BlockDeviceError('EIO', `write ${this.path}: no progress at ${pos}`);
      pos += n;
      left -= n;
      pending = n === batchBytes ? pending.slice(batch.length) : skipBytes(pending, n);
    }
    this.#writeGeneration++;
  }

  async #writeZeroes(offset: number, length: number): Promise<void> {
    for (let done = 0; done < length; done += fileZeroWriteBytesMax) {
      const pieces: Uint8Array[] = [];
      for (let left = Math.min(fileZeroWriteBytesMax, length - done); left > 0; left -= zeroChunkBytes) {
        pieces.push(zeroes(Math.min(left, zeroChunkBytes)));
      }
      await this.#writeAll(pieces, offset + done);
    }
  }

  /** Punches [offset, offset + length); false when this file system cannot (nothing was done). */
  async #punch(offset: number, length: number): Promise<boolean> {
    if (this.#punchUnsupported) return false;
    // A finished punch hands its slot to the next waiter, so no more than rangeOpsInFlightMax ever run.
    if (this.#rangeOps >= rangeOpsInFlightMax) await new Promise<void>((resolve) => this.#rangeOpWaiters.push(resolve));
    else this.#rangeOps++;
    try {
      await fsExt.trim(this.#fd, offset, length);
      this.#writeGeneration++;
      return true;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS') {
        this.#punchUnsupported = true;
        return false;
      }
      throw err;
    } finally {
      const next = this.#rangeOpWaiters.shift();
      if (next !== undefined) next();
      else this.#rangeOps--;
    }
  }

  /**
   * Small reads that hit the page cache cost a couple of microseconds, far less than a thread-pool round
   * trip (fio 4K random reads at QD32: about 2x the IOPS). Node cannot ask for "only if cached"
   * (preadv2 RWF_NOWAIT), so the latency of each synchronous read is the probe: one that took long
   * enough to have waited for the disk sends reads to the thread pool for a while, so a cold disk costs
   * the event loop at most one stalled read per `fileSyncReadBackoffMs` (a few percent of its time).
   */
  #readSync(buf: Uint8Array, at: number, length: number, position: number): number {
    const start = performance.now();
    const n = fs.readSync(this.#fd, buf, at, length, position);
    const elapsedMs = performance.now() - start;
    if (elapsedMs > fileSyncReadSlowMs) this.#syncReadsFromMs = performance.now() + fileSyncReadBackoffMs;
    return n;
  }
}
