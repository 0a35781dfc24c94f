import { spawn } from 'node:child_process';
import { mkdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { GiB, KiB, MiB } from '@gannet/block-device';
import { NbdClient } from 'nbd-server-js';
import { parseNbdUri, startDaemon, type ControlClient, type StartedDaemon, type VolumeInfo } from './daemon.js';
import type { Progress } from './progress.js';
import type { BenchStrategy } from './report.js';
import { strategyOf } from './runner.js';
import { percentile } from './stats.js';

/**
 * Sustained profiles: a primary VM writing steadily while checkpoints come every second or
 * faster. One fio job (nbd engine, QD32, time-based) writes into `<vol>/primary`; a cadence loop
 * checkpoints the volume through the control API at a fixed rate and times each call. fio logs the
 * throughput of every second, so a cliff after the first seconds shows up instead of vanishing into a
 * mean.
 *
 * native gets an NBD FLUSH at the same cadence instead of a checkpoint: passthrough's checkpoint only
 * numbers an epoch and does no I/O, while a FLUSH is an fdatasync of the backing file, which makes
 * native "a file server flushing as often" (the issue's reference).
 */

export const sustainedDurationSDefault = 30;
/** A line needs two seconds; below that there is no series to speak of. */
export const sustainedDurationSMin = 2;
export const sustainedVolumeBytesDefault = 2 * GiB;
export const sustainedCheckpointMsDefault: readonly number[] = [1000, 100];
export const sustainedQueueDepth = 32;
/** fio's averaging window for its throughput logs: one sample per second. */
export const fioSampleMs = 1000;
/** fio often drops its last, partial window; one more second of load keeps every timed second. */
export const fioTailS = 1;
/** How long fio may run beyond its runtime (connect, drain the queue, final stats) before SIGKILL. */
export const fioSlackMs = 60_000;
/** How long fio gets to exit after SIGTERM before SIGKILL. */
export const fioStopGraceMs = 5_000;
/** A throughput log larger than this is not one job's per-second log. */
export const fioLogBytesMax = 16 * MiB;
/** fio output kept for error messages. */
const fioOutputBytesMax = 256 * KiB;
/** After a row, the volume's background commit gets this long to finish before the run fails. */
export const commitSettleMsMax = 300_000;
/** How often the settle step asks whether the commit finished. */
export const commitPollMs = 100;
/** Daemon log shown when a row fails. */
const daemonLogTailChars = 4_000;

/** The issue's goals for a strategy's row. */
export const steadyRatioMin = 0.5;
export const nativeRatioMin = 1;
export const coloRatioMin = 2;

export interface SustainedProfile {
  readonly name: string;
  readonly description: string;
  readonly rw: 'randwrite' | 'write';
  readonly requestBytes: number;
}

export const sustainedProfiles: readonly SustainedProfile[] = [
  { name: 'rand-write-4k-qd32', description: '4 KiB random writes, 32 in flight', rw: 'randwrite', requestBytes: 4 * KiB },
  { name: 'seq-write-64k-qd32', description: '64 KiB sequential writes, 32 in flight', rw: 'write', requestBytes: 64 * KiB },
];

export interface Spread {
  min: number;
  median: number;
  max: number;
}

export interface CallLatency {
  count: number;
  p50Ms: number | null;
  p99Ms: number | null;
  maxMs: number | null;
}

export interface SustainedRow {
  /** `<profile>@<checkpointMs>ms`: one profile at one cadence. */
  row: string;
  profile: string;
  checkpointMs: number;
  strategy: BenchStrategy;
  /** What the cadence loop sent: the control API's checkpoint, or an NBD FLUSH (native). */
  cadenceCall: 'checkpoint' | 'flush';
  /** Throughput of each timed second, in order; a second in which no write completed is 0. */
  perSecond: { iops: number[]; mbPerSec: number[] };
  iops: Spread;
  mbPerSec: Spread;
  /** Slowest second over fastest second. */
  slowestToFastest: number;
  /** Median IOPS over native's, and over colo's, for the same row; null without that row. */
  medianVsNative: number | null;
  medianVsColo: number | null;
  /** Round trip of every cadence call. */
  cadenceCallMs: CallLatency;
  /** Pass/fail against the issue's goals; null where the goal does not apply or its reference is missing. */
  goals: { steady: boolean; atLeastNative: boolean | null; twiceColo: boolean | null };
  /** fio's own summary over its whole run (the tail second included), as a cross-check of the series. */
  fio: { iops: number; mbPerSec: number; runtimeS: number };
}

export interface SustainedOptions {
  readonly profiles: readonly SustainedProfile[];
  readonly checkpointMs: readonly number[];
  readonly strategies: readonly BenchStrategy[];
  readonly durationS: number;
  readonly volumeBytes: number;
  readonly seed: number;
  readonly workDir: string;
  readonly progress: Progress;
  readonly gannetBin?: string;
  /** Called with every process started, so the CLI can stop them on a signal. */
  readonly onStop?: (stop: () => Promise<void>) => void;
}

export const rowName = (profile: string, checkpointMs: number): string => `${profile}@${checkpointMs}ms`;
const volumeName = (profile: string, checkpointMs: number): string => `${profile}-${checkpointMs}ms`;

/**
 * One fio log (`--write_iops_log` / `--write_bw_log`): `time_ms, value, ddir, bs, offset[, prio]` per
 * line. Returns the write samples.
 */
export function parseFioLog(text: string, source: string): { timeMs: number; value: number }[] {
  const samples: { timeMs: number; value: number }[] = [];
  for (const [i, line] of text.split('\n').entries()) {
    if (line.trim() === '') continue;
    const fields = line.split(',').map((f) => Number(f.trim()));
    if (fields.length < 3 || fields.slice(0, 3).some((f) => !Number.isFinite(f))) throw new Error(`${source}:${i + 1}: not a fio log line: "${line}"`);
    if (fields[2] === 1) samples.push({ timeMs: fields[0], value: fields[1] });
  }
  return samples;
}

/**
 * Samples of a 1-s averaged fio log as one value per second, seconds 1..`seconds`. fio writes no sample
 * for a window in which nothing completed, so a missing second is 0; samples past the timed seconds
 * (the tail) are dropped. Two samples in one second (a late window) are averaged.
 */
export function perSecond(samples: readonly { timeMs: number; value: number }[], seconds: number): number[] {
  const sums = new Array<number>(seconds).fill(0);
  const counts = new Array<number>(seconds).fill(0);
  for (const { timeMs, value } of samples) {
    const index = Math.round(timeMs / fioSampleMs) - 1;
    if (index < 0 || index >= seconds) continue;
    sums[index] += value;
    counts[index]++;
  }
  return sums.map((sum, i) => (counts[i] === 0 ? 0 : sum / counts[i]));
}

export function spread(values: readonly number[]): Spread {
  if (values.length === 0) throw new Error('spread: no values');
  return { min: Math.min(...values), median: percentile(values, 50), max: Math.max(...values) };
}

export function callLatency(ms: readonly number[]): CallLatency {
  if (ms.length === 0) return { count: 0, p50Ms: null, p99Ms: null, maxMs: null };
  return { count: ms.length, p50Ms: percentile(ms, 50), p99Ms: percentile(ms, 99), maxMs: Math.max(...ms) };
}

/** Fills in the ratios against native and colo of the same row, and the goals. */
export function addSustainedFigures(rows: SustainedRow[]): SustainedRow[] {
  for (const r of rows) {
    const native = rows.find((x) => x.row === r.row && x.strategy === 'native');
    const colo = rows.find((x) => x.row === r.row && x.strategy === 'colo');
    r.medianVsNative = native && native.iops.median > 0 ? r.iops.median / native.iops.median : null;
    r.medianVsColo = colo && colo.iops.median > 0 ? r.iops.median / colo.iops.median : null;
    r.goals = {
      steady: r.slowestToFastest >= steadyRatioMin,
      atLeastNative: r.strategy === 'native' || r.medianVsNative === null ? null : r.medianVsNative >= nativeRatioMin,
      twiceColo: r.strategy !== 'gannet' || r.medianVsColo === null ? null : r.medianVsColo >= coloRatioMin,
    };
  }
  return rows;
}

interface FioJob {
  error: number;
  write: { iops: number; bw_bytes: number; runtime: number };
}

interface FioExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

interface FioProcess {
  readonly done: Promise<FioExit>;
  stop(): Promise<void>;
}

function startFio(args: readonly string[], cwd: string, timeoutMs: number): FioProcess {
  const child = spawn('fio', args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8');
  child.stderr!.setEncoding('utf8');
  child.stdout!.on('data', (chunk: string) => {
    // The JSON summary is printed once, at the end; keep its head, not its tail.
    if (stdout.length < fioOutputBytesMax) stdout += chunk;
  });
  child.stderr!.on('data', (chunk: string) => {
    stderr = (stderr + chunk).slice(-fioOutputBytesMax);
  });
  let exited = false;
  child.once('exit', () => {
    exited = true;
  });
  // 'close', not 'exit': the summary may still be in the pipe when the process exits.
  const done = new Promise<FioExit>((resolve, reject) => {
    child.once('error', (e) => reject(new Error(`fio: cannot run (${e.message}); apt-get install fio`)));
    child.once('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
  // Also marks a spawn failure as handled here; the caller still gets it by awaiting `done`.
  done.then(() => clearTimeout(timer), () => clearTimeout(timer));
  const stop = async (): Promise<void> => {
    if (exited || child.pid === undefined) return;
    child.kill('SIGTERM');
    const grace = setTimeout(() => child.kill('SIGKILL'), fioStopGraceMs);
    await done.catch(() => {});
    clearTimeout(grace);
  };
  return { done, stop };
}

/** `fio --version`, which also fails early, with the package to install, where fio is missing. */
export async function fioVersion(): Promise<string> {
  const fio = startFio(['--version'], process.cwd(), fioSlackMs);
  const r = await fio.done;
  if (r.code !== 0) throw new Error(`fio --version failed: ${r.stderr}`);
  return r.stdout.trim();
}

/**
 * Calls `call` every `intervalMs` on a fixed schedule until `signal` aborts. A call that overruns the
 * interval skips the ticks it missed rather than firing them back to back, as a replicator's timer
 * would.
 */
async function cadenceLoop(intervalMs: number, signal: AbortSignal, call: () => Promise<number>, ms: number[]): Promise<void> {
  const start = performance.now();
  let tick = 1;
  while (!signal.aborted) {
    const wait = start + tick * intervalMs - performance.now();
    if (wait > 0) {
      try {
        await sleep(wait, undefined, { signal });
      } catch {
        return;
      }
    }
    ms.push(await call());
    tick = Math.max(tick + 1, Math.ceil((performance.now() - start) / intervalMs));
  }
}

/** Waits until the volume's newest checkpoint is in its backing file (gannet's background commit). */
async function settle(control: ControlClient, volume: string, epoch: number): Promise<void> {
  const deadline = performance.now() + commitSettleMsMax;
  for (;;) {
    const view = (await control.volumes()).find((v) => v.name === volume) as (VolumeInfo & { durableEpoch?: number }) | undefined;
    if (view === undefined) throw new Error(`volume ${volume} disappeared`);
    if ((view.durableEpoch ?? epoch) >= epoch) return;
    if (performance.now() > deadline) throw new Error(`the commit of epoch ${epoch} did not finish within ${commitSettleMsMax} ms`);
    await sleep(commitPollMs);
  }
}

async function readLog(path: string): Promise<string> {
  const text = await readFile(path, 'utf8');
  if (text.length > fioLogBytesMax) throw new Error(`${path}: larger than ${fioLogBytesMax} bytes`);
  return text;
}

/**
 * Runs every (profile, cadence) row for every strategy: one daemon per strategy, all started up front,
 * one fresh volume per row; rows one after the other, strategies side by side, so load that drifts
 * over minutes hits the three alike. After each run the volume is checkpointed once more and its
 * commit waited for (untimed), so the next run does not share the disk with a leftover flush.
 */
export async function runSustained(options: SustainedOptions): Promise<SustainedRow[]> {
  const daemons = new Map<BenchStrategy, StartedDaemon>();
  const fioDir = join(options.workDir, 'fio');
  await mkdir(fioDir, { recursive: true });
  try {
    for (const strategy of options.strategies) {
      const volumes = options.profiles.flatMap((p) =>
        options.checkpointMs.map((ms) => ({ name: volumeName(p.name, ms), strategy: strategyOf[strategy], sizeBytes: options.volumeBytes })),
      );
      options.progress.line(`starting gannet serve with ${volumes.length} ${strategyOf[strategy]} volume(s)`);
      const daemon = await startDaemon({ dataDir: join(options.workDir, strategy), volumes, gannetBin: options.gannetBin });
      daemons.set(strategy, daemon);
      options.onStop?.(daemon.stop);
    }
    const rows: SustainedRow[] = [];
    const total = options.profiles.length * options.checkpointMs.length * options.strategies.length;
    for (const profile of options.profiles) {
      for (const checkpointMs of options.checkpointMs) {
        for (const strategy of options.strategies) {
          const daemon = daemons.get(strategy)!;
          const label = `[${rows.length + 1}/${total}] ${strategy} ${rowName(profile.name, checkpointMs)}`;
          try {
            rows.push(await runOne(options, profile, checkpointMs, strategy, daemon, fioDir, label));
          } catch (error) {
            const log = daemon.stderr().slice(-daemonLogTailChars);
            throw new Error(`${label}: ${(error as Error).message}${log === '' ? '' : `\n--- daemon log (tail)\n${log}`}`, { cause: error });
          }
        }
      }
    }
    return addSustainedFigures(rows);
  } finally {
    await Promise.all([...daemons.values()].map((d) => d.stop()));
  }
}

async function runOne(
  options: SustainedOptions,
  profile: SustainedProfile,
  checkpointMs: number,
  strategy: BenchStrategy,
  daemon: StartedDaemon,
  fioDir: string,
  label: string,
): Promise<SustainedRow> {
  const { control } = daemon;
  const name = volumeName(profile.name, checkpointMs);
  const volume = (await control.volumes()).find((v) => v.name === name);
  const uri = volume?.uris.primary[0];
  if (uri === undefined) throw new Error(`the daemon has no primary export for volume ${name}`);
  const native = strategy === 'native';
  options.progress.line(`${label}: ${options.durationS} s, QD${sustainedQueueDepth}, ${native ? 'NBD FLUSH' : 'checkpoint'} every ${checkpointMs} ms`);

  let flusher: NbdClient | undefined;
  if (native) {
    const { host, port, exportName } = parseNbdUri(uri);
    flusher = await NbdClient.connect({ host, port }, { exportName });
    if (!flusher.capabilities.flush) {
      await flusher.close();
      throw new Error(`${exportName} does not advertise FLUSH: native would not flush at all`);
    }
  }
  const call = native
    ? async () => {
        const t0 = performance.now();
        await flusher!.flush();
        return performance.now() - t0;
      }
    : async () => (await control.checkpoint(name)).ms;

  const logPrefix = `${strategy}-${name}`;
  const runtimeS = options.durationS + fioTailS;
  const args = [
    `--name=${profile.name}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${profile.rw}`,
    `--bs=${profile.requestBytes}`,
    `--iodepth=${sustainedQueueDepth}`,
    `--size=${options.volumeBytes}`,
    '--time_based',
    `--runtime=${runtimeS}`,
    '--norandommap',
    `--randseed=${options.seed}`,
    `--write_iops_log=${logPrefix}`,
    `--write_bw_log=${logPrefix}`,
    `--log_avg_msec=${fioSampleMs}`,
    // Each sample spans the whole window; with fio's default 500 ms, a half-stalled second would be
    // reported at the rate of its busy half.
    `--iopsavgtime=${fioSampleMs}`,
    `--bwavgtime=${fioSampleMs}`,
    '--output-format=json',
  ];
  const fio = startFio(args, fioDir, runtimeS * 1000 + fioSlackMs);
  options.onStop?.(fio.stop);
  const stopCadence = new AbortController();
  const callMs: number[] = [];
  const cadence = cadenceLoop(checkpointMs, stopCadence.signal, call, callMs);
  // A failed call ends the loop at once; the row fails once fio has been stopped.
  cadence.catch(() => fio.stop());
  let result: FioExit;
  try {
    result = await fio.done;
  } finally {
    stopCadence.abort();
    await fio.stop();
    await cadence.catch(() => {});
    await flusher?.close();
  }
  await cadence;
  if (result.code !== 0) {
    throw new Error(`fio ${args.join(' ')} exited with ${result.code ?? result.signal}:\n${result.stderr}`);
  }
  const json = JSON.parse(result.stdout.slice(result.stdout.indexOf('{'))) as { jobs: FioJob[] };
  const job = json.jobs[0];
  if (job.error !== 0) throw new Error(`fio job error ${job.error}: ${result.stderr}`);

  if (!native) await settle(control, name, (await control.checkpoint(name)).epoch);

  const iopsSeries = perSecond(parseFioLog(await readLog(join(fioDir, `${logPrefix}_iops.1.log`)), `${logPrefix}_iops`), options.durationS);
  // fio's bandwidth log is in KiB/s.
  const mbSeries = perSecond(parseFioLog(await readLog(join(fioDir, `${logPrefix}_bw.1.log`)), `${logPrefix}_bw`), options.durationS).map(
    (kib) => (kib * KiB) / 1e6,
  );
  const iops = spread(iopsSeries);
  const row: SustainedRow = {
    row: rowName(profile.name, checkpointMs),
    profile: profile.name,
    checkpointMs,
    strategy,
    cadenceCall: native ? 'flush' : 'checkpoint',
    perSecond: { iops: iopsSeries, mbPerSec: mbSeries },
    iops,
    mbPerSec: spread(mbSeries),
    slowestToFastest: iops.max > 0 ? iops.min / iops.max : 0,
    medianVsNative: null,
    medianVsColo: null,
    cadenceCallMs: callLatency(callMs),
    goals: { steady: false, atLeastNative: null, twiceColo: null },
    fio: { iops: job.write.iops, mbPerSec: job.write.bw_bytes / 1e6, runtimeS: job.write.runtime / 1000 },
  };
  const c = row.cadenceCallMs;
  options.progress.line(
    `${label}: IOPS min ${Math.round(iops.min)} / median ${Math.round(iops.median)} / max ${Math.round(iops.max)}, ` +
      `${c.count} ${native ? 'flushes' : 'checkpoints'}${c.p99Ms === null ? '' : ` (p99 ${c.p99Ms.toFixed(1)} ms)`}`,
  );
  return row;
}
