/**
 * Engine micro-benchmark (`pnpm bench:core`): the gannet strategy in process, no NBD, on a temporary
 * directory of the local disk. It measures what the design promises and prints each figure next to its
 * target:
 *   - checkpoint foreground latency (checkpoint() call until its promise resolves) with 64 MiB, 256 MiB
 *     and 1 GiB buffered in the primary view; target p99 <= 1 ms at 1 GiB;
 *   - flush throughput (checkpoint until the 'flushed' event) against a raw sequential write of the same
 *     size to the same disk (writeSync in 4 MiB pieces + fdatasync), measured in the same run, as a
 *     ratio; target >= 0.8x raw;
 *   - buffered write throughput, 64 KiB and 4 KiB writes into the primary view;
 *   - RSS against buffered bytes, RSS / (buffered + 64 MiB), each size in a fresh process; target <= 1.1;
 *   - idle volumes: the time to open 100 and 1000 existing volumes of 1 GiB (a daemon's start) and the RSS
 *     each one adds while idle, in a fresh process; target <= 1 MiB per volume;
 *   - failover to the secondary with 64 MiB, 256 MiB and 1 GiB buffered (four fifths in the secondary
 *     view, one fifth committed from the primary view), and with most of it spilled: the foreground time
 *     (the failover() call) p50 and p99, the longest stall a client doing 4K random reads and writes on
 *     the secondary view saw across it, and the time until the first FLUSH after it returns (the kept
 *     state on disk); targets foreground and stall <= 100 ms at 256 MiB.
 * `--quick` runs tiny sizes (a smoke test); `--dir DIR` picks the disk (default: the OS temp dir);
 * `--only checkpoint,rss,flush,writes,failover,idle` runs some of the sections.
 * Run with --expose-gc (the root script does) so RSS is measured after a full collection.
 */
import { spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { closeSync, existsSync, fdatasyncSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { availableParallelism, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { openVolume, type Volume } from '@gannet/core';
import { KiB, MiB, GiB } from '@gannet/block-device';


interface BenchPlan {
  /**
 * Buffered sizes for checkpoint latency and RSS, and how many checkpoints to time at each (each one
 * refills the buffer and waits for its flush; under 100 samples, p99 is the slowest one).
 */
  readonly checkpointSizes: readonly { readonly bytes: number; readonly samples: number }[];
  readonly flushBytes: number;
  /** Alternating rounds of raw write and flush; the median of each is reported. */
  readonly flushRounds: number;
  readonly writeBytes: number;
  /** How many idle volumes to open for the start time and RSS per idle volume. */
  readonly idleVolumeCounts: readonly number[];
  /** Buffered sizes for failover (a fresh volume per sample; `memoryBytes` below the size spills). */
  readonly failoverSizes: readonly FailoverCase[];
}

interface FailoverCase {
  readonly bytes: number;
  readonly samples: number;
  /** The volume's memoryBytesMax when it is to spill; otherwise room for everything. */
  readonly memoryBytes?: number;
  /** The row that carries the targets. */
  readonly target?: boolean;
}

const fullPlan: BenchPlan = {
  checkpointSizes: [
    { bytes: 64 * MiB, samples: 64 },
    { bytes: 256 * MiB, samples: 32 },
    { bytes: 1 * GiB, samples: 16 },
  ],
  flushBytes: 1 * GiB,
  flushRounds: 3,
  writeBytes: 256 * MiB,
  idleVolumeCounts: [100, 1000],
  failoverSizes: [
    { bytes: 64 * MiB, samples: 10 },
    { bytes: 256 * MiB, samples: 10, target: true },
    { bytes: 1 * GiB, samples: 3 },
    { bytes: 256 * MiB, samples: 3, memoryBytes: 64 * MiB },
  ],
};

const quickPlan: BenchPlan = {
  checkpointSizes: [
    { bytes: 4 * MiB, samples: 4 },
    { bytes: 8 * MiB, samples: 4 },
    { bytes: 16 * MiB, samples: 4 },
  ],
  flushBytes: 16 * MiB,
  flushRounds: 1,
  writeBytes: 16 * MiB,
  idleVolumeCounts: [],
  failoverSizes: [
    { bytes: 8 * MiB, samples: 2, target: true },
    { bytes: 8 * MiB, samples: 2, memoryBytes: 2 * MiB },
  ],
};

/** Fill requests: the size a guest's large sequential I/O reaches the primary view in. */
const fillWriteBytes = 64 * KiB;
/** Requests in flight while filling or measuring write throughput. */
const queueDepth = 16;
const rawPieceBytes = 4 * MiB;
/** The allowance for Node itself in the RSS ratio. */
const rssBaseBytes = 64 * MiB;
/** How long one flush may take before the bench gives up (a 1 GiB flush on a slow disk fits). */
const flushWaitMsMax = 300_000;
/** How long filling one volume for the RSS figure may take. */
const rssChildMsMax = 120_000;

const targets = {
  checkpointP99MsMax: 1,
  flushRatioMin: 0.8,
  rssRatioMax: 1.1,
  idleVolumeRssBytesMax: 1 * MiB,
  failoverMsMax: 100,
  failoverStallMsMax: 100,
};
/** Requests in flight of the client on the secondary view across a failover. */
const failoverClientDepth = 4;
/** The client's requests before the failover, so the stall is measured on a client already running. */
const failoverWarmupRequests = 200;
/** Size of each idle volume (sparse: it takes no space). */
const idleVolumeBytes = 1 * GiB;
/** Volumes opened at once, as the daemon opens them at start (volumeOpenConcurrency in @gannet/server). */
const idleOpenConcurrency = 16;
/** How long creating or opening the idle volumes may take. */
const idleChildMsMax = 600_000;

interface Row {
  readonly metric: string;
  readonly value: string;
  readonly target: string;
  /** undefined: no target for this row. */
  readonly ok?: boolean;
}

function formatBytes(n: number): string {
  return n >= GiB ? `${n / GiB} GiB` : `${n / MiB} MiB`;
}

function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) throw new Error('percentile of nothing');
  const rank = Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1);
  return sorted[Math.max(0, rank)];
}

function median(values: readonly number[]): number {
  return percentile([...values].sort((a, b) => a - b), 50);
}

const nowMs = (): number => Number(process.hrtime.bigint()) / 1e6;

function collectGarbage(): void {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (gc) {
    gc();
    gc();
  }
}

/** Writes [0, bytes) of a view in order, `queueDepth` requests in flight, data varying with `stamp`. */
async function fill(vol: Volume, bytes: number, requestBytes: number, stamp: number, view: 'primary' | 'secondary' = 'primary'): Promise<void> {
  let next = 0;
  const device = view === 'primary' ? vol.primary : vol.secondary;
  const worker = async (): Promise<void> => {
    const buf = new Uint8Array(requestBytes);
    while (next < bytes) {
      const offset = next;
      next += requestBytes;
      buf.fill((stamp + offset / requestBytes) & 0xff);
      await device.write(buf, offset);
    }
  };
  await Promise.all(Array.from({ length: queueDepth }, worker));
}

async function waitFlushed(vol: Volume, epoch: number): Promise<void> {
  const signal = AbortSignal.timeout(flushWaitMsMax);
  while (vol.stats().durableEpoch < epoch) await once(vol, 'flushed', { signal });
}

function openBenchVolume(dir: string, name: string, sizeBytes: number, memoryBytes?: number): Promise<Volume> {
  return openVolume({
    path: join(dir, `${name}.img`),
    dataDir: join(dir, `${name}.meta`),
    sizeBytes,
    strategy: 'gannet',
    // Room for P and one C of the same size, so nothing spills: this measures the in-memory path.
    memoryBytesMax: memoryBytes ?? Math.max(1 * GiB, 3 * sizeBytes),
    committedBytesMax: Math.max(2 * GiB, 3 * sizeBytes),
  });
}

async function benchCheckpoints(dir: string, plan: BenchPlan, rows: Row[]): Promise<void> {
  const last = plan.checkpointSizes[plan.checkpointSizes.length - 1];
  for (const { bytes, samples } of plan.checkpointSizes) {
    const vol = await openBenchVolume(dir, `ckpt-${bytes}`, bytes);
    const latencies: number[] = [];
    try {
      for (let i = 0; i < samples; i++) {
        await fill(vol, bytes, fillWriteBytes, i);
        const t0 = nowMs();
        const epoch = await vol.checkpoint();
        latencies.push(nowMs() - t0);
        // The next sample starts with exactly `bytes` buffered: the previous epoch is on disk.
        await waitFlushed(vol, epoch);
      }
    } finally {
      await vol.close();
    }
    latencies.sort((a, b) => a - b);
    const p99 = percentile(latencies, 99);
    const isLast = bytes === last.bytes;
    rows.push({
      metric: `checkpoint p50, ${formatBytes(bytes)} buffered (${samples} checkpoints)`,
      value: `${percentile(latencies, 50).toFixed(3)} ms`,
      target: '',
    });
    rows.push({
      metric: `checkpoint p99, ${formatBytes(bytes)} buffered (${samples} checkpoints)`,
      value: `${p99.toFixed(3)} ms`,
      target: isLast ? `<= ${targets.checkpointP99MsMax} ms` : '',
      ok: isLast ? p99 <= targets.checkpointP99MsMax : undefined,
    });
  }
}

/**
 * RSS with `bytes` buffered, each size in a fresh process: in this one, earlier runs leave freed memory
 * with the allocator, which would be charged to the next size.
 */
function benchRss(dir: string, plan: BenchPlan, rows: Row[]): void {
  for (const { bytes } of plan.checkpointSizes) {
    const child = spawnSync(process.execPath, ['--expose-gc', fileURLToPath(import.meta.url), '--dir', dir, '--rss-child', String(bytes)], {
      encoding: 'utf8',
      timeout: rssChildMsMax,
    });
    if (child.status !== 0) throw new Error(`RSS child (${formatBytes(bytes)}) failed: status ${child.status} ${child.signal ?? ''}\n${child.stderr}`);
    const rss = Number(child.stdout.trim());
    if (!(rss > 0)) throw new Error(`RSS child (${formatBytes(bytes)}) printed ${JSON.stringify(child.stdout)}`);
    const ratio = rss / (bytes + rssBaseBytes);
    rows.push({
      metric: `RSS / (buffered + 64 MiB), ${formatBytes(bytes)} buffered`,
      value: `${ratio.toFixed(3)} (RSS ${(rss / MiB).toFixed(0)} MiB)`,
      target: `<= ${targets.rssRatioMax}`,
      ok: ratio <= targets.rssRatioMax,
    });
  }
}

/** The RSS child: fill `bytes` into the primary view of a fresh volume, collect garbage, print RSS. */
async function rssChild(parent: string, bytes: number): Promise<void> {
  const dir = mkdtempSync(join(parent, 'rss-'));
  try {
    const vol = await openBenchVolume(dir, 'rss', bytes);
    try {
      await fill(vol, bytes, fillWriteBytes, 0);
      collectGarbage();
      console.log(process.memoryUsage.rss());
    } finally {
      await vol.close();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function idleVolumeOptions(dir: string, index: number) {
  return { path: join(dir, `idle-${index}.img`), dataDir: join(dir, `idle-${index}.meta`), sizeBytes: idleVolumeBytes, strategy: 'gannet' as const };
}

/** Runs `work` on 0..count-1, `idleOpenConcurrency` at a time. */
async function eachIdle(count: number, work: (index: number) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < count) await work(next++);
  };
  await Promise.all(Array.from({ length: Math.min(idleOpenConcurrency, count) }, worker));
}

/**
 * The idle child: with `create`, makes `count` volumes in `dir` and closes them; otherwise opens them (a
 * daemon's start), and prints the milliseconds that took, then the RSS before and after, once collected.
 */
async function idleChild(dir: string, count: number, create: boolean): Promise<void> {
  if (create) {
    await eachIdle(count, async (index) => (await openVolume(idleVolumeOptions(dir, index))).close());
    return;
  }
  const volumes: Volume[] = [];
  collectGarbage();
  const before = process.memoryUsage.rss();
  const t0 = nowMs();
  await eachIdle(count, async (index) => {
    volumes.push(await openVolume(idleVolumeOptions(dir, index)));
  });
  const ms = nowMs() - t0;
  collectGarbage();
  console.log(`${ms} ${before} ${process.memoryUsage.rss()}`);
  for (const volume of volumes) await volume.close();
}

/** The child's output, or why it failed: running out of memory with many volumes is a result, not a bench bug. */
function runIdleChild(dir: string, count: number, create: boolean): { output: string } | { failed: string } {
  const args = ['--expose-gc', fileURLToPath(import.meta.url), '--dir', dir, '--idle-child', String(count), ...(create ? ['--idle-create'] : [])];
  const child = spawnSync(process.execPath, args, { encoding: 'utf8', timeout: idleChildMsMax });
  if (child.status === 0) return { output: child.stdout.trim() };
  if (/heap out of memory|FatalProcessOutOfMemory/.test(child.stderr)) return { failed: 'out of memory (JS heap)' };
  throw new Error(`idle child (${count} volumes${create ? ', create' : ''}) failed: status ${child.status} ${child.signal ?? ''}\n${child.stderr}`);
}

/** Start time and RSS per idle volume, each count in fresh processes (one creates, one opens and measures). */
function benchIdleVolumes(dir: string, plan: BenchPlan, rows: Row[]): void {
  for (const count of plan.idleVolumeCounts) {
    const volumesDir = mkdtempSync(join(dir, 'idle-'));
    try {
      const created = runIdleChild(volumesDir, count, true);
      const opened = 'failed' in created ? created : runIdleChild(volumesDir, count, false);
      if ('failed' in opened) {
        rows.push({ metric: `open ${count} idle volumes of ${formatBytes(idleVolumeBytes)} (a start)`, value: opened.failed, target: '' });
        rows.push({ metric: `RSS per idle volume, ${count} volumes of ${formatBytes(idleVolumeBytes)}`, value: opened.failed, target: `<= ${formatBytes(targets.idleVolumeRssBytesMax)}`, ok: false });
        continue;
      }
      const [ms, before, after] = opened.output.split(' ').map(Number);
      if (!(ms > 0 && before > 0 && after > 0)) throw new Error(`idle child (${count} volumes) printed ${JSON.stringify(opened.output)}`);
      const perVolume = (after - before) / count;
      rows.push({ metric: `open ${count} idle volumes of ${formatBytes(idleVolumeBytes)} (a start)`, value: `${ms.toFixed(0)} ms`, target: '' });
      rows.push({
        metric: `RSS per idle volume, ${count} volumes of ${formatBytes(idleVolumeBytes)}`,
        value: `${(perVolume / MiB).toFixed(2)} MiB (RSS ${(after / MiB).toFixed(0)} MiB)`,
        target: `<= ${formatBytes(targets.idleVolumeRssBytesMax)}`,
        ok: perVolume <= targets.idleVolumeRssBytesMax,
      });
    } finally {
      rmSync(volumesDir, { recursive: true, force: true });
    }
  }
}

/** Writes `bytes` over the file in order, like the flush overwrites the volume's backing file in place. */
function rawWrite(path: string, bytes: number): number {
  const piece = new Uint8Array(rawPieceBytes).fill(0x5c);
  if (!existsSync(path)) closeSync(openSync(path, 'w'));
  const fd = openSync(path, 'r+');
  try {
    const t0 = nowMs();
    for (let offset = 0; offset < bytes; offset += rawPieceBytes) {
      const n = Math.min(rawPieceBytes, bytes - offset);
      const written = writeSync(fd, piece, 0, n, offset);
      if (written !== n) throw new Error(`raw write: short write ${written} of ${n}`);
    }
    fdatasyncSync(fd);
    return nowMs() - t0;
  } finally {
    closeSync(fd);
  }
}

async function benchFlush(dir: string, plan: BenchPlan, rows: Row[]): Promise<void> {
  const bytes = plan.flushBytes;
  const rawMs: number[] = [];
  const flushMs: number[] = [];
  const vol = await openBenchVolume(dir, 'flush', bytes);
  try {
    for (let round = 0; round < plan.flushRounds; round++) {
      rawMs.push(rawWrite(join(dir, 'raw.img'), bytes));
      await fill(vol, bytes, fillWriteBytes, round);
      const t0 = nowMs();
      const epoch = await vol.checkpoint();
      await waitFlushed(vol, epoch);
      flushMs.push(nowMs() - t0);
    }
  } finally {
    await vol.close();
  }
  const mbps = (ms: number) => bytes / 1e6 / (ms / 1000);
  const flush = mbps(median(flushMs));
  const raw = mbps(median(rawMs));
  const ratio = flush / raw;
  rows.push({ metric: `flush ${formatBytes(bytes)}, checkpoint to 'flushed'`, value: `${flush.toFixed(0)} MB/s`, target: '' });
  rows.push({ metric: `raw sequential write ${formatBytes(bytes)} + fdatasync`, value: `${raw.toFixed(0)} MB/s`, target: '' });
  rows.push({
    metric: 'flush / raw',
    value: `${ratio.toFixed(2)}x`,
    target: `>= ${targets.flushRatioMin}x`,
    ok: ratio >= targets.flushRatioMin,
  });
}

async function benchWrites(dir: string, plan: BenchPlan, rows: Row[]): Promise<void> {
  for (const requestBytes of [64 * KiB, 4 * KiB]) {
    const vol = await openBenchVolume(dir, `write-${requestBytes}`, plan.writeBytes);
    try {
      const t0 = nowMs();
      await fill(vol, plan.writeBytes, requestBytes, 1);
      const ms = nowMs() - t0;
      rows.push({
        metric: `buffered write ${requestBytes / KiB}K, QD${queueDepth}, ${formatBytes(plan.writeBytes)} into the primary view`,
        value: `${(plan.writeBytes / 1e6 / (ms / 1000)).toFixed(0)} MB/s`,
        target: '',
      });
    } finally {
      await vol.close();
    }
  }
}

/**
 * 4K random reads and writes (half each) on the secondary view, `failoverClientDepth` in flight, until
 * stopped; the longest request once `armed`.
 */
function secondaryClient(vol: Volume, sizeBytes: number): { warm: Promise<void>; arm(): void; stop(): Promise<number> } {
  let running = true;
  let armed = false;
  let longest = 0;
  let done = 0;
  let warmed!: () => void;
  const warm = new Promise<void>((resolve) => (warmed = resolve));
  const blocks = sizeBytes / (4 * KiB);
  let seed = 12345;
  const next = () => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0);
  const worker = async (): Promise<void> => {
    const buf = new Uint8Array(4 * KiB).fill(0x3c);
    while (running) {
      const offset = (next() % blocks) * 4 * KiB;
      const t0 = nowMs();
      if (next() & 1) await vol.secondary.write(buf, offset);
      else await vol.secondary.read(buf, offset);
      if (armed) longest = Math.max(longest, nowMs() - t0);
      if (++done === failoverWarmupRequests) warmed();
      // A buffered request resolves without I/O: a loop of them would keep the failover's own I/O waiting.
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  };
  const workers = Promise.all(Array.from({ length: failoverClientDepth }, worker));
  return {
    warm,
    arm: () => (armed = true),
    async stop() {
      running = false;
      await workers;
      return longest;
    },
  };
}

async function benchFailover(dir: string, plan: BenchPlan, rows: Row[]): Promise<void> {
  for (const [index, c] of plan.failoverSizes.entries()) {
    const foreground: number[] = [];
    const stalls: number[] = [];
    const firstFlush: number[] = [];
    for (let sample = 0; sample < c.samples; sample++) {
      const name = `failover-${index}-${sample}`;
      const vol = await openBenchVolume(dir, name, c.bytes, c.memoryBytes);
      try {
        // One fifth committed (sealed, its flush under way), four fifths in the secondary buffer.
        await fill(vol, c.bytes / 5, fillWriteBytes, sample, 'primary');
        await vol.checkpoint();
        await fill(vol, (c.bytes * 4) / 5, fillWriteBytes, sample + 1, 'secondary');
        const client = secondaryClient(vol, c.bytes);
        await client.warm;
        client.arm();
        const t0 = nowMs();
        await vol.failover({ to: 'secondary' });
        foreground.push(nowMs() - t0);
        await vol.secondary.flush();
        firstFlush.push(nowMs() - t0);
        stalls.push(await client.stop());
      } finally {
        await vol.close();
        rmSync(join(dir, `${name}.img`), { force: true });
        rmSync(join(dir, `${name}.meta`), { recursive: true, force: true });
      }
    }
    foreground.sort((a, b) => a - b);
    stalls.sort((a, b) => a - b);
    const what = `${formatBytes(c.bytes)} buffered${c.memoryBytes !== undefined ? ` (memory ${formatBytes(c.memoryBytes)}: spilled)` : ''}, ${c.samples} failovers`;
    const p99 = percentile(foreground, 99);
    const stall = stalls[stalls.length - 1];
    rows.push({ metric: `failover foreground p50, ${what}`, value: `${percentile(foreground, 50).toFixed(1)} ms`, target: '' });
    rows.push({
      metric: `failover foreground p99, ${what}`,
      value: `${p99.toFixed(1)} ms`,
      target: c.target ? `<= ${targets.failoverMsMax} ms` : '',
      ok: c.target ? p99 <= targets.failoverMsMax : undefined,
    });
    rows.push({
      metric: `longest 4K request across the failover, ${what}`,
      value: `${stall.toFixed(1)} ms`,
      target: c.target ? `<= ${targets.failoverStallMsMax} ms` : '',
      ok: c.target ? stall <= targets.failoverStallMsMax : undefined,
    });
    rows.push({ metric: `failover to the first FLUSH returned (kept state on disk), median, ${what}`, value: `${median(firstFlush).toFixed(0)} ms`, target: '' });
  }
}

function printTable(rows: readonly Row[]): void {
  const header: Row = { metric: 'metric', value: 'value', target: 'target' };
  const all = [header, ...rows];
  const w = {
    metric: Math.max(...all.map((r) => r.metric.length)),
    value: Math.max(...all.map((r) => r.value.length)),
    target: Math.max(...all.map((r) => r.target.length)),
  };
  const line = (r: Row, ok: string) =>
    `| ${r.metric.padEnd(w.metric)} | ${r.value.padStart(w.value)} | ${r.target.padEnd(w.target)} | ${ok.padEnd(4)} |`;
  console.log(line(header, 'ok'));
  console.log(`|${'-'.repeat(w.metric + 2)}|${'-'.repeat(w.value + 2)}|${'-'.repeat(w.target + 2)}|------|`);
  for (const r of rows) console.log(line(r, r.ok === undefined ? '' : r.ok ? 'yes' : 'NO'));
}

async function main(argv: readonly string[]): Promise<void> {
  const { values } = parseArgs({
    args: [...argv],
    options: {
      quick: { type: 'boolean', default: false },
      only: { type: 'string' },
      dir: { type: 'string' },
      'rss-child': { type: 'string' },
      'idle-child': { type: 'string' },
      'idle-create': { type: 'boolean', default: false },
    },
    strict: true,
  });
  if (values['rss-child'] !== undefined) return rssChild(values.dir ?? tmpdir(), Number(values['rss-child']));
  if (values['idle-child'] !== undefined) return idleChild(values.dir ?? tmpdir(), Number(values['idle-child']), values['idle-create']);
  const plan = values.quick ? quickPlan : fullPlan;
  const dir = mkdtempSync(join(values.dir ?? tmpdir(), 'gannet-core-bench-'));
  const rows: Row[] = [];
  const started = nowMs();
  try {
    const gc = 'gc' in globalThis ? 'exposed' : 'not exposed (run with --expose-gc)';
    // Figures from a busy machine are not comparable: say how busy it was.
    const load = loadavg().map((l) => l.toFixed(2)).join(' ');
    console.log(`core bench${values.quick ? ' (quick)' : ''}: node ${process.version}, ${availableParallelism()} cpus, load ${load}, dir ${dir}, gc ${gc}`);
    const sections: Record<string, () => Promise<void> | void> = {
      checkpoint: () => benchCheckpoints(dir, plan, rows),
      rss: () => benchRss(dir, plan, rows),
      flush: () => benchFlush(dir, plan, rows),
      writes: () => benchWrites(dir, plan, rows),
      failover: () => benchFailover(dir, plan, rows),
      idle: () => benchIdleVolumes(dir, plan, rows),
    };
    const only = values.only?.split(',') ?? Object.keys(sections);
    const unknown = only.filter((name) => !(name in sections));
    if (unknown.length > 0) throw new Error(`--only: no section ${unknown.join(', ')} (sections: ${Object.keys(sections).join(', ')})`);
    for (const name of only) await sections[name]();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  printTable(rows);
  console.log(`core bench done in ${((nowMs() - started) / 1000).toFixed(1)} s`);
}

main(process.argv.slice(2)).catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
