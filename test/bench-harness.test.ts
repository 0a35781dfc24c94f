/**
 * The benchmark harness (packages/bench). Goal: `gannet-bench --quick` and `gannet-bench --sustained`
 * produce complete reports, and their pieces (profile schema, workload generator, statistics, fio log
 * parsing, report writers) do what the reports rely on. Method: the pieces in-process with known
 * inputs; then the built CLI end to end against daemons (and fio) it starts itself, asserting the
 * report's shape (every row with its fields, the Markdown table rows, the SVG's bars and lines), never
 * its numbers.
 */
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import {
  LatencyRecorder,
  Lockstep,
  WorkloadGenerator,
  addRelativeFigures,
  addSustainedFigures,
  callLatency,
  niceStep,
  parseFioLog,
  perSecond,
  spread,
  sustainedChart,
  sustainedProfiles,
  sustainedTable,
  loadProfiles,
  markdownTable,
  markdownReport,
  medianRun,
  whereTheTimeGoes,
  parseNbdUri,
  parseProfile,
  percentile,
  runStream,
  selectProfiles,
  strategyOrder,
  svgChart,
  type Profile,
  type ResultRow,
  type SustainedReport,
  type SustainedRow,
} from '@gannet/bench';
import { describeResult, requireTool, runCommand } from './helpers/process.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const benchBin = join(root, 'packages/bench/bin/gannet-bench.js');
const profilesDir = join(root, 'fixtures/profiles');
/** The smoke run must stay well under a minute; this is its hard limit. */
const quickRunTimeoutMs = 90_000;
/** The sustained smoke run (3 strategies x one 3 s row) takes about 20 s; this is its hard limit. */
const sustainedRunTimeoutMs = 90_000;
const sustainedSmokeSeconds = 3;

const tmpDirs: string[] = [];
afterAll(async () => {
  await Promise.all(tmpDirs.map((d) => rm(d, { recursive: true, force: true })));
});

const baseProfile: Profile = {
  name: 'test-random',
  description: 'test',
  pattern: 'random',
  requestBytes: 4096,
  readPercent: 50,
  flushEveryWrites: 4,
  queueDepth: 4,
  regionBytes: 1024 * 1024,
};

function row(profile: string, strategy: ResultRow['strategy'], opsPerSec: number): ResultRow {
  return {
    profile,
    strategy,
    topology: strategy === 'native' ? 'native' : 'deployment',
    opsPerSec,
    mbPerSec: 1,
    p50Us: 10,
    p99Us: 100,
    flushMs: 1,
    flushP99Ms: 2,
    commitFlushMs: null,
    checkpointPauseP99Ms: strategy === 'native' ? null : 0.5,
    checkpointApiP99Ms: null,
    checkpoints: 0,
    rssMiB: 50,
    cpuCores: { secondary: 0.5, primary: strategy === 'native' ? null : 0.25 },
    overheadVsNative: null,
    speedupVsColo: null,
    streams: { primaryOpsPerSec: opsPerSec, secondaryOpsPerSec: null },
    ops: 1,
    flushes: 0,
    durationS: 1,
  };
}

describe('bench pieces', () => {
  it('loads the five fixture profiles and rejects malformed ones with the field named', async () => {
    const profiles = await loadProfiles(profilesDir);
    expect(profiles.map((p) => p.name).sort()).toEqual(['log-append', 'oltp-16k', 'rand-write-4k', 'read-mostly-4k', 'seq-write-64k-fsync']);
    expect(selectProfiles(profiles, ['oltp-16k']).map((p) => p.name)).toEqual(['oltp-16k']);
    expect(() => selectProfiles(profiles, ['nope'])).toThrow(/unknown profile "nope".*log-append/);
    expect(() => parseProfile(JSON.stringify({ ...baseProfile, queueDepth: 0 }), 'x.json')).toThrow(/x\.json: queueDepth/);
    expect(() => parseProfile(JSON.stringify({ ...baseProfile, extra: 1 }), 'x.json')).toThrow(/x\.json/);
    expect(() => parseProfile(JSON.stringify({ ...baseProfile, pattern: 'append' }), 'x.json')).toThrow(/requestBytesMin/);
    expect(() => parseProfile('{', 'x.json')).toThrow(/not valid JSON/);
    const dir = await mkdtemp(join(tmpdir(), 'gannet-profiles-'));
    tmpDirs.push(dir);
    await writeFile(join(dir, 'other-name.json'), JSON.stringify(baseProfile));
    await expect(loadProfiles(dir)).rejects.toThrow(/does not match the file name/);
  });

  it('generates the same stream for the same seed, within the region, with flushes where the profile says', () => {
    const take = (p: Profile, seed: number, n: number) => {
      const g = new WorkloadGenerator(p, 10 * 1024 * 1024, seed);
      return Array.from({ length: n }, () => g.next());
    };
    const a = take(baseProfile, 7, 500);
    expect(take(baseProfile, 7, 500)).toEqual(a);
    expect(take(baseProfile, 8, 500)).not.toEqual(a);
    let writes = 0;
    for (const op of a) {
      if (op.kind === 'flush') {
        expect(writes).toBe(4);
        writes = 0;
        continue;
      }
      if (op.kind === 'write') writes++;
      expect(op.offset % 4096).toBe(0);
      expect(op.offset + op.length).toBeLessThanOrEqual(1024 * 1024);
    }
    const reads = a.filter((op) => op.kind === 'read').length;
    expect(reads).toBeGreaterThan(150);
    expect(reads).toBeLessThan(300);

    const append: Profile = { ...baseProfile, pattern: 'append', readPercent: 0, requestBytes: 8192, requestBytesMin: 512, flushEveryWrites: 1 };
    const ops = take(append, 1, 2000).filter((op) => op.kind !== 'flush');
    let expected = 0;
    for (const op of ops) {
      if (op.kind === 'flush') continue;
      if (expected + op.length > 1024 * 1024) expected = 0;
      expect(op.offset).toBe(expected);
      expect(op.length % 512).toBe(0);
      expect(op.length).toBeGreaterThanOrEqual(512);
      expect(op.length).toBeLessThanOrEqual(8192);
      expected += op.length;
    }
  });

  it('drives a device with at most queueDepth requests in flight and flushes only when drained', async () => {
    let inFlight = 0;
    let peak = 0;
    const log: string[] = [];
    const device = {
      size: 4 * 1024 * 1024,
      async read() {
        inFlight++;
        peak = Math.max(peak, inFlight);
        await Promise.resolve();
        inFlight--;
        log.push('r');
      },
      async write() {
        inFlight++;
        peak = Math.max(peak, inFlight);
        await Promise.resolve();
        inFlight--;
        log.push('w');
      },
      async flush() {
        expect(inFlight).toBe(0);
        log.push('f');
      },
    };
    const result = await runStream(device as never, baseProfile, 3, { durationMs: 10_000, opsMax: 1000 });
    expect(peak).toBeLessThanOrEqual(baseProfile.queueDepth);
    expect(peak).toBeGreaterThan(1);
    expect(result.reads + result.writes + result.flushes).toBe(1000);
    expect(result.flushes).toBe(log.filter((x) => x === 'f').length);
    expect(result.latency.count).toBe(result.reads + result.writes);
    expect(result.bytes).toBe((result.reads + result.writes) * 4096);
  });

  it('keeps two streams within the lead of each other, and lets one run out once released', async () => {
    const pair = new Lockstep(2);
    const states: string[] = [];
    const admitted = (side: 0 | 1, issued: number) => {
      const state = { done: false };
      void pair.admit(side, issued).then(() => {
        state.done = true;
      });
      return state;
    };
    const settle = () => new Promise<void>((resolve) => setImmediate(resolve));
    // Side 0 may issue 2 requests beyond side 1's completed ones (none yet): the third waits.
    const first = admitted(0, 2);
    const third = admitted(0, 3);
    await settle();
    states.push(`${first.done} ${third.done}`);
    pair.completed(1);
    await settle();
    states.push(`${third.done}`);
    // Side 1 is now 1 done; side 0's fifth request waits until side 1 completes two more, or release.
    const fifth = admitted(0, 5);
    pair.completed(1);
    await settle();
    states.push(`${fifth.done}`);
    pair.release();
    await settle();
    states.push(`${fifth.done}`);
    expect(states).toEqual(['true false', 'true', 'false', 'true']);
  });

  it('computes percentiles and keeps a bounded reservoir', () => {
    expect(percentile([5, 1, 3, 2, 4], 50)).toBe(3);
    expect(percentile([5, 1, 3, 2, 4], 99)).toBe(5);
    expect(percentile([5, 1, 3, 2, 4], 0)).toBe(1);
    expect(percentile([], 50)).toBeNaN();
    const rec = new LatencyRecorder(1, 1000);
    for (let i = 1; i <= 100_000; i++) rec.record(i);
    expect(rec.count).toBe(100_000);
    expect(rec.mean).toBeCloseTo(50_000.5, 5);
    // A uniform reservoir of 1000 from 1..100000: the median is near 50000.
    expect(Math.abs(rec.percentile(50) - 50_000)).toBeLessThan(6_000);
    const other = new LatencyRecorder(2, 10);
    for (let i = 0; i < 20; i++) other.record(1);
    rec.merge(other);
    expect(rec.count).toBe(100_020);
  });

  it('keeps the median run of repeated runs, with every run\'s throughput', () => {
    const runs = [row('p', 'colo', 30), row('p', 'colo', 10), row('p', 'colo', 20)];
    runs[2].p99Us = 777;
    expect(medianRun(runs)).toMatchObject({ opsPerSec: 20, p99Us: 777, opsPerSecRuns: [30, 10, 20] });
    expect(medianRun([row('p', 'colo', 5), row('p', 'colo', 9)]).opsPerSec).toBe(5);
    expect(() => medianRun([])).toThrow(/no runs/);
  });

  it('parses nbd:// URIs with encoded export names', () => {
    expect(parseNbdUri('nbd://127.0.0.1:4321/vol0%2Fprimary')).toEqual({ host: '127.0.0.1', port: 4321, exportName: 'vol0/primary' });
    expect(parseNbdUri('nbd://[::1]:10809/a/secondary')).toEqual({ host: '::1', port: 10809, exportName: 'a/secondary' });
    expect(() => parseNbdUri('http://x/y')).toThrow(/not an nbd/);
  });

  it('writes relative figures, a table row per result and a bar per result', () => {
    const rows = addRelativeFigures([row('p1', 'native', 1000), row('p1', 'colo', 400), row('p1', 'gannet', 960), row('p2', 'gannet', 5)]);
    expect(rows[1].overheadVsNative).toBeCloseTo(0.6);
    expect(rows[2].overheadVsNative).toBeCloseTo(0.04);
    expect(rows[2].speedupVsColo).toBeCloseTo(2.4);
    expect(rows[0].speedupVsColo).toBeCloseTo(2.5);
    expect(rows[3].overheadVsNative).toBeNull();
    const table = markdownTable(rows).split('\n');
    expect(table).toHaveLength(2 + rows.length);
    expect(table[4]).toContain('| p1 | gannet | 960 |');
    expect(table[4]).toContain('| 4.0% | 2.40x |');
    expect(table[4]).toContain('| 0.25 + 0.50 |');
    const svg = svgChart(rows);
    expect(svg.match(/<rect [^>]*fill="#(?:7f8c8d|e67e22|2980b9)">/g)).toHaveLength(rows.length);
    expect(svg).toMatch(/^<svg [^>]*xmlns="http:\/\/www\.w3\.org\/2000\/svg"/);
    expect(svg.trim().endsWith('</svg>')).toBe(true);
  });

  it('says where the time goes for each gannet row more than 5% below native, and only those', () => {
    const rows = addRelativeFigures([
      row('miss', 'native', 1000),
      { ...row('miss', 'gannet', 900), p50Us: 70, p99Us: 900, checkpointApiP99Ms: 12.5, checkpoints: 30 },
      row('met', 'native', 1000),
      row('met', 'gannet', 960),
      row('no-native', 'gannet', 5),
    ]);
    const lines = whereTheTimeGoes(rows, 2);
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^- miss: 10\.0% below native\. A PVM request took p50 70 µs \/ p99 900 µs against native's 10 \/ 100 µs/);
    expect(lines[0]).toContain('the primary daemon used 0.25 cores and the secondary 0.50 (native\'s 0.50) of the machine\'s 2');
    expect(lines[0]).toContain('checkpoint call p99 12.50 ms over 30 checkpoints');
    const report = markdownReport({
      generatedAt: '2026-12-03T00:00:00.000Z',
      machine: { nproc: 2, cpuModel: 'cpu', memTotalGiB: 4, node: 'v20', platform: 'linux x64', dataDirFs: 'tmpfs' },
      settings: { durationS: 1, checkpointMs: 1000, volumeBytes: 2 ** 20, seed: 1, repeat: 1, quick: false, daemon: 'started per strategy', topology: 'deployment', ackMode: 'peer' },
      rows,
    });
    expect(report).toContain('## Where the time goes');
    expect(report).toContain('ack mode peer');
  });
});

function sustainedRow(strategy: SustainedRow['strategy'], iops: number[]): SustainedRow {
  return {
    row: 'p@1000ms',
    profile: 'p',
    checkpointMs: 1000,
    strategy,
    cadenceCall: strategy === 'native' ? 'flush' : 'checkpoint',
    perSecond: { iops, mbPerSec: iops.map((v) => (v * 4096) / 1e6) },
    iops: spread(iops),
    mbPerSec: spread(iops.map((v) => (v * 4096) / 1e6)),
    slowestToFastest: Math.min(...iops) / Math.max(...iops),
    medianVsNative: null,
    medianVsColo: null,
    cadenceCallMs: callLatency([1, 2, 3]),
    goals: { steady: false, atLeastNative: null, twiceColo: null },
    fio: { iops: 1, mbPerSec: 1, runtimeS: 1 },
  };
}

describe('sustained pieces', () => {
  it('reads fio\'s 1 s logs as one value per second: gaps are seconds with nothing done, the tail is dropped', () => {
    const log = ['1000, 500, 1, 4096, 0', '2001, 700, 1, 4096, 0', '2001, 9, 0, 4096, 0', '', '5000, 300, 1, 4096, 0', '6000, 800, 1, 4096, 0'].join('\n');
    const samples = parseFioLog(log, 'x.log');
    // Reads (ddir 0) are not the writes' throughput.
    expect(samples).toEqual([
      { timeMs: 1000, value: 500 },
      { timeMs: 2001, value: 700 },
      { timeMs: 5000, value: 300 },
      { timeMs: 6000, value: 800 },
    ]);
    expect(perSecond(samples, 5)).toEqual([500, 700, 0, 0, 300]);
    expect(perSecond([{ timeMs: 1000, value: 2 }, { timeMs: 1400, value: 4 }], 2)).toEqual([3, 0]);
    expect(() => parseFioLog('1000, x, 1, 0, 0', 'x.log')).toThrow(/x\.log:1: not a fio log line/);
  });

  it('summarises a series and holds each strategy to the issue\'s goals against native and colo', () => {
    expect(spread([5, 1, 9, 3])).toEqual({ min: 1, median: 3, max: 9 });
    expect(callLatency([])).toEqual({ count: 0, p50Ms: null, p99Ms: null, maxMs: null });
    expect(callLatency([4, 1, 2])).toEqual({ count: 3, p50Ms: 2, p99Ms: 4, maxMs: 4 });
    const rows = addSustainedFigures([
      sustainedRow('native', [100, 100, 100]),
      sustainedRow('colo', [40, 50, 60]),
      sustainedRow('gannet', [100, 120, 40]),
    ]);
    expect(rows[0].goals).toEqual({ steady: true, atLeastNative: null, twiceColo: null });
    expect(rows[1].goals).toEqual({ steady: true, atLeastNative: false, twiceColo: null });
    expect(rows[2].medianVsNative).toBeCloseTo(1);
    expect(rows[2].medianVsColo).toBeCloseTo(2);
    expect(rows[2].goals).toEqual({ steady: false, atLeastNative: true, twiceColo: true });
    const table = sustainedTable(rows).split('\n');
    expect(table).toHaveLength(2 + rows.length);
    expect(table[4]).toMatch(/^\| p@1000ms \| gannet \| 40 \| 100 \| 120 \| .* \| 1\.00x \| 2\.00x \| 2\.00 \| 3\.00 \| 3\.00 \| FAIL \| pass \| pass \|$/);
  });

  it('draws a line per strategy per row with a point per second', () => {
    expect([niceStep(95_000), niceStep(1), niceStep(0), niceStep(40)]).toEqual([20_000, 0.2, 1, 10]);
    const rows = [sustainedRow('native', [10, 20, 30, 40]), sustainedRow('gannet', [40, 0, 0, 0])];
    const svg = sustainedChart([...rows, { ...sustainedRow('colo', [1, 2, 3, 4]), row: 'q@100ms', profile: 'q', checkpointMs: 100 }]);
    const lines = [...svg.matchAll(/<polyline data-row="([^"]+)" data-strategy="(\w+)"[^>]* points="([^"]+)">/g)];
    expect(lines.map((m) => `${m[1]} ${m[2]}`)).toEqual(['p@1000ms native', 'p@1000ms gannet', 'q@100ms colo']);
    for (const m of lines) expect(m[3].split(' ')).toHaveLength(4);
    // A second with nothing done is drawn on the x axis, the busiest at the top of the plot.
    const gannetYs = lines[1][3].split(' ').map((p) => Number(p.split(',')[1]));
    expect(gannetYs[1]).toBeGreaterThan(gannetYs[0]);
    expect(svg).toContain('checkpoint every 100 ms');
  });
});

describe('gannet-bench --quick (built CLI, real daemons)', () => {
  it('writes a complete report: every profile x strategy in results.json, report.md and chart.svg', async () => {
    const out = await mkdtemp(join(tmpdir(), 'gannet-bench-out-'));
    tmpDirs.push(out);
    const r = await runCommand(process.execPath, [benchBin, '--quick', '--out', out], { timeoutMs: quickRunTimeoutMs });
    expect(r.status, describeResult('gannet-bench --quick', r)).toBe(0);
    expect((await readdir(out)).sort()).toEqual(['chart.svg', 'report.md', 'results.json']);

    const profiles = (await loadProfiles(profilesDir)).map((p) => p.name);
    const report = JSON.parse(await readFile(join(out, 'results.json'), 'utf8')) as { rows: ResultRow[]; machine: { nproc: number } };
    expect(report.machine.nproc).toBeGreaterThan(0);
    expect(report.rows).toHaveLength(profiles.length * strategyOrder.length);
    for (const profile of profiles) {
      for (const strategy of strategyOrder) {
        const found = report.rows.filter((x) => x.profile === profile && x.strategy === strategy);
        expect(found, `${profile} x ${strategy}`).toHaveLength(1);
        const [result] = found;
        for (const field of ['opsPerSec', 'p50Us', 'p99Us', 'mbPerSec'] as const) {
          expect(result[field], `${profile} ${strategy} ${field}`).toBeGreaterThan(0);
        }
        for (const field of ['flushMs', 'checkpointPauseP99Ms', 'rssMiB', 'overheadVsNative', 'speedupVsColo'] as const) {
          expect(result, `${profile} ${strategy} ${field}`).toHaveProperty(field);
        }
        expect(result.rssMiB).toBeGreaterThan(0);
        expect(result.speedupVsColo).toBeGreaterThan(0);
        if (strategy !== 'native') {
          expect(result.checkpoints, `${profile} ${strategy} checkpoints`).toBeGreaterThan(0);
          expect(result.checkpointPauseP99Ms).toBeGreaterThanOrEqual(0);
          expect(result.streams.secondaryOpsPerSec).toBeGreaterThan(0);
          // Deployed: the PVM stream went to a primary daemon, which forwarded to the secondary.
          expect(result.topology).toBe('deployment');
          expect(result.cpuCores.primary, `${profile} ${strategy} primary daemon CPU`).toBeGreaterThan(0);
        } else {
          expect(result.overheadVsNative).toBe(0);
          expect(result.topology).toBe('native');
        }
        expect(result.cpuCores.secondary, `${profile} ${strategy} daemon CPU`).toBeGreaterThan(0);
      }
    }

    const markdown = await readFile(join(out, 'report.md'), 'utf8');
    for (const profile of profiles) {
      for (const strategy of strategyOrder) expect(markdown).toMatch(new RegExp(`^\\| ${profile} \\| ${strategy} \\| \\d+ \\|`, 'm'));
    }
    expect(markdown).toMatch(/^Machine: \d+ CPUs/m);

    const svg = await readFile(join(out, 'chart.svg'), 'utf8');
    expect(svg).toMatch(/^<svg [^>]*xmlns="http:\/\/www\.w3\.org\/2000\/svg"/);
    expect(svg.trim().endsWith('</svg>')).toBe(true);
    // Tags balance (XML-ish): every opened element is closed or self-closing.
    const opened = (svg.match(/<(?!\/)[a-z]+[^>]*[^/]>/g) ?? []).length;
    const closed = (svg.match(/<\/[a-z]+>/g) ?? []).length;
    expect(opened).toBe(closed);
    expect(svg.match(/<rect [^>]*fill="#(?:7f8c8d|e67e22|2980b9)">/g)).toHaveLength(profiles.length * strategyOrder.length);
    for (const profile of profiles) expect(svg).toContain(`>${profile}</text>`);
  }, quickRunTimeoutMs + 10_000);
});

describe('gannet-bench --sustained (built CLI, real daemons, fio)', () => {
  it('refuses options that do not apply, before starting anything', async () => {
    for (const args of [['--repeat', '2'], ['--duration', '1.5'], ['--checkpoint-ms', '5'], ['--profiles', 'oltp-16k']]) {
      const r = await runCommand(process.execPath, [benchBin, '--sustained', ...args, '--out', join(tmpdir(), 'never-written')]);
      expect(r.status, describeResult(`gannet-bench --sustained ${args.join(' ')}`, r)).toBe(2);
      expect(r.stderr).toMatch(/^gannet-bench: --/);
    }
    // `pnpm bench -- --sustained ...` passes the `--` along.
    const viaPnpm = await runCommand(process.execPath, [benchBin, '--', '--sustained', '--repeat', '2']);
    expect(viaPnpm.stderr).toMatch(/^gannet-bench: --repeat does not apply to --sustained/);
  });

  it('writes the per-second series of every strategy to results.json, report.md and chart.svg', async () => {
    requireTool('fio');
    const out = await mkdtemp(join(tmpdir(), 'gannet-bench-sustained-'));
    tmpDirs.push(out);
    const [profile] = sustainedProfiles;
    const args = [
      benchBin,
      '--sustained',
      '--duration',
      String(sustainedSmokeSeconds),
      '--checkpoint-ms',
      '500',
      '--profiles',
      profile.name,
      '--size',
      '256',
      '--quiet',
      '--out',
      out,
    ];
    const r = await runCommand(process.execPath, args, { timeoutMs: sustainedRunTimeoutMs });
    expect(r.status, describeResult('gannet-bench --sustained', r)).toBe(0);
    expect((await readdir(out)).sort()).toEqual(['chart.svg', 'report.md', 'results.json']);

    const report = JSON.parse(await readFile(join(out, 'results.json'), 'utf8')) as SustainedReport;
    expect(report.settings).toMatchObject({ suite: 'sustained', durationS: sustainedSmokeSeconds, checkpointMs: [500], queueDepth: 32 });
    expect(report.settings.fio).toMatch(/^fio-/);
    expect(report.rows.map((x) => x.strategy)).toEqual([...strategyOrder]);
    const row = `${profile.name}@500ms`;
    for (const result of report.rows) {
      const what = `${result.strategy} ${result.row}`;
      expect(result.row).toBe(row);
      expect(result.perSecond.iops, what).toHaveLength(sustainedSmokeSeconds);
      expect(result.perSecond.mbPerSec, what).toHaveLength(sustainedSmokeSeconds);
      for (const value of [...result.perSecond.iops, ...result.perSecond.mbPerSec]) expect(value, what).toBeGreaterThanOrEqual(0);
      expect(result.iops.median, what).toBeGreaterThan(0);
      expect(result.mbPerSec.median, what).toBeGreaterThan(0);
      expect(result.iops.max).toBe(Math.max(...result.perSecond.iops));
      expect(result.fio.iops, what).toBeGreaterThan(0);
      expect(result.cadenceCall).toBe(result.strategy === 'native' ? 'flush' : 'checkpoint');
      expect(result.cadenceCallMs.count, `${what} cadence calls`).toBeGreaterThan(0);
      expect(result.cadenceCallMs.p50Ms).toBeGreaterThan(0);
      expect(result.cadenceCallMs.maxMs).toBeGreaterThanOrEqual(result.cadenceCallMs.p99Ms!);
      expect(typeof result.goals.steady).toBe('boolean');
      expect(result.medianVsNative, what).toBeGreaterThan(0);
      expect(result.medianVsColo, what).toBeGreaterThan(0);
    }
    expect(report.rows[2].goals.twiceColo).not.toBeNull();

    const markdown = await readFile(join(out, 'report.md'), 'utf8');
    for (const strategy of strategyOrder) {
      expect(markdown).toMatch(new RegExp(`^\\| ${row} \\| ${strategy} \\| \\d+ \\| \\d+ \\| \\d+ \\|`, 'm'));
      expect(markdown).toMatch(new RegExp(`^${row} ${strategy}: \\d+ \\d+ \\d+$`, 'm'));
    }
    expect(r.stdout).toContain(`| ${row} | gannet |`);

    const svg = await readFile(join(out, 'chart.svg'), 'utf8');
    expect(svg).toMatch(/^<svg [^>]*xmlns="http:\/\/www\.w3\.org\/2000\/svg"/);
    expect(svg.trim().endsWith('</svg>')).toBe(true);
    const opened = (svg.match(/<(?!\/)[a-z]+[^>]*[^/]>/g) ?? []).length;
    const closed = (svg.match(/<\/[a-z]+>/g) ?? []).length;
    expect(opened).toBe(closed);
    for (const strategy of strategyOrder) {
      const line = new RegExp(`<polyline data-row="${row}" data-strategy="${strategy}"[^>]* points="([^"]+)">`).exec(svg);
      expect(line, `${strategy} line in chart.svg`).not.toBeNull();
      expect(line![1].split(' ')).toHaveLength(sustainedSmokeSeconds);
    }
  }, sustainedRunTimeoutMs + 10_000);
});
