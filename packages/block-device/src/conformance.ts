/**
 * The BlockDevice conformance suite, exported as `@gannet/block-device/conformance` so every device,
 * layer and volume view runs the same checks in one line (the abstract-level pattern):
 *
 *   runBlockDeviceSuite({ name: 'MemoryDevice', factory: async (size) => ({ device: new MemoryDevice(size) }) });
 *
 * Goal: every guarantee of the contract in device.ts, checked on data read back and on error codes
 * (never messages). Method: a byte model of the device is updated alongside each mutation and compared
 * with what the device reads; patterns never contain a zero byte and repeat every 251 bytes, so a
 * misplaced, dropped or zeroed byte shows. The caller declares the device's shape in a manifest
 * (`readOnly`, and the capabilities whose answers differ between devices), the suite checks the device
 * agrees with it, and then checks the one answer the contract gives for that shape: a device without
 * `extents` reports data, one without `cache` or `trim` resolves doing nothing, one without `fastZero`
 * refuses it with ENOTSUP. So the tests registered are exactly the ones that apply, nothing is skipped,
 * and no test accepts "ENOTSUP, or success" where the device said which.
 *
 * The factory returns a fresh device reading as all zeroes. A read-only device may instead come
 * pre-filled: that is what gives "refused mutations leave the data unchanged" its teeth.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { EXTENT_HOLE, EXTENT_ZERO, type BlockDevice, type Capabilities, type Extent } from './device.js';
import { BlockDeviceError, type BlockErrorCode } from './errors.js';
import { KiB, MiB } from './units.js';

export interface BlockDeviceFactoryResult {
  readonly device: BlockDevice;
  readonly cleanup?: () => Promise<void>;
}

export interface BlockDeviceSuiteOptions {
  readonly name: string;
  readonly factory: (sizeBytes: number) => Promise<BlockDeviceFactoryResult>;
  /** Default 1 MiB + 512 + 3: deliberately not a multiple of 512. */
  readonly sizeBytes?: number;
  /**
   * The manifest: the factory makes read-only devices (default false). Read-only devices get the
   * read-only group instead of the tests that write.
   */
  readonly readOnly?: boolean;
  /**
   * The capabilities the device declares where devices differ: checked against the device, then each
   * verb is held to the answer its capability gives. Left out: the values of a device that does
   * everything (MemoryDevice).
   */
  readonly capabilities?: Partial<Pick<Capabilities, 'trim' | 'zero' | 'fastZero' | 'cache' | 'extents'>>;
}

const declaredDefault = { trim: true, zero: true, fastZero: true, cache: true, extents: true } as const;

export const suiteSizeBytesDefault = MiB + 512 + 3;
/** The fixed layouts below need this much room. */
export const suiteSizeBytesMin = 512 * KiB + 1;
/** Whole-device comparisons read in pieces of at most this. */
const readPieceBytesMax = 4 * MiB;
/** Bound on extents calls while walking a range (devices may answer short). */
const extentsCallsMax = 100_000;

/** Bytes 1..251, never 0, shifted by `seed`; the odd period catches off-by-512 and off-by-4096 bugs. */
export function pattern(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = ((i + seed * 37) % 251) + 1;
  return out;
}

async function settle(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => undefined,
    (err: unknown) => err ?? new Error('rejected with nothing'),
  );
}

/** Asserts `p` rejects with a BlockDeviceError whose code is one of `codes`. */
async function expectCode(p: Promise<unknown>, ...codes: BlockErrorCode[]): Promise<void> {
  const err = await settle(p);
  expect(err, `expected a rejection with ${codes.join(' or ')}`).toBeInstanceOf(BlockDeviceError);
  expect(codes).toContain((err as BlockDeviceError).code);
}

/** Asserts `p` resolves. */
async function expectOk(p: Promise<unknown>, what: string): Promise<void> {
  const err = await settle(p);
  expect(err, `${what} must succeed`).toBeUndefined();
}

/** Reads into a buffer pre-filled with a non-zero marker, so a device that leaves bytes unfilled shows. */
async function readRange(device: BlockDevice, offset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length).fill(0xa5);
  await device.read(buf, offset);
  return buf;
}

function firstDifference(a: Uint8Array, b: Uint8Array): number {
  expect(a.length).toBe(b.length);
  if (Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length))) return -1;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

/** Asserts the device holds `expected` at `offset`, naming the first wrong byte. */
async function expectBytes(device: BlockDevice, offset: number, expected: Uint8Array): Promise<void> {
  for (let done = 0; done < expected.length; ) {
    const n = Math.min(readPieceBytesMax, expected.length - done);
    const got = await readRange(device, offset + done, n);
    const want = expected.subarray(done, done + n);
    const at = firstDifference(got, want);
    if (at >= 0) {
      expect.fail(`byte at device offset ${offset + done + at}: got ${got[at]}, expected ${want[at]}`);
    }
    done += n;
  }
}

async function expectZero(device: BlockDevice, offset: number, length: number): Promise<void> {
  for (let done = 0; done < length; ) {
    const n = Math.min(readPieceBytesMax, length - done);
    const got = await readRange(device, offset + done, n);
    const at = got.findIndex((b) => b !== 0);
    if (at >= 0) expect.fail(`byte at device offset ${offset + done + at}: got ${got[at]}, expected 0`);
    done += n;
  }
}

/** What the device should hold, mutated alongside it. */
class Model {
  readonly bytes: Uint8Array;
  constructor(bytes: Uint8Array) {
    this.bytes = bytes;
  }
  async write(device: BlockDevice, data: Uint8Array, offset: number, options?: { fua?: boolean }): Promise<void> {
    await device.write(data, offset, options);
    this.bytes.set(data, offset);
  }
  zero(offset: number, length: number): void {
    this.bytes.fill(0, offset, offset + length);
  }
  async check(device: BlockDevice): Promise<void> {
    await expectBytes(device, 0, this.bytes);
  }
  /** Checks everything outside [offset, offset + length). */
  async checkOutside(device: BlockDevice, offset: number, length: number): Promise<void> {
    await expectBytes(device, 0, this.bytes.subarray(0, offset));
    await expectBytes(device, offset + length, this.bytes.subarray(offset + length));
  }
}

/**
 * Walks the extents of [offset, offset + length), checking the shape the contract promises, that
 * ZERO-flagged ranges read as zero (so written, non-zero data is never reported ZERO), and that a device
 * without `capabilities.extents` reports plain data.
 */
async function checkExtents(device: BlockDevice, offset: number, length: number): Promise<{ offset: number; extent: Extent }[]> {
  const end = offset + length;
  const all: { offset: number; extent: Extent }[] = [];
  let cursor = offset;
  for (let calls = 0; cursor < end; calls++) {
    expect(calls, 'extents made no progress within the call bound').toBeLessThan(extentsCallsMax);
    const extents = await device.extents(cursor, end - cursor);
    expect(extents.length, `extents(${cursor}, ${end - cursor}) must cover at least the first byte`).toBeGreaterThan(0);
    for (const extent of extents) {
      expect(Number.isSafeInteger(extent.length) && extent.length > 0, `extent length ${extent.length}`).toBe(true);
      expect(extent.flags & ~(EXTENT_HOLE | EXTENT_ZERO), `extent flags ${extent.flags}`).toBe(0);
      if (!device.capabilities.extents) expect(extent.flags, 'a device without extents reports data').toBe(0);
      all.push({ offset: cursor, extent });
      cursor += extent.length;
      expect(cursor, 'extents run past the requested range').toBeLessThanOrEqual(end);
    }
  }
  expect(cursor).toBe(end);
  expect(cursor).toBeLessThanOrEqual(device.size);
  for (const { offset: at, extent } of all) {
    if (extent.flags & EXTENT_ZERO) await expectZero(device, at, extent.length);
  }
  return all;
}

export function runBlockDeviceSuite(options: BlockDeviceSuiteOptions): void {
  const { name, factory } = options;
  const readOnly = options.readOnly ?? false;
  const declared = { ...declaredDefault, ...options.capabilities };
  const size = options.sizeBytes ?? suiteSizeBytesDefault;
  if (!Number.isSafeInteger(size) || size < suiteSizeBytesMin) {
    throw new Error(`runBlockDeviceSuite(${name}): sizeBytes must be an integer >= ${suiteSizeBytesMin}, got ${size}`);
  }

  describe(`BlockDevice conformance: ${name}`, () => {
    let device: BlockDevice;
    let cleanup: (() => Promise<void>) | undefined;
    /** For writable devices, all zero (checked); for read-only ones, whatever they were made with. */
    let model: Model;

    beforeEach(async () => {
      const made = await factory(size);
      device = made.device;
      cleanup = made.cleanup;
      expect(device.capabilities.readOnly, 'capabilities.readOnly must match the suite manifest').toBe(readOnly);
      for (const [key, value] of Object.entries(declared)) {
        expect(device.capabilities[key as keyof typeof declared], `capabilities.${key} must match the suite manifest`).toBe(value);
      }
      const initial = new Uint8Array(size);
      if (device.capabilities.readOnly) {
        for (let done = 0; done < size; done += readPieceBytesMax) {
          const n = Math.min(readPieceBytesMax, size - done);
          await device.read(initial.subarray(done, done + n), done);
        }
      }
      model = new Model(initial);
    });

    afterEach(async () => {
      try {
        await device.close();
      } finally {
        await cleanup?.();
      }
    });

    // Tests that mutate are registered only for writable devices, the read-only group only for read-only
    // ones: the manifest says which, and beforeEach checks the device agrees with it.
    const itWritable = (title: string, fn: () => Promise<void>): void => {
      if (!readOnly) it(title, fn);
    };

    describe('shape', () => {
      it('has the requested size', () => {
        expect(device.size).toBe(size);
      });

      it('declares every capability as a boolean, and fastZero only with zero', () => {
        const caps = device.capabilities;
        for (const key of ['readOnly', 'flush', 'fua', 'trim', 'zero', 'fastZero', 'cache', 'multiConn', 'extents'] as const) {
          expect(typeof caps[key], key).toBe('boolean');
        }
        if (caps.fastZero) expect(caps.zero).toBe(true);
      });

      it('declares block sizes as the contract bounds them', () => {
        const { minimum, preferred, maximum } = device.blockSizes;
        const powerOfTwo = (n: number) => Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
        expect(powerOfTwo(minimum) && minimum <= 65536, `minimum ${minimum}`).toBe(true);
        expect(powerOfTwo(preferred) && preferred >= 512 && preferred >= minimum, `preferred ${preferred}`).toBe(true);
        expect(maximum).toBeGreaterThanOrEqual(preferred);
      });
    });

    describe('read', () => {
      itWritable('a fresh device reads as zeroes, in one read and byte-granular at odd places', async () => {
        await expectZero(device, 0, size);
        await expectZero(device, 777, 3);
        await expectZero(device, size - 1, 1);
      });

      it('reads are stable and agree whatever the split', async () => {
        await model.check(device);
        await expectBytes(device, 4093, model.bytes.subarray(4093, 4093 + 70_001));
        await expectBytes(device, size - 515, model.bytes.subarray(size - 515));
      });

      it('zero-length reads succeed up to the very end, and are refused past it', async () => {
        await device.read(new Uint8Array(0), 0);
        await device.read(new Uint8Array(0), size);
        await expectCode(device.read(new Uint8Array(0), size + 1), 'EINVAL');
      });

      itWritable('fills a view with a byte offset and nothing around it', async () => {
        const data = pattern(5000, 1);
        await model.write(device, data, 777);
        const backing = new Uint8Array(5020).fill(0x5a);
        const view = backing.subarray(7, 7 + 5000);
        await device.read(view, 777);
        expect(firstDifference(view, data)).toBe(-1);
        expect(backing.subarray(0, 7).every((b) => b === 0x5a)).toBe(true);
        expect(backing.subarray(5007).every((b) => b === 0x5a)).toBe(true);
      });
    });

    if (!readOnly) describe('write', () => {
      itWritable('byte-granular unaligned writes read back exactly, neighbours intact', async () => {
        const writes: [offset: number, length: number][] = [
          [4096 + 100, 200], // head and tail inside one 4 KiB block
          [3 * 4096 - 7, 4096 + 14], // spans three blocks, unaligned both ends
          [0, 1],
          [511, 2], // across a sector boundary
          [65536 - 300, 600], // across a 64 KiB boundary
          [70_000, 140_001], // many blocks
          [4096 + 150, 50], // overwrites part of the first write
        ];
        let seed = 10;
        for (const [offset, length] of writes) await model.write(device, pattern(length, seed++), offset);
        await model.check(device);
      });

      itWritable('the last partial sector at the odd end reads back', async () => {
        const tail = size % 512 === 0 ? 512 : size % 512;
        await model.write(device, pattern(512 + tail, 3), size - 512 - tail);
        await expectBytes(device, size - 512 - tail, model.bytes.subarray(size - 512 - tail));
        await model.write(device, pattern(1, 4), size - 1);
        await expectBytes(device, size - 3, model.bytes.subarray(size - 3));
        await model.check(device);
      });

      itWritable('zero-length writes succeed, including at the very end', async () => {
        await device.write(new Uint8Array(0), 0);
        await device.write(new Uint8Array(0), size);
        await expectCode(device.write(new Uint8Array(0), size + 1), 'ENOSPC');
        await model.check(device);
      });

      itWritable('does not retain the caller buffer, and honours a view byte offset', async () => {
        const data = pattern(9000, 5);
        const expected = data.slice();
        await device.write(data, 1000);
        data.fill(0xee);
        await expectBytes(device, 1000, expected);
        const backing = new Uint8Array(9000).fill(0xee);
        const view = backing.subarray(13, 13 + 5000);
        view.set(pattern(5000, 6));
        await device.write(view, 20_000);
        const viewExpected = view.slice();
        backing.fill(0xdd);
        await expectBytes(device, 20_000, viewExpected);
        // Servers recycle payloads (nbd-server-js does from 4 KiB), so large writes must not keep them either.
        const largeBytes = Math.min(300_000, size - 40_000);
        if (largeBytes > 0) {
          const large = pattern(largeBytes, 8);
          const largeExpected = large.slice();
          await device.write(large, 40_000);
          large.fill(0xcc);
          await expectBytes(device, 40_000, largeExpected);
        }
      });

      itWritable('FUA writes resolve and read back', async () => {
        expect(device.capabilities.fua, 'a writable device in this suite takes FUA').toBe(true);
        await model.write(device, pattern(4096 + 9, 7), 12_345, { fua: true });
        await model.check(device);
      });

      itWritable('writeBatch writes every run, shared or not, and refuses a batch with a run past the end', async () => {
        const shared = new Uint8Array(new SharedArrayBuffer(3 * 4096 + 100));
        shared.set(pattern(shared.length, 40));
        const runs = [
          { offset: 100_000, buffers: [shared.subarray(100, 4196), pattern(10, 41)] },
          { offset: 7, buffers: [pattern(5000, 42)] },
          { offset: size - 3, buffers: [shared.subarray(0, 3)] },
          { offset: 50_000, buffers: [] },
          { offset: 60_001, buffers: [shared.subarray(4196), new Uint8Array(0), pattern(1, 43)] },
        ];
        const before = model.bytes.slice();
        await device.writeBatch(runs);
        for (const run of runs) model.bytes.set(Buffer.concat(run.buffers), run.offset);
        shared.fill(0xee);
        await model.check(device);
        await device.writeBatch([]);
        await expectCode(device.writeBatch([{ offset: 0, buffers: [pattern(10, 44)] }, { offset: size - 1, buffers: [pattern(2, 45)] }]), 'ENOSPC');
        expect(before.length).toBe(size);
        await model.check(device);
      });

      itWritable('writev writes its pieces back to back, as one write', async () => {
        const pieces = [pattern(100, 30), new Uint8Array(0), pattern(4096, 31), pattern(1, 32), pattern(70_001, 33)];
        const joined = Buffer.concat(pieces);
        await device.writev(pieces, 5_003);
        model.bytes.set(joined, 5_003);
        await model.check(device);
        await device.writev([], size);
        await device.writev([new Uint8Array(0)], 0);
        await expectCode(device.writev([pattern(10, 1), pattern(10, 2)], size - 19), 'ENOSPC');
        await model.check(device);
      });

      itWritable('many concurrent writes to disjoint ranges all land', async () => {
        const count = 64;
        const stride = 4099;
        const writes: Promise<void>[] = [];
        for (let i = 0; i < count; i++) {
          const data = pattern(1000 + i * 47, 100 + i);
          writes.push(device.write(data, 17 + i * stride));
          model.bytes.set(data, 17 + i * stride);
        }
        await Promise.all(writes);
        await model.check(device);
      });

      itWritable('overlapping concurrent writes leave each byte from one of the writes covering it', async () => {
        const offset = 1234;
        const writes = [
          { at: offset, data: new Uint8Array(9000).fill(0x11) },
          { at: offset, data: new Uint8Array(9000).fill(0x22) },
          { at: offset + 4000, data: new Uint8Array(9000).fill(0x33) },
        ];
        await Promise.all(writes.map((w) => device.write(w.data, w.at)));
        const end = offset + 4000 + 9000;
        const got = await readRange(device, offset, end - offset);
        for (let i = 0; i < got.length; i++) {
          const allowed = writes.filter((w) => offset + i >= w.at && offset + i < w.at + w.data.length).map((w) => w.data[0]);
          if (!allowed.includes(got[i])) expect.fail(`byte at ${offset + i} is ${got[i]}, not one of ${allowed.join(', ')}`);
        }
        await model.checkOutside(device, offset, end - offset);
        await expectBytes(device, offset, got);
      });
    });

    describe('out of range', () => {
      it('write and writeZeroes past the end reject ENOSPC and change nothing', async () => {
        // The range is checked before read-only, as nbdkit orders them.
        const codes: BlockErrorCode[] = ['ENOSPC'];
        await expectCode(device.write(pattern(2, 1), size - 1), 'ENOSPC');
        await expectCode(device.write(pattern(1, 1), size), ...codes);
        await expectCode(device.write(pattern(4096, 1), size + 4096), ...codes);
        await expectCode(device.writeZeroes(size - 1, 2), ...codes);
        await expectCode(device.writeZeroes(size, 1), ...codes);
        await model.check(device);
      });

      it('read, trim, cache and extents past the end reject EINVAL', async () => {
        const ro = device.capabilities.readOnly;
        await expectCode(device.read(new Uint8Array(2), size - 1), 'EINVAL');
        await expectCode(device.read(new Uint8Array(1), size), 'EINVAL');
        await expectCode(device.extents(size - 1, 2), 'EINVAL');
        await expectCode(device.extents(size, 1), 'EINVAL');
        // The range is checked before read-only, as nbdkit orders them.
        await expectCode(device.trim(size - 1, 2), 'EINVAL');
        await expectCode(device.cache(size - 1, 2), 'EINVAL');
        if (ro) await expectCode(device.trim(size, 0), 'EPERM');
        await model.check(device);
      });

      it('negative and non-integer offsets reject EINVAL', async () => {
        await expectCode(device.read(new Uint8Array(1), -1), 'EINVAL');
        await expectCode(device.read(new Uint8Array(1), 1.5), 'EINVAL');
        await expectCode(device.extents(-1, 1), 'EINVAL');
      });
    });

    if (!readOnly) describe('writeZeroes', () => {
      const variants: { label: string; options: { noHole?: boolean; fua?: boolean } }[] = [
        { label: 'plain', options: {} },
        { label: 'noHole', options: { noHole: true } },
        { label: 'fua', options: { fua: true } },
        { label: 'noHole + fua', options: { noHole: true, fua: true } },
      ];
      for (const { label, options: zeroOptions } of variants) {
        itWritable(`${label}: the range reads zero and neighbours stay intact`, async () => {
          await model.write(device, pattern(300_000, 8), 0);
          await model.write(device, pattern(4096, 9), size - 4096);
          const ranges: [offset: number, length: number][] = [
            [1000, 200_000], // partial head, whole 4 KiB and 64 KiB blocks, partial tail
            [250_005, 3], // inside one sector
            [size - 7, 7], // the odd end
          ];
          for (const [offset, length] of ranges) {
            await expectOk(device.writeZeroes(offset, length, zeroOptions), `writeZeroes(${offset}, ${length})`);
            model.zero(offset, length);
          }
          await model.check(device);
          if (zeroOptions.noHole && device.capabilities.extents) {
            for (const { extent } of await checkExtents(device, 1000, 200_000)) {
              expect(extent.flags & EXTENT_HOLE, 'noHole zeroing of allocated data must not leave a hole').toBe(0);
            }
          }
        });
      }

      itWritable('zero-length writeZeroes succeeds', async () => {
        await expectOk(device.writeZeroes(0, 0), 'writeZeroes(0, 0)');
        await expectOk(device.writeZeroes(size, 0), 'writeZeroes(size, 0)');
        await model.check(device);
      });

      itWritable('fastZero succeeds and reads zero, or rejects ENOTSUP and changes nothing, per capabilities', async () => {
        await model.write(device, pattern(200_000, 11), 0);
        const err = await settle(device.writeZeroes(100, 150_000, { fastZero: true }));
        if (declared.fastZero) {
          expect(err).toBeUndefined();
          model.zero(100, 150_000);
        } else {
          expect(err).toBeInstanceOf(BlockDeviceError);
          expect((err as BlockDeviceError).code).toBe('ENOTSUP');
        }
        await model.check(device);
      });
    });

    if (!readOnly) describe('trim', () => {
      for (const fua of [false, true]) {
        itWritable(`${fua ? 'fua: ' : ''}leaves neighbours unchanged; the trimmed range reads, ZERO extents there read zero`, async () => {
          await model.write(device, pattern(300_000, 12), 0);
          const offset = 1001;
          const length = 200_003;
          await expectOk(device.trim(offset, length, { fua }), 'trim');
          await model.checkOutside(device, offset, length);
          if (!declared.trim) {
            // Without the capability trim is advisory and does nothing.
            await model.check(device);
            return;
          }
          // After a trim the contents are unspecified, but reading them must work and agree with extents.
          await readRange(device, offset, length);
          await checkExtents(device, offset, length);
        });
      }
    });

    describe('extents', () => {
      it('of zero bytes answer nothing, anywhere up to the end', async () => {
        expect(await device.extents(0, 0)).toEqual([]);
        expect(await device.extents(size, 0)).toEqual([]);
        await expectCode(device.extents(size + 1, 0), 'EINVAL');
      });

      if (!declared.extents) {
        it('report the whole range as data, as the device declares no extents', async () => {
          if (!readOnly) await model.write(device, pattern(5000, 17), 1000);
          expect(await device.extents(777, 70_000)).toEqual([{ length: 70_000, flags: 0 }]);
        });
      }

      it('cover the whole device in order, on a fresh device and after writes', async () => {
        await checkExtents(device, 0, size);
        if (device.capabilities.readOnly) return;
        await model.write(device, pattern(5000, 13), 100_000);
        await model.write(device, pattern(10, 14), size - 10);
        await checkExtents(device, 0, size);
      });

      itWritable('answer for unaligned and tail ranges, never past the size', async () => {
        await model.write(device, pattern(3000, 15), 70_001);
        await checkExtents(device, 777, 3);
        await checkExtents(device, 70_500, 1000);
        await checkExtents(device, 69_999, 100_000);
        await checkExtents(device, size - 3, 3);
        await checkExtents(device, size - 1, 1);
      });
    });

    describe('flush and cache', () => {
      it('flush resolves, also after writes', async () => {
        if (!device.capabilities.readOnly) await model.write(device, pattern(4096, 16), 8192);
        await expectOk(device.flush(), 'flush');
        await model.check(device);
      });

      it('cache resolves over in-range, unaligned and empty ranges, and changes nothing', async () => {
        for (const [offset, length] of [[0, size], [777, 3], [size - 1, 1], [size, 0]] as const) {
          await expectOk(device.cache(offset, length), `cache(${offset}, ${length})`);
        }
        await model.check(device);
      });
    });

    describe('closed', () => {
      it('every verb rejects ESHUTDOWN once the device is closed', async () => {
        await device.close();
        await expectCode(device.read(new Uint8Array(1), 0), 'ESHUTDOWN');
        await expectCode(device.write(new Uint8Array(1), 0), 'ESHUTDOWN');
        await expectCode(device.writev([new Uint8Array(1)], 0), 'ESHUTDOWN');
        await expectCode(device.flush(), 'ESHUTDOWN');
        await expectCode(device.trim(0, 1), 'ESHUTDOWN');
        await expectCode(device.writeZeroes(0, 1), 'ESHUTDOWN');
        await expectCode(device.cache(0, 1), 'ESHUTDOWN');
        await expectCode(device.extents(0, 1), 'ESHUTDOWN');
        // Closing again is harmless.
        await device.close();
      });
    });

    if (readOnly) describe('read-only', () => {
      it('every mutating verb rejects EPERM and the data is unchanged', async () => {
        await expectCode(device.write(pattern(1, 1), 0), 'EPERM');
        await expectCode(device.write(pattern(4096, 1), size - 4096, { fua: true }), 'EPERM');
        await expectCode(device.write(new Uint8Array(0), 0), 'EPERM');
        await expectCode(device.writeZeroes(0, 4096), 'EPERM');
        await expectCode(device.writeZeroes(100, 70_000, { noHole: true, fua: true }), 'EPERM');
        await expectCode(device.writeZeroes(100, 70_000, { fastZero: true }), 'EPERM');
        await expectCode(device.trim(0, size), 'EPERM');
        await model.check(device);
        await checkExtents(device, 0, size);
      });
    });
  });
}
