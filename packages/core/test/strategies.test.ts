/**
 * The benchmark baselines (passthrough and colo) behind the `Volume` interface. Goal: their views are
 * correct BlockDevices and follow the layering rules of DESIGN.md, so the benchmark compares GANNET
 * with baselines that do the same job. Method: the shared BlockDevice conformance suite on every view,
 * the model-based randomized tests for colo, and targeted tests of COLO's mechanics (copy-before-write
 * into hidden, cluster fill in active, checkpoint, the three failover targets, reopen), each asserting
 * on bytes read back, from the views and from the backing file itself.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { runBlockDeviceSuite } from '@gannet/block-device/conformance';
import type { BlockDevice } from '@gannet/block-device';
import type { FailoverTarget, Volume } from '../src/types.js';
import { openColoVolume, openPassthroughVolume } from '../src/strategies/index.js';
import { ClusterBitmap } from '../src/strategies/cluster-bitmap.js';
import { RangeLock } from '../src/strategies/range-lock.js';
import { runModelBasedTests } from './model-harness.js';

const KiB = 1024;

type Opener = typeof openColoVolume;
const openers: Record<'colo' | 'passthrough', Opener> = { colo: openColoVolume, passthrough: openPassthroughVolume };

const dirs: string[] = [];
const open: Volume[] = [];

function tmp(): string {
  const dir = mkdtempSync(join(tmpdir(), 'gannet-strategy-'));
  dirs.push(dir);
  return dir;
}

async function openIn(strategy: 'colo' | 'passthrough', dir: string, sizeBytes: number, blockBytes = 4 * KiB): Promise<Volume> {
  const vol = await openers[strategy]({ path: join(dir, 'disk.img'), dataDir: join(dir, 'meta'), sizeBytes, strategy, blockBytes });
  open.push(vol);
  return vol;
}

afterEach(async () => {
  await Promise.all(open.splice(0).map((v) => v.close()));
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

async function readAt(dev: BlockDevice, offset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length).fill(0xa5);
  await dev.read(buf, offset);
  return buf;
}

const filled = (length: number, value: number) => new Uint8Array(length).fill(value);

/** Byte comparison that names the first difference (vitest's deep equality is slow on large arrays). */
function expectBytes(actual: Uint8Array, expected: Uint8Array): void {
  const a = Buffer.from(actual.buffer, actual.byteOffset, actual.byteLength);
  const b = Buffer.from(expected.buffer, expected.byteOffset, expected.byteLength);
  if (a.equals(b)) return;
  let at = 0;
  while (at < Math.min(a.length, b.length) && a[at] === b[at]) at++;
  expect.fail(`bytes differ at ${at} (lengths ${a.length}/${b.length}): got ${a[at]}, want ${b[at]}`);
}

function codeOf(promise: Promise<unknown>): Promise<string> {
  return promise.then(
    () => 'resolved',
    (err: unknown) => String((err as { code?: unknown }).code ?? err),
  );
}

/** Before the suite runs: the state the views are in, every one reading as zeroes. */
const suiteStates: Record<string, (vol: Volume, size: number) => Promise<void>> = {
  fresh: async () => undefined,
  // Data reached the backing file and was zeroed again, and the secondary's writes were dropped.
  'over checkpoints': async (vol, size) => {
    await vol.primary.write(filled(size, 7), 0);
    await vol.checkpoint();
    await vol.primary.writeZeroes(0, size);
    await vol.secondary.write(filled(size, 8), 0);
    await vol.checkpoint();
  },
};
for (const to of ['secondary', 'checkpoint', 'primary'] as const) {
  // The side the failover drops wrote everywhere; the kept side and the disk read as zeroes.
  suiteStates[`after failover to ${to}`] = async (vol, size) => {
    if (to !== 'primary') await vol.primary.write(filled(size, 9), 0);
    if (to !== 'secondary') await vol.secondary.write(filled(size, 10), 0);
    await vol.failover({ to });
  };
}

for (const strategy of ['passthrough', 'colo'] as const) {
  for (const [state, prepare] of Object.entries(suiteStates)) {
    for (const view of ['primary', 'secondary'] as const) {
      // After failover the primary view reads the disk and refuses writes.
      const readOnly = state.startsWith('after failover') && view === 'primary';
      // Passthrough has one file that both views write through: its states are fresh and failed over.
      const passthroughStates = ['fresh', 'after failover to secondary'];
      if (strategy === 'passthrough' && !passthroughStates.includes(state)) continue;
      runBlockDeviceSuite({
        name: `${strategy} ${view} view, ${state}`,
        readOnly,
        capabilities: { fastZero: false, cache: false, extents: false },
        factory: async (sizeBytes) => {
          const dir = mkdtempSync(join(tmpdir(), `gannet-conformance-${strategy}-`));
          const vol = await openers[strategy]({ path: join(dir, 'disk.img'), dataDir: join(dir, 'meta'), sizeBytes, strategy });
          if (strategy === 'passthrough' && state !== 'fresh') await vol.failover({ to: 'secondary' });
          else await prepare(vol, sizeBytes);
          return {
            device: vol[view],
            cleanup: async () => {
              await vol.close();
              rmSync(dir, { recursive: true, force: true });
            },
          };
        },
      });
    }
  }
}

runModelBasedTests('colo');

describe('colo: COLO block replication on files', () => {
  it('keeps primary writes out of the secondary view until a checkpoint, and secondary writes out of the primary view', async () => {
    const dir = tmp();
    const vol = await openIn('colo', dir, 256 * KiB);
    await vol.primary.write(filled(10 * KiB, 1), 2 * KiB);
    await vol.secondary.write(filled(3 * KiB, 2), 8 * KiB);
    expectBytes(await readAt(vol.primary, 0, 16 * KiB), Uint8Array.from({ length: 16 * KiB }, (_, i) => (i >= 2 * KiB && i < 12 * KiB ? 1 : 0)));
    expectBytes(await readAt(vol.secondary, 0, 16 * KiB), Uint8Array.from({ length: 16 * KiB }, (_, i) => (i >= 8 * KiB && i < 11 * KiB ? 2 : 0)));
    // Backing = primary view; hidden holds the zeroes of the 3 clusters the primary touched.
    expectBytes(readFileSync(join(dir, 'disk.img')).subarray(0, 16 * KiB), Buffer.from(await readAt(vol.primary, 0, 16 * KiB)));
    expect(vol.stats().bufferedBytes).toEqual({ primary: 3 * 4 * KiB, secondary: 1 * 4 * KiB, committed: 0 });

    expect(await vol.checkpoint()).toBe(1);
    expect(vol.stats().bufferedBytes).toEqual({ primary: 0, secondary: 0, committed: 0 });
    const primaryNow = await readAt(vol.primary, 0, 16 * KiB);
    expectBytes(await readAt(vol.secondary, 0, 16 * KiB), primaryNow);
  });

  it('fills a partially written active cluster from the checkpoint, not from the primary writes', async () => {
    const dir = tmp();
    const vol = await openIn('colo', dir, 64 * KiB);
    await vol.primary.write(filled(4 * KiB, 7), 0);
    await vol.checkpoint();
    // The primary overwrites the cluster (its old content 7s goes to hidden), then the secondary writes 100 bytes of it.
    await vol.primary.write(filled(4 * KiB, 9), 0);
    await vol.secondary.write(filled(100, 3), 1000);
    const want = filled(4 * KiB, 7);
    want.fill(3, 1000, 1100);
    expectBytes(await readAt(vol.secondary, 0, 4 * KiB), want);
    expectBytes(await readAt(vol.primary, 0, 4 * KiB), filled(4 * KiB, 9));
  });

  it('handles a volume whose last cluster is partial', async () => {
    const dir = tmp();
    const size = 16 * KiB + 515;
    const vol = await openIn('colo', dir, size);
    await vol.secondary.write(filled(10, 5), size - 10);
    await vol.primary.write(filled(600, 6), size - 600);
    const tail = await readAt(vol.secondary, size - 700, 700);
    expectBytes(tail.subarray(0, 690), filled(690, 0));
    expectBytes(tail.subarray(690), filled(10, 5));
    expectBytes(await readAt(vol.primary, size - 600, 600), filled(600, 6));
    expect(await codeOf(vol.secondary.write(filled(1, 1), size))).toBe('ENOSPC');
  });

  const failoverCases: { to: FailoverTarget; want: number[] }[] = [
    // Per 4 KiB cluster 0..3 after: checkpoint [7,7,0,0]; primary wrote clusters 1,2 = 8; secondary wrote clusters 2,3 = 9.
    { to: 'secondary', want: [7, 7, 9, 9] },
    { to: 'checkpoint', want: [7, 7, 0, 0] },
    { to: 'primary', want: [7, 8, 8, 0] },
  ];
  for (const { to, want } of failoverCases) {
    it(`failover --to ${to} makes the backing file that view, durably, and refuses primary writes`, async () => {
      const dir = tmp();
      const vol = await openIn('colo', dir, 16 * KiB);
      await vol.primary.write(filled(8 * KiB, 7), 0);
      await vol.checkpoint();
      await vol.primary.write(filled(8 * KiB, 8), 4 * KiB);
      await vol.secondary.write(filled(8 * KiB, 9), 8 * KiB);
      const events: unknown[] = [];
      vol.on('failover', (e) => events.push(e));
      await vol.failover({ to });
      const expected = Buffer.concat(want.map((v) => Buffer.alloc(4 * KiB, v)));
      expectBytes(readFileSync(join(dir, 'disk.img')), expected);
      expectBytes(await readAt(vol.primary, 0, 16 * KiB), expected);
      expectBytes(await readAt(vol.secondary, 0, 16 * KiB), expected);
      expect(vol.stats()).toMatchObject({ state: 'failed-over', failoverTarget: to });
      expect(events).toEqual([{ to, durationMs: expect.any(Number) }]);
      expect(await codeOf(vol.primary.write(filled(1, 1), 0))).toBe('EPERM');
      expect(await codeOf(vol.primary.writeZeroes(0, 1))).toBe('EPERM');
      // The secondary view is now the plain disk: writes go straight to the backing file.
      await vol.secondary.write(filled(1, 0x55), 0);
      await vol.secondary.flush();
      expect(readFileSync(join(dir, 'disk.img'))[0]).toBe(0x55);
      await expect(vol.checkpoint()).rejects.toThrow(/failed-over/);
      await expect(vol.failover({ to })).rejects.toThrow(/failed-over/);
    });
  }

  it('reopens at the last checkpoint after an orderly close, and failed over after a failover', async () => {
    const dir = tmp();
    const first = await openIn('colo', dir, 16 * KiB);
    await first.primary.write(filled(4 * KiB, 1), 0);
    await first.checkpoint();
    await first.primary.write(filled(8 * KiB, 2), 0);
    await first.secondary.write(filled(4 * KiB, 3), 8 * KiB);
    await first.close();
    expect(await codeOf(first.primary.read(new Uint8Array(1), 0))).toBe('ESHUTDOWN');
    const atCheckpoint = Buffer.concat([Buffer.alloc(4 * KiB, 1), Buffer.alloc(12 * KiB, 0)]);
    expectBytes(readFileSync(join(dir, 'disk.img')), atCheckpoint);

    const second = await openIn('colo', dir, 16 * KiB);
    expect(second.stats()).toMatchObject({ state: 'replicating', epoch: 1 });
    expectBytes(await readAt(second.primary, 0, 16 * KiB), atCheckpoint);
    await second.secondary.write(filled(4 * KiB, 4), 4 * KiB);
    await second.failover({ to: 'secondary' });
    await second.close();

    const third = await openIn('colo', dir, 16 * KiB);
    expect(third.stats()).toMatchObject({ state: 'failed-over', failoverTarget: 'secondary' });
    expect(await codeOf(third.primary.write(filled(1, 1), 0))).toBe('EPERM');
    expect(Array.from(await readAt(third.secondary, 4 * KiB, 2))).toEqual([4, 4]);
    await expect(openColoVolume({ path: join(dir, 'disk.img'), dataDir: join(dir, 'meta'), sizeBytes: 32 * KiB, strategy: 'colo' }))
      .rejects.toThrow(/16384 bytes/);
  });

  it('never shows a secondary reader a primary write of the same cluster, under concurrency', async () => {
    const dir = tmp();
    const vol = await openIn('colo', dir, 64 * KiB);
    await vol.primary.write(filled(64 * KiB, 1), 0);
    await vol.checkpoint();
    const rounds = 50;
    const pending: Promise<unknown>[] = [];
    const seen: Uint8Array[] = [];
    for (let round = 0; round < rounds; round++) {
      pending.push(vol.primary.write(filled(6 * KiB, 2 + (round % 200)), (round * 1000) % (58 * KiB)));
      const buf = new Uint8Array(64 * KiB);
      seen.push(buf);
      pending.push(vol.secondary.read(buf, 0));
    }
    await Promise.all(pending);
    for (const buf of seen) expectBytes(buf, filled(64 * KiB, 1));
  });

  it('holds a checkpoint until in-flight writes finish and lands each wholly in one epoch', async () => {
    const dir = tmp();
    const vol = await openIn('colo', dir, 1024 * KiB);
    const pauses: number[] = [];
    vol.on('checkpoint', (e) => pauses.push(e.pauseMs));
    const write = vol.primary.write(filled(512 * KiB, 6), 100);
    const epoch = vol.checkpoint();
    await Promise.all([write, epoch]);
    expect(await epoch).toBe(1);
    expectBytes(await readAt(vol.secondary, 100, 512 * KiB), filled(512 * KiB, 6));
    expect(pauses).toHaveLength(1);
    expect(pauses[0]).toBeGreaterThanOrEqual(0);
  });

  it('rejects a fast zero and reports all-data extents', async () => {
    const vol = await openIn('colo', tmp(), 64 * KiB);
    expect(await codeOf(vol.secondary.writeZeroes(0, 4096, { fastZero: true }))).toBe('ENOTSUP');
    expect(await vol.secondary.extents(10, 100)).toEqual([{ length: 100, flags: 0 }]);
  });
});

describe('passthrough: the native baseline', () => {
  it('serves both views from the backing file; checkpoint only numbers epochs; failover refuses primary writes', async () => {
    const dir = tmp();
    const vol = await openIn('passthrough', dir, 64 * KiB);
    await vol.primary.write(filled(4 * KiB, 1), 0);
    expectBytes(await readAt(vol.secondary, 0, 4 * KiB), filled(4 * KiB, 1));
    await vol.secondary.write(filled(4 * KiB, 2), 4 * KiB, { fua: true });
    expectBytes(readFileSync(join(dir, 'disk.img')).subarray(0, 8 * KiB), Buffer.concat([Buffer.alloc(4 * KiB, 1), Buffer.alloc(4 * KiB, 2)]));
    expect(await vol.checkpoint()).toBe(1);
    expect(await vol.checkpoint()).toBe(2);
    expect(vol.stats()).toMatchObject({ strategy: 'passthrough', epoch: 2, bufferedBytes: { primary: 0, secondary: 0, committed: 0 } });
    await vol.failover({ to: 'checkpoint' });
    expect(vol.stats()).toMatchObject({ state: 'failed-over', failoverTarget: 'checkpoint' });
    expect(await codeOf(vol.primary.write(filled(1, 1), 0))).toBe('EPERM');
    expectBytes(await readAt(vol.primary, 0, 1), filled(1, 1));
    await vol.secondary.trim(0, 4 * KiB);
    expectBytes(await readAt(vol.primary, 0, 4 * KiB), filled(4 * KiB, 0));
    await vol.close();
    expect(await codeOf(vol.secondary.flush())).toBe('ESHUTDOWN');
  });
});

describe('strategy building blocks', () => {
  it('RangeLock: writers exclude overlapping claims, grant in arrival order, readers share', async () => {
    const lock = new RangeLock();
    const order: string[] = [];
    const r1 = await lock.acquire(0, 4, false);
    const r2 = await lock.acquire(2, 6, false);
    const w = lock.acquire(3, 4, true).then((release) => {
      order.push('w');
      return release;
    });
    // A later reader of the same range queues behind the writer (no writer starvation).
    const r3 = lock.acquire(3, 5, false).then((release) => {
      order.push('r3');
      return release;
    });
    const other = await lock.acquire(10, 11, true);
    order.push('other');
    expect(lock.waitingCount).toBe(2);
    r1();
    await Promise.resolve();
    expect(order).toEqual(['other']);
    r2();
    (await w)();
    (await r3)();
    other();
    expect(order).toEqual(['other', 'w', 'r3']);
    expect(lock.heldCount).toBe(0);
    expect(() => r1()).toThrow(/twice/);
  });

  it('ClusterBitmap: counts and runs', () => {
    const map = new ClusterBitmap(30);
    for (const c of [0, 1, 2, 9, 16, 17, 18, 19, 20, 21, 22, 23, 24, 29]) map.add(c);
    map.add(1);
    expect(map.count).toBe(14);
    expect([...map.runs()]).toEqual([
      { first: 0, end: 3 },
      { first: 9, end: 10 },
      { first: 16, end: 25 },
      { first: 29, end: 30 },
    ]);
    map.clear();
    expect([...map.runs()]).toEqual([]);
    expect(() => map.add(30)).toThrow(/out of range/);
  });
});
