/**
 * ReplicatedVolume: the GANNET engine. Goal: every view is a conforming BlockDevice in every state, and the
 * engine keeps the rules of DESIGN.md (views, checkpoint atomicity, failover contents, durability, errors).
 * Method: the shared conformance suite on both views (fresh, with committed buffers, after each failover
 * target), then explicit cases that check bytes read back through the views and from the backing file
 * itself (with fs, not through the engine), error codes, states and events.
 */
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { runBlockDeviceSuite } from '@gannet/block-device/conformance';
import { BlockDeviceError, EXTENT_ZERO, type BlockDevice, type FaultDevice } from '@gannet/block-device';
import { GannetError, ReplicatedVolume, checkpointGroup, openVolume, type FailoverTarget, type VolumeOptions } from '@gannet/core';
import { faultyStorage, failWrites } from './faulty-storage.js';

const KiB = 1024;
const MiB = 1024 * KiB;

const root = mkdtempSync(join(tmpdir(), 'gannet-volume-test-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let dirCount = 0;

function volumeOptions(sizeBytes: number, extra: Partial<VolumeOptions> = {}): VolumeOptions {
  const dir = join(root, `v${dirCount++}`);
  return { path: join(dir, 'disk.img'), dataDir: join(dir, 'meta'), sizeBytes, ...extra };
}

/** Deterministic bytes: distinct per (seed, position). */
function pattern(length: number, seed: number): Buffer {
  const out = Buffer.alloc(length);
  for (let i = 0; i < length; i++) out[i] = (seed * 131 + i * 7 + (i >> 8)) & 0xff || 1;
  return out;
}

async function readAll(device: BlockDevice, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  await device.read(buf, offset);
  return buf;
}

async function flushed(volume: ReplicatedVolume, epoch: number): Promise<void> {
  while (volume.stats().durableEpoch < epoch) await once(volume, 'flushed');
}

/** Byte comparison that stays fast on MiB buffers and names the first differing offset. */
function expectBytes(actual: Uint8Array, expected: Uint8Array): void {
  const a = Buffer.from(actual.buffer, actual.byteOffset, actual.byteLength);
  const e = Buffer.from(expected.buffer, expected.byteOffset, expected.byteLength);
  if (a.equals(e)) return;
  let i = 0;
  while (i < a.length && i < e.length && a[i] === e[i]) i++;
  expect.fail(`bytes differ at offset ${i} (lengths ${a.length}, ${e.length}): got ${a[i]}, expected ${e[i]}`);
}

/**
 * Fails over with every change to the backing file failing: the failover becomes durable (its journal
 * is another file) but cannot be applied; the volume is then closed, as a crash would leave it.
 */
async function interruptedFailover(volume: ReplicatedVolume, backing: FaultDevice, to: FailoverTarget): Promise<void> {
  failWrites(backing, new Error('injected'));
  const durable = once(volume, 'failover-durable');
  await volume.failover({ to });
  await durable;
  while (volume.stats().error === undefined) await once(volume, 'error');
  await volume.close().catch(() => undefined);
}

async function expectCode(promise: Promise<unknown>, code: string): Promise<void> {
  await expect(promise).rejects.toSatisfy((err: unknown) => (err as { code?: string }).code === code);
}

// ---- conformance ----------------------------------------------------------------------------------

const opened: ReplicatedVolume[] = [];
const cleanupVolume = (volume: ReplicatedVolume) => async () => {
  await volume.close();
};

function suiteOn(
  name: string,
  prepare: (volume: ReplicatedVolume, size: number) => Promise<void>,
  view: 'primary' | 'secondary',
  readOnly = false,
) {
  runBlockDeviceSuite({
    name: `ReplicatedVolume ${view} view, ${name}`,
    readOnly,
    // A failed-over volume is a plain file: zeroes may have to be written, so they are not promised fast.
    capabilities: name.startsWith('after failover') ? { fastZero: false } : {},
    factory: async (sizeBytes) => {
      const volume = await ReplicatedVolume.open(volumeOptions(sizeBytes, { blockBytes: 4096 }));
      opened.push(volume);
      await prepare(volume, sizeBytes);
      return { device: volume[view], cleanup: cleanupVolume(volume) };
    },
  });
}

/** Leaves non-empty committed buffers that read as zeroes, so the suite runs over C, not just B. */
async function committedZeroes(volume: ReplicatedVolume, size: number): Promise<void> {
  await volume.primary.write(pattern(size, 1), 0);
  await volume.checkpoint();
  await volume.primary.writeZeroes(0, Math.floor(size / 2));
  await volume.primary.write(Buffer.alloc(size - Math.floor(size / 2)), Math.floor(size / 2));
  await volume.checkpoint();
}

/** Writes to the side the failover drops, then fails over: the kept side and the disk read as zeroes. */
function failedOver(to: FailoverTarget) {
  return async (volume: ReplicatedVolume, size: number) => {
    if (to !== 'primary') await volume.primary.write(pattern(size, 2), 0);
    if (to !== 'secondary') await volume.secondary.write(pattern(size, 3), 0);
    await volume.failover({ to });
  };
}

for (const view of ['primary', 'secondary'] as const) {
  suiteOn('fresh', async () => undefined, view);
  suiteOn('over committed buffers', committedZeroes, view);
  // After failover the primary view still reads but refuses writes.
  for (const to of ['secondary', 'checkpoint', 'primary'] as const) {
    suiteOn(`after failover to ${to}`, failedOver(to), view, view === 'primary');
  }
}

// ---- explicit cases -------------------------------------------------------------------------------

describe('ReplicatedVolume', () => {
  it('rejects invalid options with EOPTIONS naming the field', async () => {
    const bad = { ...volumeOptions(MiB), blockBytes: 1000 };
    await expect(ReplicatedVolume.open(bad)).rejects.toSatisfy(
      (err: unknown) => err instanceof GannetError && err.code === 'EOPTIONS' && err.message.includes('blockBytes'),
    );
    await expect(ReplicatedVolume.open({ ...volumeOptions(MiB), sizeBytes: -1 })).rejects.toThrow(/sizeBytes/);
  });

  it('creates a sparse backing file of the given size', async () => {
    const options = volumeOptions(3 * MiB + 7);
    const volume = await ReplicatedVolume.open(options);
    expect(readFileSync(options.path).length).toBe(3 * MiB + 7);
    expect(volume.stats()).toMatchObject({ strategy: 'gannet', state: 'replicating', epoch: 0, durableEpoch: 0 });
    await volume.close();
    await expect(ReplicatedVolume.open({ ...options, sizeBytes: 2 * MiB })).rejects.toSatisfy(
      (err: unknown) => err instanceof GannetError && err.code === 'EMISMATCH',
    );
  });

  it('keeps each view to its own writes until the checkpoint, then shows the primary', async () => {
    const volume = await ReplicatedVolume.open(volumeOptions(MiB));
    const p = pattern(4096, 10);
    const s = pattern(4096, 20);
    await volume.primary.write(p, 8192);
    await volume.secondary.write(s, 8192);
    expectBytes(await readAll(volume.primary, 8192, 4096), p);
    expectBytes(await readAll(volume.secondary, 8192, 4096), s);
    expect(volume.stats().bufferedBytes).toEqual({ primary: 4096, secondary: 4096, committed: 0 });
    const epoch = await volume.checkpoint();
    expect(epoch).toBe(1);
    expectBytes(await readAll(volume.secondary, 8192, 4096), p);
    expect(volume.stats().bufferedBytes.secondary).toBe(0);
    await flushed(volume, 1);
    await volume.close();
  });

  it('merges a second primary write to a block in the same epoch, byte-granular, unaligned', async () => {
    const options = volumeOptions(64 * KiB + 3);
    const volume = await ReplicatedVolume.open(options);
    const model = Buffer.alloc(options.sizeBytes);
    const writes: [number, number][] = [
      [100, 5000],
      [4095, 2],
      [4000, 300],
      [12287, 8194],
      [options.sizeBytes - 10, 10],
      [0, 1],
    ];
    for (const [i, [offset, length]] of writes.entries()) {
      const data = pattern(length, 30 + i);
      await volume.primary.write(data, offset);
      data.copy(model, offset);
    }
    expectBytes(await readAll(volume.primary, 0, options.sizeBytes), model);
    expectBytes(await readAll(volume.secondary, 0, options.sizeBytes), Buffer.alloc(options.sizeBytes));
    await flushed(volume, await volume.checkpoint());
    expectBytes(readFileSync(options.path), model);
    await volume.close();
  });

  it('records zero and trim as markers without data, reported as zero extents', async () => {
    const volume = await ReplicatedVolume.open(volumeOptions(MiB));
    await volume.secondary.write(pattern(64 * KiB, 40), 0);
    const before = volume.stats().bufferedBytes.secondary;
    await volume.secondary.writeZeroes(0, 32 * KiB);
    await volume.secondary.trim(32 * KiB, 16 * KiB);
    expect(volume.stats().bufferedBytes.secondary).toBe(before - 48 * KiB);
    await volume.secondary.writeZeroes(128 * KiB, 256 * KiB);
    expect(volume.stats().bufferedBytes.secondary).toBe(16 * KiB);
    expectBytes(await readAll(volume.secondary, 0, 48 * KiB), Buffer.alloc(48 * KiB));
    const extents = await volume.secondary.extents(0, 512 * KiB);
    expect(extents).toEqual([
      { length: 48 * KiB, flags: EXTENT_ZERO },
      { length: 80 * KiB, flags: 0 },
      { length: 256 * KiB, flags: EXTENT_ZERO },
      { length: 128 * KiB, flags: 0 },
    ]);
    await volume.close();
  });

  it('acknowledges FLUSH and FUA without disk I/O while replicating, and fdatasyncs after failover', async () => {
    const faults = faultyStorage();
    const volume = await ReplicatedVolume.open(volumeOptions(MiB), faults.context);
    const backing = faults.backing();
    backing.fail('flush', new Error('injected fdatasync failure'));
    failWrites(backing, new Error('injected write failure'));
    await volume.primary.write(pattern(4096, 1), 0, { fua: true });
    await volume.primary.flush();
    await volume.secondary.writeZeroes(4096, 4096, { fua: true });
    await volume.secondary.flush();
    failWrites(backing, null);
    // The failover itself switches at once; making it durable needs the fdatasync that fails.
    await volume.failover();
    expect(volume.stats()).toMatchObject({ state: 'failed-over', failoverTarget: 'secondary' });
    await expectCode(volume.secondary.flush(), 'EIO');
    expect(volume.stats().error).toMatchObject({ code: 'EIO' });
    backing.fail('flush', null);
    // Asked again, the same failover retries what failed, and a FLUSH then is durable.
    await volume.failover();
    await volume.secondary.flush();
    expect(volume.stats()).toMatchObject({ failover: { target: 'secondary', phase: 'done' } });
    expect(volume.stats().error).toBeUndefined();
    await volume.close();
  });

  it('puts a write in flight when the checkpoint arrives wholly into one epoch', async () => {
    const options = volumeOptions(4 * MiB);
    const faults = faultyStorage();
    const volume = await ReplicatedVolume.open(options, faults.context);
    const backing = faults.backing();
    // Unaligned writes first read their old head and tail blocks from the file: hold those reads, so the
    // checkpoint lands between each write's read and its apply. Aligned writes need no read and land now.
    const hold = backing.hold('read');
    const unaligned = Array.from({ length: 20 }, (_, i) => ({ offset: i * 100 * KiB + 123 + i, data: pattern(3 * 4096 + 17, 50 + i) }));
    const aligned = Array.from({ length: 20 }, (_, i) => ({ offset: 2 * MiB + i * 64 * KiB, data: pattern(8192, 80 + i) }));
    const pendingUnaligned = unaligned.map((w) => volume.primary.write(w.data, w.offset));
    await Promise.all(aligned.map((w) => volume.primary.write(w.data, w.offset)));
    await hold.arrived(unaligned.length * 2);
    const epoch = await volume.checkpoint();
    hold.release();
    await Promise.all(pendingUnaligned);
    await flushed(volume, epoch);
    const file1 = readFileSync(options.path);
    for (const w of aligned) expectBytes(file1.subarray(w.offset, w.offset + w.data.length), w.data);
    for (const w of unaligned) expectBytes(file1.subarray(w.offset, w.offset + w.data.length), Buffer.alloc(w.data.length));
    for (const w of unaligned) expectBytes(await readAll(volume.primary, w.offset, w.data.length), w.data);
    expectBytes(await readAll(volume.secondary, unaligned[0].offset, 10), Buffer.alloc(10));
    await flushed(volume, await volume.checkpoint());
    const file2 = readFileSync(options.path);
    for (const w of unaligned) expectBytes(file2.subarray(w.offset, w.offset + w.data.length), w.data);
    await volume.close();
  });

  it('covers exactly the primary writes acknowledged before the checkpoint', async () => {
    const options = volumeOptions(MiB);
    const volume = await ReplicatedVolume.open(options);
    await volume.primary.write(pattern(4096, 60), 0);
    const epoch = await volume.checkpoint();
    await volume.primary.write(pattern(4096, 61), 4096);
    await flushed(volume, epoch);
    const file = readFileSync(options.path);
    expectBytes(file.subarray(0, 4096), pattern(4096, 60));
    expectBytes(file.subarray(4096, 8192), Buffer.alloc(4096));
    expect(volume.stats().bufferedBytes.primary).toBe(4096);
    await volume.close();
  });

  describe('failover leaves exactly the expected bytes in the backing file', () => {
    for (const to of ['secondary', 'checkpoint', 'primary'] as const) {
      it(`to ${to}`, async () => {
        const options = volumeOptions(256 * KiB + 100);
        const faults = faultyStorage();
        const volume = await ReplicatedVolume.open(options, faults.context);
        const size = options.sizeBytes;
        const expected = Buffer.alloc(size);
        const put = (model: Buffer | null, offset: number, data: Buffer) => model !== null && data.copy(model, offset);
        // Epoch 0, flushed: the durable base.
        const base = pattern(64 * KiB, 70);
        await volume.primary.write(base, 0);
        put(expected, 0, base);
        await flushed(volume, await volume.checkpoint());
        // Epoch 1, committed but held back from the file by a write fault: failover must apply it.
        const backing = faults.backing();
        failWrites(backing, new Error('injected'));
        const committed = pattern(10 * KiB, 71);
        await volume.primary.write(committed, 30 * KiB + 5);
        put(expected, 30 * KiB + 5, committed);
        const errors: Error[] = [];
        volume.on('error', (err) => errors.push(err));
        await volume.checkpoint();
        while (errors.length === 0) await once(volume, 'error');
        failWrites(backing, null);
        // Epoch 2: both sides write, overlapping each other and the committed data.
        const p = pattern(20 * KiB, 72);
        const s = pattern(20 * KiB + 3, 73);
        await volume.primary.write(p, 35 * KiB);
        await volume.secondary.write(s, 33 * KiB + 1);
        await volume.secondary.writeZeroes(0, 8 * KiB);
        await volume.primary.write(pattern(99, 74), size - 99);
        if (to === 'primary') {
          put(expected, 35 * KiB, p);
          put(expected, size - 99, pattern(99, 74));
        }
        if (to === 'secondary') {
          put(expected, 33 * KiB + 1, s);
          expected.fill(0, 0, 8 * KiB);
        }
        const events: unknown[] = [];
        for (const name of ['failover', 'failover-durable', 'failover-applied'] as const) volume.on(name, (ev) => events.push({ name, ...ev }));
        await volume.failover({ to });
        expectBytes(await readAll(volume.secondary, 0, size), expected);
        // A FLUSH after failover returns once the kept state is in the file.
        await volume.secondary.flush();
        expectBytes(readFileSync(options.path), expected);
        expect(volume.stats()).toMatchObject({
          state: 'failed-over',
          failoverTarget: to,
          bufferedBytes: { primary: 0, secondary: 0, committed: 0 },
          failover: { target: to, phase: 'done', foregroundMs: expect.any(Number), durableMs: expect.any(Number) },
        });
        expect(events).toEqual([
          { name: 'failover', to, durationMs: expect.any(Number) },
          { name: 'failover-durable', to, durableMs: expect.any(Number), journalBytes: expect.any(Number) },
          { name: 'failover-applied', to, appliedMs: expect.any(Number) },
        ]);
        expectBytes(await readAll(volume.primary, 0, size), expected);
        expectBytes(await readAll(volume.secondary, 0, size), expected);
        // A plain disk now: the secondary writes through, the primary is read-only.
        await expectCode(volume.primary.write(Buffer.alloc(1), 0), 'EPERM');
        expect(volume.primary.capabilities.readOnly).toBe(true);
        const after = pattern(5000, 75);
        await volume.secondary.write(after, 1000, { fua: true });
        after.copy(expected, 1000);
        expectBytes(readFileSync(options.path), expected);
        await expectCode(volume.checkpoint(), 'ESTATE');
        await volume.close();
        const reopened = await ReplicatedVolume.open(options);
        expect(reopened.stats()).toMatchObject({ state: 'failed-over', failoverTarget: to });
        expectBytes(await readAll(reopened.secondary, 0, size), expected);
        await reopened.close();
      });
    }
  });

  it('finishes on the next open a failover that was durable but not yet applied', async () => {
    const options = volumeOptions(MiB);
    const faults = faultyStorage();
    const volume = await ReplicatedVolume.open(options, faults.context);
    volume.on('error', () => undefined);
    const s = pattern(100 * KiB, 80);
    await volume.secondary.write(s, 4000);
    await interruptedFailover(volume, faults.backing(), 'secondary');
    // Served from the journal while it is applied: the data reads at once, and a FLUSH makes it land.
    const reopened = await ReplicatedVolume.open(options);
    expect(reopened.stats()).toMatchObject({ state: 'failed-over', failoverTarget: 'secondary', failover: { phase: 'applying' } });
    const expected = Buffer.alloc(MiB);
    s.copy(expected, 4000);
    expectBytes(await readAll(reopened.secondary, 0, MiB), expected);
    await reopened.secondary.flush();
    expect(reopened.stats().failover).toMatchObject({ phase: 'done' });
    expectBytes(readFileSync(options.path), expected);
    await reopened.close();
  });

  it('reports a failover the process stopped before it was durable, and reopens at the checkpoint', async () => {
    const options = volumeOptions(MiB);
    const faults = faultyStorage();
    const volume = await ReplicatedVolume.open(options, faults.context);
    volume.on('error', () => undefined);
    const base = pattern(8 * KiB, 81);
    await volume.primary.write(base, 0);
    await flushed(volume, await volume.checkpoint());
    await volume.secondary.write(pattern(100 * KiB, 82), 4000);
    faults.backing().fail('flush', new Error('injected'));
    await volume.failover({ to: 'secondary' });
    expect(volume.stats().failover).toMatchObject({ phase: 'journaling' });
    await expect(volume.close()).rejects.toBeDefined();
    const reopened = await ReplicatedVolume.open(options);
    expect(reopened.stats()).toMatchObject({
      state: 'replicating',
      lostFailover: { target: 'secondary', requestedAt: expect.any(String), lostAt: expect.any(String) },
    });
    const expected = Buffer.alloc(MiB);
    base.copy(expected, 0);
    expectBytes(await readAll(reopened.secondary, 0, MiB), expected);
    expectBytes(readFileSync(options.path), expected);
    // The next failover is the operator's to ask for again.
    await reopened.failover({ to: 'checkpoint' });
    await reopened.secondary.flush();
    expect(reopened.stats().lostFailover).toBeUndefined();
    await reopened.close();
  });

  it('reopens after close at the last durable checkpoint, with a higher epoch', async () => {
    const options = volumeOptions(MiB);
    const volume = await ReplicatedVolume.open(options);
    const data = pattern(50 * KiB, 90);
    await volume.primary.write(data, 10);
    const e1 = await volume.checkpoint();
    await volume.primary.write(pattern(10, 91), 0);
    await volume.secondary.write(pattern(10, 92), 0);
    await volume.close();
    expect(volume.stats().state).toBe('closed');
    await expectCode(volume.primary.read(Buffer.alloc(1), 0), 'ESHUTDOWN');
    const reopened = await ReplicatedVolume.open(options);
    const stats = reopened.stats();
    expect(stats.durableEpoch).toBe(e1);
    expect(stats.epoch).toBeGreaterThan(e1);
    expect(stats.tornRanges).toEqual([]);
    const expected = Buffer.alloc(MiB);
    data.copy(expected, 10);
    expectBytes(await readAll(reopened.primary, 0, MiB), expected);
    expectBytes(await readAll(reopened.secondary, 0, MiB), expected);
    const e2 = await reopened.checkpoint();
    expect(e2).toBe(stats.epoch + 1);
    await reopened.close();
  });

  it('reports an I/O error, refuses the next checkpoint, keeps the data, and recovers', async () => {
    const options = volumeOptions(MiB);
    const faults = faultyStorage();
    const volume = await ReplicatedVolume.open(options, faults.context);
    const errors: Error[] = [];
    volume.on('error', (err) => errors.push(err));
    failWrites(faults.backing(), new Error('injected EIO'));
    const data = pattern(40 * KiB, 100);
    await volume.primary.write(data, 0);
    await volume.checkpoint();
    while (errors.length === 0) await once(volume, 'error');
    expect((errors[0] as GannetError).code).toBe('EIO');
    // The refused checkpoint starts a retry, which fails again while the fault lasts.
    await expect(volume.checkpoint()).rejects.toSatisfy((err: unknown) => err instanceof GannetError && err.code === 'EIO');
    while (errors.length < 2) await once(volume, 'error');
    expect(volume.stats().durableEpoch).toBe(0);
    expect(volume.stats().bufferedBytes.committed).toBe(40 * KiB);
    expectBytes(await readAll(volume.secondary, 0, 40 * KiB), data);
    expectBytes(readFileSync(options.path).subarray(0, 40 * KiB), Buffer.alloc(40 * KiB));
    // With the fault gone, the retry the next refusal starts succeeds.
    failWrites(faults.backing(), null);
    await expect(volume.checkpoint()).rejects.toSatisfy((err: unknown) => (err as GannetError).code === 'EIO');
    await flushed(volume, 1);
    expect(await volume.checkpoint()).toBe(2);
    expectBytes(readFileSync(options.path).subarray(0, 40 * KiB), data);
    await volume.close();
  });

  it('reports the ranges of an interrupted flush as torn after reopen', async () => {
    const options = volumeOptions(MiB);
    const faults = faultyStorage();
    const volume = await ReplicatedVolume.open(options, faults.context);
    volume.on('error', () => undefined);
    faults.backing().fail('flush', new Error('injected'));
    await volume.primary.write(pattern(8192, 110), 4096);
    await volume.primary.write(pattern(100, 111), 100 * KiB);
    await volume.checkpoint();
    await once(volume, 'error');
    await expect(volume.close()).rejects.toSatisfy((err: unknown) => (err as GannetError).code === 'EIO');
    const reopened = await ReplicatedVolume.open(options);
    expect(reopened.stats()).toMatchObject({
      durableEpoch: 0,
      tornRanges: [
        { offset: 4096, length: 8192 },
        { offset: 100 * KiB, length: 4096 },
      ],
    });
    // A resync of the torn ranges through the primary, flushed, clears them.
    await reopened.primary.write(pattern(8192, 112), 4096);
    await flushed(reopened, await reopened.checkpoint());
    expect(reopened.stats().tornRanges).toEqual([{ offset: 100 * KiB, length: 4096 }]);
    await reopened.close();
  });

  it('spills the coldest blocks at the memory limit and keeps serving them', async () => {
    const options = volumeOptions(8 * MiB, { memoryBytesMax: MiB, pressureRatio: 0.5 });
    const volume = await ReplicatedVolume.open(options);
    const pressure: unknown[] = [];
    volume.on('pressure', (ev) => pressure.push(ev));
    const p = pattern(3 * MiB, 120);
    const s = pattern(512 * KiB + 5, 121);
    for (let off = 0; off < p.length; off += 256 * KiB) await volume.primary.write(p.subarray(off, off + 256 * KiB), off);
    await volume.secondary.write(s, 2 * MiB + 11);
    const stats = volume.stats();
    const inMemory = stats.bufferedBytes.primary + stats.bufferedBytes.secondary;
    expect(inMemory).toBeLessThanOrEqual(MiB);
    expect(inMemory + stats.spilledBytes).toBe(3 * MiB + 512 * KiB + 4096);
    expect(pressure).toEqual([{ bufferedBytes: expect.any(Number), memoryBytesMax: MiB }]);
    expectBytes(await readAll(volume.primary, 0, 3 * MiB), p);
    expectBytes(await readAll(volume.secondary, 2 * MiB + 11, 512 * KiB + 5), s);
    // A partial write to a spilled block merges with its spilled content.
    await volume.primary.write(Buffer.from([1, 2, 3]), 10);
    p.set([1, 2, 3], 10);
    expectBytes(await readAll(volume.primary, 0, 64), p.subarray(0, 64));
    await flushed(volume, await volume.checkpoint());
    expectBytes(readFileSync(options.path).subarray(0, 3 * MiB), p);
    expect(volume.stats().spilledBytes).toBe(0);
    await volume.close();
  });

  it('keeps blocks that are read again in memory while colder ones spill (second chance)', async () => {
    const blockBytes = 4096;
    const volume = await ReplicatedVolume.open(volumeOptions(8 * MiB, { memoryBytesMax: MiB, blockBytes }));
    const hotBlocks = 16;
    const hot = pattern(hotBlocks * blockBytes, 130);
    // Written first, so they sit at the cold end of the LRU; read between the cold writes (a read does
    // not change a slot's version, so only recency keeps them from being spilled).
    await volume.primary.write(hot, 0);
    const cold = pattern(3 * MiB, 131);
    for (let off = 0; off < cold.length; off += 64 * KiB) {
      await volume.primary.write(cold.subarray(off, off + 64 * KiB), MiB + off);
      expectBytes(await readAll(volume.primary, 0, hot.length), hot);
    }
    expect(volume.stats().spilledBytes).toBeGreaterThan(MiB);
    const where = Array.from({ length: hotBlocks }, (_, b) => volume.residence('primary', b * blockBytes));
    expect(where).toEqual(Array(hotBlocks).fill('memory'));
    expectBytes(await readAll(volume.primary, 0, hot.length), hot);
    expectBytes(await readAll(volume.primary, MiB, cold.length), cold);
    await volume.close();
  });

  it('holds primary writes back while committed data exceeds committedBytesMax', async () => {
    const volume = await ReplicatedVolume.open(volumeOptions(8 * MiB, { committedBytesMax: MiB }));
    const order: string[] = [];
    await volume.primary.write(pattern(2 * MiB, 130), 0);
    await volume.checkpoint();
    let committedAtWrite = -1;
    const write = volume.primary.write(pattern(4096, 131), 0).then(() => {
      committedAtWrite = volume.stats().bufferedBytes.committed;
      order.push('write');
    });
    await volume.secondary.write(pattern(4096, 132), 0).then(() => order.push('secondary write'));
    await write;
    // The flusher releases committed data as it writes it: the write goes once what is left fits.
    expect(order).toEqual(['secondary write', 'write']);
    expect(committedAtWrite).toBeGreaterThanOrEqual(0);
    expect(committedAtWrite).toBeLessThanOrEqual(MiB);
    await volume.close();
  });

  it('checkpoints a group of volumes atomically', async () => {
    const a = await ReplicatedVolume.open(volumeOptions(MiB));
    const b = await ReplicatedVolume.open(volumeOptions(MiB));
    await a.checkpoint();
    await a.primary.write(pattern(4096, 140), 0);
    await b.primary.write(pattern(4096, 141), 0);
    const epochs = await checkpointGroup([a, b]);
    expect(epochs).toEqual([2, 1]);
    expect(a.stats().bufferedBytes.primary + b.stats().bufferedBytes.primary).toBe(0);
    await a.failover({ to: 'checkpoint' });
    await expect(checkpointGroup([a, b])).rejects.toSatisfy((err: unknown) => (err as GannetError).code === 'ESTATE');
    expect(b.stats().epoch).toBe(1);
    await a.close();
    await b.close();
  });

  it('opens through openVolume for the gannet strategy', async () => {
    const volume = await openVolume(volumeOptions(MiB));
    expect(volume).toBeInstanceOf(ReplicatedVolume);
    expect(volume.stats().strategy).toBe('gannet');
    await volume.close();
  });

  describe('whole-block zero ranges cost one index entry, whatever their length', () => {
    const GiB = 1024 * MiB;
    const blockBytes = 4096;
    /** README, "Limits": the block index holds at most 8 Mi entries over all buffers. */
    const indexEntriesMax = 8 * MiB;

    for (const verb of ['writeZeroes', 'trim'] as const) {
      it(`${verb} over more blocks than the index holds, on a 64 GiB sparse volume`, async () => {
        const volume = await ReplicatedVolume.open(volumeOptions(64 * GiB, { blockBytes }));
        const view = verb === 'writeZeroes' ? volume.primary : volume.secondary;
        const other = verb === 'writeZeroes' ? volume.secondary : volume.primary;
        // Unaligned at both ends: the head and tail blocks are partial (data writes), the rest one range.
        const zeroStart = 1000 * blockBytes + 100;
        const zeroLength = (indexEntriesMax + 5000) * blockBytes;
        const zeroEnd = zeroStart + zeroLength;
        const middle = zeroStart + 16 * GiB;
        const around = (at: number) => at - 2 * blockBytes;
        for (const [i, at] of [zeroStart, middle, zeroEnd].entries()) {
          await view.write(pattern(4 * blockBytes, 200 + i), around(at));
          await other.write(pattern(4 * blockBytes, 210 + i), around(at));
        }
        const buffered = volume.stats().bufferedBytes;
        // More blocks than the index holds: per-block entries would be refused with ENOMEM.
        await view[verb](zeroStart, zeroLength);
        // Each write (4 blocks, 100 bytes into a block) touched 5 blocks; the range holds 2 + 5 + 2 of them whole.
        const freedBlocks = 9;
        const side = verb === 'writeZeroes' ? 'primary' : 'secondary';
        expect(volume.stats().bufferedBytes[side]).toBe(buffered[side] - freedBlocks * blockBytes);

        const head = pattern(4 * blockBytes, 200);
        head.fill(0, zeroStart - around(zeroStart));
        expectBytes(await readAll(view, around(zeroStart), 4 * blockBytes), head);
        expectBytes(await readAll(view, around(middle), 4 * blockBytes), Buffer.alloc(4 * blockBytes));
        const tail = pattern(4 * blockBytes, 202);
        tail.fill(0, 0, zeroEnd - around(zeroEnd));
        expectBytes(await readAll(view, around(zeroEnd), 4 * blockBytes), tail);
        expectBytes(await readAll(view, zeroEnd - 1, 2), Buffer.from([0, tail[zeroEnd - around(zeroEnd)]]));
        for (const [i, at] of [zeroStart, middle, zeroEnd].entries()) {
          expectBytes(await readAll(other, around(at), 4 * blockBytes), pattern(4 * blockBytes, 210 + i));
        }

        // A write inside the range afterwards wins over it, also partially; its neighbours stay zero.
        const inside = pattern(blockBytes + 10, 220);
        const insideAt = middle + 3 * blockBytes - 5;
        await view.write(inside, insideAt);
        const seen = await readAll(view, insideAt - blockBytes, inside.length + 2 * blockBytes);
        expectBytes(seen.subarray(0, blockBytes), Buffer.alloc(blockBytes));
        expectBytes(seen.subarray(blockBytes, blockBytes + inside.length), inside);
        expectBytes(seen.subarray(blockBytes + inside.length), Buffer.alloc(blockBytes));

        const firstWhole = Math.ceil(zeroStart / blockBytes) * blockBytes;
        expect(await view.extents(firstWhole, 16 * blockBytes)).toEqual([{ length: 16 * blockBytes, flags: EXTENT_ZERO }]);
        const writtenFrom = Math.floor(insideAt / blockBytes) * blockBytes;
        expect(await view.extents(writtenFrom - 4 * blockBytes, 10 * blockBytes)).toEqual([
          { length: 4 * blockBytes, flags: EXTENT_ZERO },
          { length: 2 * blockBytes, flags: 0 },
          { length: 4 * blockBytes, flags: EXTENT_ZERO },
        ]);
        const lastWhole = Math.floor(zeroEnd / blockBytes) * blockBytes;
        expect(await view.extents(lastWhole - 2 * blockBytes, 3 * blockBytes)).toEqual([
          { length: 2 * blockBytes, flags: EXTENT_ZERO },
          { length: blockBytes, flags: 0 },
        ]);
        // P and S are not flushed by close: a checkpoint here would write 32 GiB of zeroes to the file.
        await volume.close();
      });
    }

    /**
     * Flush and failover of zero ranges, with the index limit lowered (indexEntriesMax) so the ranges exceed
     * it without writing tens of GiB of zeroes to the backing file.
     */
    const rangeVolumeBytes = 64 * MiB + 1000;
    const rangeIndexEntriesMax = 1024;

    async function openRangeVolume(): Promise<{ volume: ReplicatedVolume; options: VolumeOptions; faults: ReturnType<typeof faultyStorage> }> {
      const options = volumeOptions(rangeVolumeBytes, { blockBytes, indexEntriesMax: rangeIndexEntriesMax });
      const faults = faultyStorage();
      const volume = await ReplicatedVolume.open(options, faults.context);
      return { volume, options, faults };
    }

    it('flushes zero ranges to the backing file after a checkpoint', async () => {
      const { volume, options } = await openRangeVolume();
      const expected = Buffer.alloc(rangeVolumeBytes);
      const put = (data: Buffer, at: number) => data.copy(expected, at);
      for (const [i, at] of [0, 5 * MiB - 77, 30 * MiB, 64 * MiB - 5000].entries()) {
        const data = pattern(i === 3 ? 6000 : 3 * blockBytes, 230 + i);
        await volume.primary.write(data, at);
        put(data, at);
      }
      await flushed(volume, await volume.checkpoint());
      // Past the end of the volume, including its short last block.
      await volume.primary.writeZeroes(2 * MiB + 3, rangeVolumeBytes - 2 * MiB - 3);
      expected.fill(0, 2 * MiB + 3);
      const inside = pattern(blockBytes, 240);
      await volume.primary.write(inside, 40 * MiB);
      put(inside, 40 * MiB);
      await volume.primary.trim(0, 8 * blockBytes);
      expected.fill(0, 0, 8 * blockBytes);
      expectBytes(await readAll(volume.primary, 0, rangeVolumeBytes), expected);
      await flushed(volume, await volume.checkpoint());
      expectBytes(readFileSync(options.path), expected);
      expectBytes(await readAll(volume.secondary, 0, rangeVolumeBytes), expected);
      await volume.close();
    });

    for (const to of ['secondary', 'primary'] as const) {
      for (const interrupted of [false, true]) {
        const finish = interrupted ? ', finished by the next open from the journal' : '';
        it(`fails over to ${to} with zero ranges in flight${finish}`, async () => {
          const { volume, options, faults } = await openRangeVolume();
          volume.on('error', () => undefined);
          const expected = Buffer.alloc(rangeVolumeBytes);
          const base = pattern(2 * MiB, 250);
          await volume.primary.write(base, 0);
          base.copy(expected, 0);
          await flushed(volume, await volume.checkpoint());
          // Committed but held back from the file: a zero range over the base with data written inside it.
          const backing = faults.backing();
          failWrites(backing, new Error('injected'));
          await volume.primary.writeZeroes(blockBytes, 40 * MiB);
          expected.fill(0, blockBytes, blockBytes + 40 * MiB);
          const committedData = pattern(2 * blockBytes, 251);
          await volume.primary.write(committedData, 3 * MiB);
          committedData.copy(expected, 3 * MiB);
          await volume.checkpoint();
          await once(volume, 'error');
          failWrites(backing, null);
          // The current epoch: each side zeroes over the committed data and writes inside its own range.
          const kept = to === 'secondary' ? volume.secondary : volume.primary;
          const dropped = to === 'secondary' ? volume.primary : volume.secondary;
          await dropped.writeZeroes(0, rangeVolumeBytes);
          await kept.trim(2 * MiB, 20 * MiB);
          expected.fill(0, 2 * MiB, 22 * MiB);
          const keptData = pattern(blockBytes + 1, 252);
          await kept.write(keptData, 10 * MiB + 7);
          keptData.copy(expected, 10 * MiB + 7);
          await kept.writeZeroes(60 * MiB, rangeVolumeBytes - 60 * MiB);
          expected.fill(0, 60 * MiB);
          expectBytes(await readAll(kept, 0, rangeVolumeBytes), expected);
          if (!interrupted) {
            await volume.failover({ to });
            await volume.secondary.flush();
            expectBytes(readFileSync(options.path), expected);
            expectBytes(await readAll(volume.secondary, 0, rangeVolumeBytes), expected);
            await volume.close();
          } else {
            await interruptedFailover(volume, backing, to);
          }
          // Reopen replays the journal when the failover was cut short, and is a no-op otherwise.
          const reopened = await ReplicatedVolume.open(options);
          expect(reopened.stats()).toMatchObject({ state: 'failed-over', failoverTarget: to, tornRanges: [] });
          expectBytes(await readAll(reopened.secondary, 0, rangeVolumeBytes), expected);
          await reopened.secondary.flush();
          expectBytes(readFileSync(options.path), expected);
          await reopened.close();
        });
      }
    }
  });

  /**
   * Whole-block zero ranges reach the file through the file system (hole punching), not as zero bytes: trims
   * and plain zeroes free their disk space, NO_HOLE zeroes keep it. Allocation is what the file system
   * reports (st_blocks), read with fs, not through the engine.
   */
  describe('zero ranges punch holes in the backing file, NO_HOLE zeroes stay allocated', () => {
    const blockBytes = 4096;
    const holeVolumeBytes = 32 * MiB;
    const dataBytes = 16 * MiB;
    /** Allocation may move by a few file system blocks (extent tree, metadata) besides what we free. */
    const allocationSlackBytes = 256 * KiB;
    const allocatedBytes = (path: string) => statSync(path).blocks * 512;

    /**
     * 16 MiB of data on the file, then, in one epoch: a trim of [4, 8) MiB and a plain zero of [8, 12)
     * MiB (8 MiB that may become holes), and a NO_HOLE zero of [12, 16) MiB. Returns the expected bytes.
     */
    async function dataThenZeroes(volume: ReplicatedVolume): Promise<Buffer> {
      const expected = Buffer.alloc(holeVolumeBytes);
      const data = pattern(dataBytes, 70);
      await volume.primary.write(data, 0);
      data.copy(expected, 0);
      await flushed(volume, await volume.checkpoint());
      await volume.primary.trim(4 * MiB, 4 * MiB);
      await volume.primary.writeZeroes(8 * MiB, 4 * MiB);
      await volume.primary.writeZeroes(12 * MiB, 4 * MiB, { noHole: true });
      expected.fill(0, 4 * MiB, 16 * MiB);
      return expected;
    }

    function expectFreed(path: string, before: number, freedBytes: number): void {
      const after = allocatedBytes(path);
      expect(before - after).toBeGreaterThanOrEqual(freedBytes - allocationSlackBytes);
      expect(before - after).toBeLessThanOrEqual(freedBytes + allocationSlackBytes);
    }

    it('frees the space of trimmed and zeroed ranges at flush, but not of NO_HOLE zeroes', async () => {
      const options = volumeOptions(holeVolumeBytes, { blockBytes });
      const volume = await ReplicatedVolume.open(options);
      const expected = Buffer.alloc(holeVolumeBytes);
      const data = pattern(dataBytes, 70);
      await volume.primary.write(data, 0);
      data.copy(expected, 0);
      await flushed(volume, await volume.checkpoint());
      const written = allocatedBytes(options.path);
      expect(written).toBeGreaterThanOrEqual(dataBytes);

      await volume.primary.trim(4 * MiB, 4 * MiB);
      await volume.primary.writeZeroes(8 * MiB, 4 * MiB);
      expected.fill(0, 4 * MiB, 12 * MiB);
      await flushed(volume, await volume.checkpoint());
      expectFreed(options.path, written, 8 * MiB);
      expectBytes(readFileSync(options.path), expected);

      const holed = allocatedBytes(options.path);
      await volume.primary.writeZeroes(12 * MiB, 4 * MiB, { noHole: true });
      expected.fill(0, 12 * MiB, 16 * MiB);
      await flushed(volume, await volume.checkpoint());
      expect(allocatedBytes(options.path)).toBeGreaterThanOrEqual(holed);
      expectBytes(readFileSync(options.path), expected);
      expectBytes(await readAll(volume.secondary, 0, holeVolumeBytes), expected);
      await volume.close();
    });

    it('punches the holes from the failover journal when the next open finishes the failover', async () => {
      const options = volumeOptions(holeVolumeBytes, { blockBytes });
      const faults = faultyStorage();
      const volume = await ReplicatedVolume.open(options, faults.context);
      volume.on('error', () => undefined);
      const backing = faults.backing();
      const expected = await dataThenZeroes(volume);
      // Held back from the file through the flush and the failover: only the journal can apply the ranges.
      failWrites(backing, new Error('injected'));
      await volume.checkpoint();
      await once(volume, 'error');
      const written = allocatedBytes(options.path);
      await interruptedFailover(volume, backing, 'checkpoint');
      expect(allocatedBytes(options.path)).toBe(written);

      const reopened = await ReplicatedVolume.open(options);
      expect(reopened.stats()).toMatchObject({ state: 'failed-over', failoverTarget: 'checkpoint', tornRanges: [] });
      await reopened.secondary.flush();
      expectFreed(options.path, written, 8 * MiB);
      expectBytes(readFileSync(options.path), expected);
      expectBytes(await readAll(reopened.secondary, 0, holeVolumeBytes), expected);
      await reopened.close();
    });

    it('after failover, a trim punches the file at once and a NO_HOLE zero keeps it allocated', async () => {
      const options = volumeOptions(holeVolumeBytes, { blockBytes });
      const volume = await ReplicatedVolume.open(options);
      const expected = Buffer.alloc(holeVolumeBytes);
      const data = pattern(dataBytes, 71);
      await volume.secondary.write(data, 0);
      data.copy(expected, 0);
      await volume.failover({ to: 'secondary' });
      await volume.secondary.flush();
      const written = allocatedBytes(options.path);
      expect(written).toBeGreaterThanOrEqual(dataBytes);
      await volume.secondary.trim(4 * MiB, 4 * MiB);
      expected.fill(0, 4 * MiB, 8 * MiB);
      expectFreed(options.path, written, 4 * MiB);
      const holed = allocatedBytes(options.path);
      await volume.secondary.writeZeroes(8 * MiB, 4 * MiB, { noHole: true });
      expected.fill(0, 8 * MiB, 12 * MiB);
      expect(allocatedBytes(options.path)).toBeGreaterThanOrEqual(holed);
      expectBytes(readFileSync(options.path), expected);
      expectBytes(await readAll(volume.secondary, 0, holeVolumeBytes), expected);
      await volume.close();
    });
  });

  it('rejects out-of-range requests with the NBD errno', async () => {
    const volume = await ReplicatedVolume.open(volumeOptions(MiB));
    await expectCode(volume.primary.write(Buffer.alloc(2), MiB - 1), 'ENOSPC');
    await expectCode(volume.secondary.read(Buffer.alloc(2), MiB - 1), 'EINVAL');
    await expect(volume.secondary.trim(MiB, 1)).rejects.toBeInstanceOf(BlockDeviceError);
    await volume.close();
  });
});

afterAll(async () => {
  await Promise.all(opened.map((v) => (v.stats().state === 'closed' ? undefined : v.close().catch(() => undefined))));
});
