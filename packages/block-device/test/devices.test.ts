/**
 * Goal: the simple devices (MemoryDevice, FileDevice, ReadOnlyDevice) keep the BlockDevice contract and
 * their own promises. Method: the shared conformance suite on each (FileDevice at an odd size, the
 * read-only layer over a pre-filled MemoryDevice so refused writes have data to spoil), then
 * device-specific checks on state a client cannot see: chunk memory held, exact extents, bytes on disk
 * read with plain fs, which fs calls a flush makes, and how fs errors map to codes.
 */
import fs, { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { pattern, runBlockDeviceSuite } from '../src/conformance.js';
import { EXTENT_HOLE, EXTENT_ZERO } from '../src/device.js';
import { BlockDeviceError } from '../src/errors.js';
import { FaultDevice } from '../src/faults.js';
import { FileDevice, fileSyncReadBytesMax, fileSyncReadSlowMs, fileSyncWriteBytesMax, rangeOpsInFlightMax } from '../src/file-device.js';
import { MemoryDevice, memoryChunkBytes } from '../src/memory.js';
import { ReadOnlyDevice } from '../src/readonly.js';
import { zeroChunkBytes } from '../src/units.js';

const hole = EXTENT_HOLE | EXTENT_ZERO;
const tebibyte = 1024 ** 4;

async function rejection(p: Promise<unknown>): Promise<BlockDeviceError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(BlockDeviceError);
  return err as BlockDeviceError;
}

async function readBytes(device: { read(buf: Uint8Array, offset: number): Promise<void> }, offset: number, length: number) {
  const buf = Buffer.alloc(length, 0xa5);
  await device.read(buf, offset);
  return buf;
}

function tmpDir(): { dir: string; cleanup: () => Promise<void> } {
  const dir = mkdtempSync(join(tmpdir(), 'gannet-devices-'));
  return { dir, cleanup: async () => rmSync(dir, { recursive: true, force: true }) };
}

runBlockDeviceSuite({ name: 'MemoryDevice', factory: async (size) => ({ device: new MemoryDevice(size) }) });

runBlockDeviceSuite({
  name: 'MemoryDevice { readOnly }',
  readOnly: true,
  factory: async (size) => ({ device: new MemoryDevice(size, { readOnly: true }) }),
});

runBlockDeviceSuite({
  name: 'FileDevice (odd size)',
  capabilities: { cache: false, extents: false },
  factory: async (size) => {
    const { dir, cleanup } = tmpDir();
    return { device: await FileDevice.open(join(dir, 'disk.raw'), { create: size }), cleanup };
  },
});

runBlockDeviceSuite({
  name: 'FileDevice { atEnd: zero-fill, sync: none }',
  capabilities: { cache: false, extents: false },
  factory: async (size) => {
    const { dir, cleanup } = tmpDir();
    return { device: await FileDevice.open(join(dir, 'disk.raw'), { create: size, atEnd: 'zero-fill', sync: 'none' }), cleanup };
  },
});

runBlockDeviceSuite({
  name: 'FaultDevice with no fault, over a MemoryDevice',
  factory: async (size) => ({ device: new FaultDevice(new MemoryDevice(size)) }),
});

runBlockDeviceSuite({
  name: 'FaultDevice delaying every verb by 1 ms, over a FileDevice',
  capabilities: { cache: false, extents: false },
  factory: async (size) => {
    const { dir, cleanup } = tmpDir();
    const device = new FaultDevice(await FileDevice.open(join(dir, 'disk.raw'), { create: size }));
    for (const verb of ['read', 'write', 'flush', 'trim', 'zero'] as const) device.delay(verb, 1);
    return { device, cleanup };
  },
});

runBlockDeviceSuite({
  name: 'ReadOnlyDevice over a pre-filled MemoryDevice',
  readOnly: true,
  factory: async (size) => {
    const next = new MemoryDevice(size);
    await next.write(pattern(200_000, 1), 0);
    await next.write(pattern(5000, 2), size - 5000);
    return { device: new ReadOnlyDevice(next) };
  },
});

describe('MemoryDevice', () => {
  it('memory tracks what is written, not the size (1 TiB)', async () => {
    const before = process.memoryUsage().arrayBuffers;
    const device = new MemoryDevice(tebibyte);
    const middle = tebibyte / 2 + 12_345;
    await device.write(pattern(100, 1), 0);
    await device.write(pattern(100, 2), middle);
    await device.write(pattern(1, 3), tebibyte - 1);
    expect(device.allocatedBytes).toBe(3 * memoryChunkBytes);
    expect(process.memoryUsage().arrayBuffers - before).toBeLessThan(16 * 1024 * 1024);
    expect(await readBytes(device, middle - 1, 102)).toEqual(Buffer.concat([Buffer.alloc(1), pattern(100, 2), Buffer.alloc(1)]));
    expect(await readBytes(device, tebibyte - 2, 2)).toEqual(Buffer.from([0, pattern(1, 3)[0]]));

    const middleChunk = Math.floor(middle / memoryChunkBytes) * memoryChunkBytes;
    expect(await device.extents(0, tebibyte)).toEqual([
      { length: memoryChunkBytes, flags: 0 },
      { length: middleChunk - memoryChunkBytes, flags: hole },
      { length: memoryChunkBytes, flags: 0 },
      { length: tebibyte - memoryChunkBytes - middleChunk - memoryChunkBytes, flags: hole },
      { length: memoryChunkBytes, flags: 0 },
    ]);

    await device.writeZeroes(0, tebibyte);
    expect(device.allocatedBytes).toBe(0);
    expect(await device.extents(0, tebibyte)).toEqual([{ length: tebibyte, flags: hole }]);
  });

  it('reports never-written chunks as holes, and the cut last chunk exactly', async () => {
    const size = 16 * memoryChunkBytes + 3;
    const device = new MemoryDevice(size);
    expect(await device.extents(0, size)).toEqual([{ length: size, flags: hole }]);
    await device.write(pattern(10, 1), memoryChunkBytes + 100);
    await device.write(pattern(1, 2), size - 1);
    expect(await device.extents(0, size)).toEqual([
      { length: memoryChunkBytes, flags: hole },
      { length: memoryChunkBytes, flags: 0 },
      { length: 14 * memoryChunkBytes, flags: hole },
      { length: 3, flags: 0 },
    ]);
    expect(device.allocatedBytes).toBe(memoryChunkBytes + 3);
    expect(await device.extents(memoryChunkBytes + 7, 10)).toEqual([{ length: 10, flags: 0 }]);
    expect(await device.extents(5, 10)).toEqual([{ length: 10, flags: hole }]);
  });

  it('frees fully covered chunks on trim and zero, zeroes partial ones, and keeps them with noHole', async () => {
    const device = new MemoryDevice(4 * memoryChunkBytes);
    await device.write(pattern(4 * memoryChunkBytes, 1), 0);
    await device.trim(100, memoryChunkBytes);
    expect(device.allocatedBytes).toBe(4 * memoryChunkBytes);
    expect((await readBytes(device, 100, memoryChunkBytes)).every((b) => b === 0)).toBe(true);
    await device.writeZeroes(2 * memoryChunkBytes, memoryChunkBytes, { noHole: true });
    expect(device.allocatedBytes).toBe(4 * memoryChunkBytes);
    expect((await readBytes(device, 2 * memoryChunkBytes, memoryChunkBytes)).every((b) => b === 0)).toBe(true);
    await device.trim(memoryChunkBytes, 2 * memoryChunkBytes);
    expect(device.allocatedBytes).toBe(2 * memoryChunkBytes);
    expect(await device.extents(0, 4 * memoryChunkBytes)).toEqual([
      { length: memoryChunkBytes, flags: 0 },
      { length: 2 * memoryChunkBytes, flags: hole },
      { length: memoryChunkBytes, flags: 0 },
    ]);
    expect(await readBytes(device, 3 * memoryChunkBytes, 10)).toEqual(
      Buffer.from(pattern(4 * memoryChunkBytes, 1).subarray(3 * memoryChunkBytes, 3 * memoryChunkBytes + 10)),
    );
  });

  it('bounds one extents answer and lets the caller continue', async () => {
    const chunks = 1100;
    const device = new MemoryDevice(chunks * memoryChunkBytes);
    for (let i = 0; i < chunks; i += 2) await device.write(pattern(1, i), i * memoryChunkBytes);
    const first = await device.extents(0, device.size);
    expect(first.length).toBeLessThanOrEqual(1024);
    let covered = first.reduce((sum, e) => sum + e.length, 0);
    expect(covered).toBeLessThan(device.size);
    for (let calls = 0; covered < device.size; calls++) {
      expect(calls).toBeLessThan(10);
      const next = await device.extents(covered, device.size - covered);
      covered += next.reduce((sum, e) => sum + e.length, 0);
    }
    expect(covered).toBe(device.size);
  });

  it('refuses work after close with ESHUTDOWN', async () => {
    const device = new MemoryDevice(4096);
    await device.close();
    expect((await rejection(device.read(new Uint8Array(1), 0))).code).toBe('ESHUTDOWN');
    expect((await rejection(device.write(new Uint8Array(1), 0))).code).toBe('ESHUTDOWN');
  });
});

describe('FileDevice', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  beforeEach(() => ({ dir, cleanup } = tmpDir()));
  afterEach(async () => {
    vi.restoreAllMocks();
    await cleanup();
  });

  it('reads small ranges synchronously, and falls back to the thread pool after a slow (uncached) read', async () => {
    const device = await FileDevice.open(join(dir, 'disk.raw'), { create: 1024 * 1024 });
    await device.write(pattern(1024 * 1024, 3), 0);
    const realReadSync = fs.readSync;
    const readSync = vi.spyOn(fs, 'readSync');
    const read = vi.spyOn(fs, 'read');
    const buf = new Uint8Array(4096);
    await device.read(buf, 8192);
    expect(Buffer.from(buf).equals(Buffer.from(pattern(1024 * 1024, 3).subarray(8192, 8192 + 4096)))).toBe(true);
    expect([readSync.mock.calls.length, read.mock.calls.length]).toEqual([1, 0]);
    // A read that takes as long as a disk access: the next small read must not block the event loop.
    readSync.mockImplementationOnce(((...args: Parameters<typeof fs.readSync>) => {
      const until = performance.now() + 2 * fileSyncReadSlowMs;
      while (performance.now() < until);
      return realReadSync(...args);
    }) as typeof fs.readSync);
    await device.read(buf, 0);
    await device.read(buf, 4096);
    expect([readSync.mock.calls.length, read.mock.calls.length]).toEqual([2, 1]);
    // Large reads always use the thread pool.
    await device.read(new Uint8Array(fileSyncReadBytesMax + 1), 0);
    expect(read.mock.calls.length).toBe(2);
    await device.close();
  });

  it('creates the file at the exact odd size, and reopens it at that size', async () => {
    const path = join(dir, 'odd.raw');
    const size = 3 * 1024 * 1024 + 511;
    const device = await FileDevice.open(path, { create: size });
    expect(statSync(path).size).toBe(size);
    await device.write(pattern(511, 1), size - 511);
    await device.close();
    expect(statSync(path).size).toBe(size);
    const again = await FileDevice.open(path, { create: size });
    expect(again.size).toBe(size);
    expect(await readBytes(again, size - 511, 511)).toEqual(Buffer.from(pattern(511, 1)));
    await again.close();
    const readOnly = await FileDevice.open(path, { readOnly: true });
    expect(readOnly.size).toBe(size);
    expect(readOnly.capabilities.readOnly).toBe(true);
    expect((await rejection(readOnly.write(new Uint8Array(1), 0))).code).toBe('EPERM');
    await readOnly.close();
  });

  it('refuses a size mismatch, create with readOnly, and a missing file', async () => {
    const path = join(dir, 'disk.raw');
    writeFileSync(path, Buffer.alloc(1000));
    expect((await rejection(FileDevice.open(path, { create: 1001 }))).code).toBe('EINVAL');
    expect((await rejection(FileDevice.open(path, { create: 1000, readOnly: true }))).code).toBe('EINVAL');
    const missing = await rejection(FileDevice.open(join(dir, 'missing.raw')));
    expect(missing.code).toBe('EIO');
    expect((missing.cause as NodeJS.ErrnoException).code).toBe('ENOENT');
    expect(statSync(path).size).toBe(1000);
  });

  it('flush and FUA reach fdatasync on the device fd, and the bytes are in the file', async () => {
    const path = join(dir, 'disk.raw');
    const device = await FileDevice.open(path, { create: 1024 * 1024 + 3 });
    const sync = vi.spyOn(fs, 'fdatasync');
    await device.write(pattern(4097, 1), 10);
    expect(sync).not.toHaveBeenCalled();
    await device.flush();
    expect(sync).toHaveBeenCalledTimes(1);
    expect(readFileSync(path).subarray(10, 10 + 4097)).toEqual(Buffer.from(pattern(4097, 1)));
    await device.write(pattern(100, 2), 1024 * 1024 + 3 - 100, { fua: true });
    expect(sync).toHaveBeenCalledTimes(2);
    expect(readFileSync(path).subarray(-100)).toEqual(Buffer.from(pattern(100, 2)));
    await device.writeZeroes(10, 4097, { fua: true });
    expect(sync).toHaveBeenCalledTimes(3);
    expect(readFileSync(path).subarray(0, 5000).every((b) => b === 0)).toBe(true);
    const fds = new Set(sync.mock.calls.map((call) => call[0]));
    expect(fds.size).toBe(1);
    await device.close();
  });

  it('NO_HOLE zeroes are written from one shared zero buffer and stay allocated', async () => {
    const path = join(dir, 'disk.raw');
    const size = 3 * zeroChunkBytes + 1001;
    const device = await FileDevice.open(path, { create: size });
    await device.write(pattern(size, 1), 0);
    await device.flush();
    const allocated = statSync(path).blocks;
    const writev = vi.spyOn(fs, 'writev');
    await device.writeZeroes(5, size - 10, { noHole: true });
    const pieces = writev.mock.calls.flatMap((call) => call[1] as Uint8Array[]);
    expect(new Set(pieces.map((piece) => piece.buffer)).size).toBe(1);
    for (const piece of pieces) expect(piece.byteLength).toBeLessThanOrEqual(zeroChunkBytes);
    expect(pieces.reduce((sum, piece) => sum + piece.byteLength, 0)).toBe(size - 10);
    expect(statSync(path).blocks).toBe(allocated);
    const onDisk = readFileSync(path);
    expect(onDisk.subarray(0, 5)).toEqual(Buffer.from(pattern(size, 1).subarray(0, 5)));
    expect(onDisk.subarray(5, size - 5).every((b) => b === 0)).toBe(true);
    expect(onDisk.subarray(size - 5)).toEqual(Buffer.from(pattern(size, 1).subarray(size - 5)));
    await device.close();
  });

  it('trim and zero punch holes, partial blocks read zero, and neighbours stay', async () => {
    const path = join(dir, 'disk.raw');
    const size = 4 * 1024 * 1024;
    const device = await FileDevice.open(path, { create: size });
    await device.write(pattern(size, 2), 0);
    await device.flush();
    const full = statSync(path).blocks;
    await device.trim(1024 * 1024 + 100, 1024 * 1024);
    await device.writeZeroes(3 * 1024 * 1024, 512 * 1024);
    await device.flush();
    expect(statSync(path).blocks).toBeLessThan(full - 1024);
    const onDisk = readFileSync(path);
    const want = Buffer.from(pattern(size, 2));
    want.fill(0, 1024 * 1024 + 100, 2 * 1024 * 1024 + 100);
    want.fill(0, 3 * 1024 * 1024, 3 * 1024 * 1024 + 512 * 1024);
    expect(onDisk.equals(want)).toBe(true);
    await device.close();
  });

  it(`runs at most ${rangeOpsInFlightMax} hole punches at once; the rest wait their turn`, async () => {
    const device = await FileDevice.open(join(dir, 'disk.raw'), { create: 64 * 1024 * 1024 });
    await device.write(pattern(64 * 1024 * 1024, 4), 0);
    const running = { now: 0, most: 0 };
    const require = createRequire(import.meta.url);
    const fsExt = require('fs-native-extensions') as { trim: (fd: number, offset: number, length: number) => Promise<void> };
    const realTrim = fsExt.trim;
    vi.spyOn(fsExt, 'trim').mockImplementation(async (fd, offset, length) => {
      running.now++;
      running.most = Math.max(running.most, running.now);
      try {
        await new Promise<void>((resolve) => setImmediate(resolve));
        return await realTrim(fd, offset, length);
      } finally {
        running.now--;
      }
    });
    await Promise.all(Array.from({ length: 64 }, (_, i) => device.trim(i * 1024 * 1024, 1024 * 1024)));
    expect(running.most).toBe(rangeOpsInFlightMax);
    expect((await readBytes(device, 0, 64 * 1024 * 1024)).every((b) => b === 0)).toBe(true);
    await device.close();
  });

  it('maps fs errors: ENOSPC, EDQUOT and EFBIG to ENOSPC, EROFS and EACCES to EPERM, others to EIO, keeping the cause', async () => {
    const device = await FileDevice.open(join(dir, 'disk.raw'), { create: 2 * fileSyncWriteBytesMax });
    const failing = (errno: string) => {
      const err = Object.assign(new Error(`simulated ${errno}`), { code: errno });
      vi.spyOn(fs, 'writev').mockImplementation(((...args: unknown[]) => {
        const callback = args[args.length - 1] as (e: Error) => void;
        process.nextTick(callback, err);
      }) as unknown as typeof fs.writev);
      vi.spyOn(fs, 'writevSync').mockImplementation(() => {
        throw err;
      });
      return err;
    };
    // A small write takes the synchronous path, a large one the asynchronous: both map the same way.
    for (const length of [10, fileSyncWriteBytesMax + 1]) {
      for (const [errno, code] of [
        ['ENOSPC', 'ENOSPC'],
        ['EDQUOT', 'ENOSPC'],
        ['EFBIG', 'ENOSPC'],
        ['EROFS', 'EPERM'],
        ['EACCES', 'EPERM'],
        ['EBADF', 'EIO'],
      ] as const) {
        const cause = failing(errno);
        const err = await rejection(device.write(pattern(length, 1), 0));
        expect(err.code).toBe(code);
        expect(err.cause).toBe(cause);
        vi.restoreAllMocks();
      }
    }
    await device.close();
  });

  it('close waits for in-flight I/O, then refuses with ESHUTDOWN', async () => {
    const device = await FileDevice.open(join(dir, 'disk.raw'), { create: 1024 * 1024 });
    const writing = device.write(pattern(512 * 1024, 1), 0);
    const closing = device.close();
    await writing;
    await closing;
    expect((await rejection(device.read(new Uint8Array(1), 0))).code).toBe('ESHUTDOWN');
    expect(readFileSync(join(dir, 'disk.raw')).subarray(0, 512 * 1024).equals(pattern(512 * 1024, 1))).toBe(true);
  });
});

describe('ReadOnlyDevice', () => {
  it('passes reads, extents and capabilities through, marks readOnly, and closes next', async () => {
    const next = new MemoryDevice(4 * memoryChunkBytes);
    await next.write(pattern(100, 1), memoryChunkBytes);
    const device = new ReadOnlyDevice(next);
    expect(device.size).toBe(next.size);
    expect(device.capabilities).toEqual({ ...next.capabilities, readOnly: true });
    expect(await readBytes(device, memoryChunkBytes, 100)).toEqual(Buffer.from(pattern(100, 1)));
    expect(await device.extents(0, device.size)).toEqual(await next.extents(0, next.size));
    expect((await rejection(device.writeZeroes(0, 10))).code).toBe('EPERM');
    expect((await rejection(device.write(new Uint8Array(1), device.size))).code).toBe('ENOSPC');
    await device.close();
    expect((await rejection(next.read(new Uint8Array(1), 0))).code).toBe('ESHUTDOWN');
  });
});

describe('FaultDevice', () => {
  it('fails one verb with the injected error until cleared, leaving the others and the data alone', async () => {
    const next = new MemoryDevice(64 * 1024);
    const device = new FaultDevice(next);
    await device.write(pattern(4096, 1), 0);
    const full = Object.assign(new Error('simulated ENOSPC'), { code: 'ENOSPC' });
    device.fail('write', full);
    expect(await device.write(pattern(10, 2), 0).then(() => null, (e: unknown) => e)).toBe(full);
    expect(await device.writev([pattern(10, 2)], 0).then(() => null, (e: unknown) => e)).toBe(full);
    expect(await readBytes(device, 0, 4096)).toEqual(Buffer.from(pattern(4096, 1)));
    await device.flush();
    device.fail('write', null);
    await device.write(pattern(10, 2), 0);
    expect(await readBytes(next, 0, 10)).toEqual(Buffer.from(pattern(10, 2)));
    await device.close();
  });

  it('holds a verb until released, counting arrivals', async () => {
    const device = new FaultDevice(new MemoryDevice(64 * 1024));
    const hold = device.hold('read');
    let done = 0;
    const reads = [0, 1, 2].map((i) => device.read(new Uint8Array(10), i * 10).then(() => done++));
    await hold.arrived(3);
    expect(done).toBe(0);
    await device.write(pattern(10, 3), 100);
    hold.release();
    await Promise.all(reads);
    expect(done).toBe(3);
    await device.read(new Uint8Array(1), 0);
    await device.close();
  });
});
