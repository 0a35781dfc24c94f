import { spawn } from 'node:child_process';
import { open, stat, type FileHandle } from 'node:fs/promises';
import { BlockDeviceError } from 'nbd-server-js';
import { GannetError } from './errors.js';

export type BackingOp = 'read' | 'write' | 'sync';

/** Zeroes written per writev entry when a range must read back as zeroes on the file itself. */
const zeroChunkBytes = 1024 * 1024;
/** Entries per writev call (IOV_MAX on Linux). */
export const iovecCountMax = 1024;
/**
 * Zeroes per writev call when zeroes are written (IOV_MAX entries of the shared 1 MiB chunk), so a range of
 * any length never builds more than one such entry list at a time.
 */
export const zeroWriteBytesMax = iovecCountMax * zeroChunkBytes;
/** Below this, writing zeroes is cheaper than starting a fallocate(1) process. */
export const fallocateBytesMinDefault = 1024 * 1024;
/** util-linux fallocate(1): Node has no binding for fallocate(2), and we add no native code. */
const fallocateCommandDefault = 'fallocate';

/**
 * How a range becomes zeroes through the file system (fallocate(1) option names): 'punch-hole' may
 * deallocate it (TRIM, WRITE_ZEROES without NO_HOLE), 'zero-range' keeps it allocated (NO_HOLE).
 */
export type ZeroMode = 'punch-hole' | 'zero-range';

/** fallocate(1)'s error message is kept up to this length. */
const fallocateStderrBytesMax = 4096;

/** fallocate(1) cannot do this mode here at all: missing, or the file system does not support it. */
class FallocateUnsupported extends Error {}

/**
 * The backing file: positional reads, vectored positional writes, fdatasync. Short reads and writes are
 * continued, never returned. `setFault` is the fault-injection seam (the nbdkit "error filter" idea):
 * tests make one kind of I/O fail without mocking the file system.
 */
export class Backing {
  readonly path: string;
  readonly sizeBytes: number;
  private readonly fh: FileHandle;
  private readonly faults = new Map<BackingOp, Error>();
  private zeroChunk: Buffer | null = null;
  private fallocateCommand = fallocateCommandDefault;
  private fallocateBytesMin = fallocateBytesMinDefault;
  /** Modes this machine or file system lacks (no fallocate(1), EOPNOTSUPP): zeroes are written instead. */
  private readonly fallocateUnsupported = new Set<ZeroMode>();
  private readonly clearing = new Set<Promise<void>>();
  private readHold: { waiting: number; release: Promise<void>; arrivals: (() => void)[] } | null = null;

  private constructor(path: string, sizeBytes: number, fh: FileHandle) {
    this.path = path;
    this.sizeBytes = sizeBytes;
    this.fh = fh;
  }

  /** Opens `path`, creating it sparse at `sizeBytes` when missing; an existing file must have that size. */
  static async open(path: string, sizeBytes: number, options: { create: boolean }): Promise<Backing> {
    let fh: FileHandle;
    try {
      fh = await open(path, 'r+');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || !options.create) {
        throw new GannetError('EMISMATCH', `backing file ${path} cannot be opened`, { cause: err });
      }
      fh = await open(path, 'wx+');
      await fh.truncate(sizeBytes);
      return new Backing(path, sizeBytes, fh);
    }
    const { size } = await stat(path);
    if (size !== sizeBytes) {
      await fh.close();
      throw new GannetError('EMISMATCH', `backing file ${path} is ${size} bytes, options say sizeBytes ${sizeBytes}`);
    }
    return new Backing(path, sizeBytes, fh);
  }

  /** Makes every later `op` fail with `error` (null clears). Test seam. */
  setFault(op: BackingOp, error: Error | null): void {
    if (error === null) this.faults.delete(op);
    else this.faults.set(op, error);
  }

  /**
   * Test seam: the fallocate(1) executable to run (a missing one makes every range a zero write), and the
   * shortest range it is run for (small volumes reach fallocate only with a lower one).
   */
  setFallocate(options: { command?: string; bytesMin?: number }): void {
    this.fallocateCommand = options.command ?? this.fallocateCommand;
    this.fallocateBytesMin = options.bytesMin ?? this.fallocateBytesMin;
  }

  /**
   * Test seam: reads wait until `release()`; `arrived(n)` resolves once n reads are waiting. Lets a test
   * put a checkpoint exactly between a partial-block write's read of the old block and its apply.
   */
  holdReads(): { arrived(count: number): Promise<void>; release(): void } {
    let release!: () => void;
    const hold = { waiting: 0, release: new Promise<void>((resolve) => (release = resolve)), arrivals: [] as (() => void)[] };
    this.readHold = hold;
    return {
      arrived: (count) =>
        new Promise<void>((resolve) => {
          const check = () => (hold.waiting >= count ? resolve() : hold.arrivals.push(check));
          check();
        }),
      release: () => {
        if (this.readHold === hold) this.readHold = null;
        release();
      },
    };
  }

  private check(op: BackingOp): void {
    const fault = this.faults.get(op);
    if (fault !== undefined) throw fault;
  }

  async read(buf: Uint8Array, position: number): Promise<void> {
    this.check('read');
    const hold = this.readHold;
    if (hold !== null) {
      hold.waiting++;
      for (const arrival of hold.arrivals.splice(0)) arrival();
      await hold.release;
    }
    let done = 0;
    while (done < buf.length) {
      const { bytesRead } = await this.fh.read(buf, done, buf.length - done, position + done);
      if (bytesRead === 0) {
        buf.fill(0, done);
        return;
      }
      done += bytesRead;
    }
  }

  async write(data: Uint8Array, position: number): Promise<void> {
    await this.writev([data], position);
  }

  /** Writes `buffers` back to back at `position`, continuing short writes. */
  async writev(buffers: Uint8Array[], position: number): Promise<void> {
    this.check('write');
    let pending = buffers;
    let pos = position;
    while (pending.length > 0) {
      const batch = pending.length > iovecCountMax ? pending.slice(0, iovecCountMax) : pending;
      const rest = pending.length > iovecCountMax ? pending.slice(iovecCountMax) : [];
      let total = 0;
      for (const b of batch) total += b.length;
      const { bytesWritten } = await this.fh.writev(batch, pos);
      pos += bytesWritten;
      if (bytesWritten === total) {
        pending = rest;
        continue;
      }
      if (bytesWritten === 0) throw new BlockDeviceError('EIO', `short write to ${this.path} at ${pos}`);
      pending = [...skipBytes(batch, bytesWritten), ...rest];
    }
  }

  /** Writes zeroes over [position, position + length), streaming from one shared zero chunk. */
  async writeZeroes(position: number, length: number): Promise<void> {
    this.zeroChunk ??= Buffer.alloc(zeroChunkBytes);
    for (let done = 0; done < length; done += zeroWriteBytesMax) {
      const buffers: Uint8Array[] = [];
      for (let left = Math.min(zeroWriteBytesMax, length - done); left > 0; left -= zeroChunkBytes) {
        buffers.push(left >= zeroChunkBytes ? this.zeroChunk : this.zeroChunk.subarray(0, left));
      }
      await this.writev(buffers, position + done);
    }
  }

  /**
   * Makes [position, position + length) read as zeroes through the file system, so its cost does not grow
   * with its length and a hole frees the disk space. The child gets this handle's descriptor as its fd 3
   * and works on /proc/self/fd/3: the file is fixed when the child starts, so neither a rename of the
   * path nor a reuse of our descriptor number after `close()` can redirect it. Short ranges, and modes the
   * file system or the machine lack, are written as zeroes, so the content never depends on fallocate(1);
   * any other failure falls back for that call only. Durable with the next datasync (fdatasync flushes
   * the allocation change too).
   */
  async clearRange(position: number, length: number, mode: ZeroMode): Promise<void> {
    this.check('write');
    if (length >= this.fallocateBytesMin && !this.fallocateUnsupported.has(mode)) {
      const args = [`--${mode}`, '--keep-size', '--offset', String(position), '--length', String(length), '/proc/self/fd/3'];
      const run = this.runFallocate(args);
      this.clearing.add(run);
      try {
        await run;
        return;
      } catch (err) {
        if (err instanceof FallocateUnsupported) this.fallocateUnsupported.add(mode);
      } finally {
        this.clearing.delete(run);
      }
    }
    await this.writeZeroes(position, length);
  }

  private runFallocate(args: string[]): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const child = spawn(this.fallocateCommand, args, { stdio: ['ignore', 'ignore', 'pipe', this.fh.fd] });
      let stderr = '';
      child.stderr!.setEncoding('utf8').on('data', (chunk: string) => {
        if (stderr.length < fallocateStderrBytesMax) stderr += chunk;
      });
      child.once('error', (err: NodeJS.ErrnoException) => {
        reject(err.code === 'ENOENT' || err.code === 'EACCES' ? new FallocateUnsupported(err.message) : err);
      });
      child.once('close', (code, signal) => {
        if (code === 0) resolve();
        else if (/not supported/i.test(stderr)) reject(new FallocateUnsupported(stderr.trim()));
        else reject(new Error(`fallocate exited with ${code ?? signal}: ${stderr.trim()}`));
      });
    });
  }

  async datasync(): Promise<void> {
    this.check('sync');
    await this.fh.datasync();
  }

  /** Waits for fallocate(1) runs in flight (they hold the file through their own descriptor). */
  async close(): Promise<void> {
    await Promise.allSettled([...this.clearing]);
    await this.fh.close();
  }
}

function skipBytes(buffers: Uint8Array[], skip: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  let left = skip;
  for (const b of buffers) {
    if (left >= b.length) {
      left -= b.length;
      continue;
    }
    out.push(left > 0 ? b.subarray(left) : b);
    left = 0;
  }
  return out;
}
