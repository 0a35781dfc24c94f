import { setTimeout as sleep } from 'node:timers/promises';
import { NbdClient } from 'nbd-server-js';
import type { Profile } from './profiles.js';
import { ControlClient, parseNbdUri, rssBytes, startDaemon, type StartedDaemon, type StrategyName, type VolumeInfo } from './daemon.js';
import type { Progress } from './progress.js';
import type { BenchStrategy, ResultRow } from './report.js';
import { percentile } from './stats.js';
import { runStream, type StreamProgress, type StreamResult } from './workload.js';

/**
 * Runs every (strategy, profile) pair. Per strategy one daemon (so its RSS is that strategy's), all
 * started up front, with one fresh volume per profile; pairs run profile by profile; per pair: the primary stream into `<vol>/primary` and, for colo and gannet,
 * the same stream (same seed) into `<vol>/secondary` at the same time, with a checkpoint every
 * `checkpointMs` through the control API. Native runs the primary stream alone on a passthrough volume.
 * After a pair the volume is checkpointed and its commit waited for (untimed), so the next pair does
 * not share the disk with a previous background flush.
 */

/** Hard bound on requests per stream, whatever the duration. */
export const streamOpsMax = 50_000_000;
export const rssSampleMs = 100;
/** How long to wait for events (checkpoint pauses, the last commit) after the streams stop. */
export const eventsSettleMsMax = 60_000;
/** A stream still running this long after its deadline has a request the daemon never answered. */
export const streamStallMs = 30_000;
/** Daemon log lines shown when a run fails. */
const daemonLogTailChars = 4_000;

export const strategyOf: Record<BenchStrategy, StrategyName> = { native: 'passthrough', colo: 'colo', gannet: 'gannet' };

export interface RunnerOptions {
  readonly profiles: readonly Profile[];
  readonly strategies: readonly BenchStrategy[];
  readonly durationMs: number;
  readonly checkpointMs: number;
  readonly volumeBytes: number;
  readonly seed: number;
  /** Runs per (profile, strategy); the report keeps the median. */
  readonly repeat?: number;
  readonly workDir: string;
  readonly progress: Progress;
  readonly gannetBin?: string;
  /** Use a running daemon instead of starting one per strategy. */
  readonly daemon?: { readonly url: string; readonly token: string; readonly pid?: number; readonly volumes: Partial<Record<BenchStrategy, string>> };
  /** Called with every process started, so the CLI can stop them on a signal. */
  readonly onStop?: (stop: () => Promise<void>) => void;
}

interface Target {
  readonly control: ControlClient;
  readonly pid: number | undefined;
  readonly volume: VolumeInfo;
  readonly daemon?: StartedDaemon;
}

/** Waits for a condition re-checked on every event, or fails after `ms`. */
class EventWaiter {
  private wake: (() => void) | undefined;
  notify(): void {
    this.wake?.();
  }
  async until(condition: () => boolean, ms: number, what: string): Promise<void> {
    const deadline = performance.now() + ms;
    while (!condition()) {
      const left = deadline - performance.now();
      if (left <= 0) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
      const timeout = AbortSignal.timeout(Math.ceil(left));
      await new Promise<void>((resolve) => {
        this.wake = resolve;
        timeout.addEventListener('abort', () => resolve(), { once: true });
      });
      this.wake = undefined;
    }
  }
}

function pickVolume(volumes: readonly VolumeInfo[], name: string): VolumeInfo {
  const found = volumes.find((v) => v.name === name);
  if (!found) throw new Error(`the daemon has no volume ${name} (has: ${volumes.map((v) => v.name).join(', ')})`);
  return found;
}

export async function runBench(options: RunnerOptions): Promise<ResultRow[]> {
  const repeat = options.repeat ?? 1;
  const targets = new Map<BenchStrategy, (profile: Profile) => Target>();
  const daemons: StartedDaemon[] = [];
  try {
    for (const strategy of options.strategies) {
      if (options.daemon) {
        const control = new ControlClient(options.daemon.url, options.daemon.token);
        const volumes = await control.volumes();
        const wanted = options.daemon.volumes[strategy] ?? volumes.find((v) => v.strategy === strategyOf[strategy])?.name;
        if (wanted === undefined) throw new Error(`the daemon at ${options.daemon.url} has no ${strategyOf[strategy]} volume for ${strategy}`);
        const volume = pickVolume(volumes, wanted);
        if (volume.strategy !== strategyOf[strategy]) {
          throw new Error(`volume ${volume.name} has strategy ${volume.strategy}, ${strategy} needs ${strategyOf[strategy]}`);
        }
        const pid = options.daemon.pid;
        targets.set(strategy, () => ({ control, pid, volume }));
        continue;
      }
      options.progress.line(`starting gannet serve with ${options.profiles.length} ${strategyOf[strategy]} volume(s)`);
      const daemon = await startDaemon({
        dataDir: `${options.workDir}/${strategy}`,
        volumes: options.profiles.map((p) => ({ name: p.name, strategy: strategyOf[strategy], sizeBytes: options.volumeBytes })),
        gannetBin: options.gannetBin,
      });
      daemons.push(daemon);
      options.onStop?.(daemon.stop);
      const volumes = await daemon.control.volumes();
      targets.set(strategy, (profile) => ({ control: daemon.control, pid: daemon.pid, volume: pickVolume(volumes, profile.name), daemon }));
    }

    // Profile-major, strategies side by side: load that drifts over minutes hits all strategies of a profile alike.
    const runs = new Map<string, ResultRow[]>();
    const total = repeat * options.profiles.length * options.strategies.length;
    let step = 0;
    for (let round = 0; round < repeat; round++) {
      for (const profile of options.profiles) {
        for (const strategy of options.strategies) {
          step++;
          const target = targets.get(strategy)!(profile);
          let row: ResultRow;
          try {
            row = await runPair(options, strategy, profile, target, `[${step}/${total}]`);
          } catch (error) {
            const log = target.daemon?.stderr().slice(-daemonLogTailChars) ?? '';
            throw new Error(`${strategy}: ${(error as Error).message}${log === '' ? '' : `\n--- daemon log (tail)\n${log}`}`, { cause: error });
          }
          const key = `${profile.name}\0${strategy}`;
          runs.set(key, [...(runs.get(key) ?? []), row]);
        }
      }
    }
    const rows: ResultRow[] = [];
    for (const profile of options.profiles) {
      for (const strategy of options.strategies) rows.push(medianRun(runs.get(`${profile.name}\0${strategy}`)!));
    }
    return rows;
  } finally {
    await Promise.all(daemons.map((d) => d.stop()));
  }
}

/** The run with the median throughput (the lower middle for an even count), with every run's ops/s attached. */
export function medianRun(rows: readonly ResultRow[]): ResultRow {
  if (rows.length === 0) throw new Error('medianRun: no runs');
  const sorted = [...rows].sort((a, b) => a.opsPerSec - b.opsPerSec);
  return { ...sorted[Math.floor((sorted.length - 1) / 2)], opsPerSecRuns: rows.map((r) => r.opsPerSec) };
}

async function connect(uri: string | undefined, what: string): Promise<NbdClient> {
  if (uri === undefined) throw new Error(`no NBD URI for ${what}`);
  const { host, port, exportName } = parseNbdUri(uri);
  return NbdClient.connect({ host, port }, { exportName });
}

async function runPair(options: RunnerOptions, strategy: BenchStrategy, profile: Profile, target: Target, label: string): Promise<ResultRow> {
  const { control, volume } = target;
  const activeActive = strategy !== 'native';
  const durationS = options.durationMs / 1000;
  options.progress.line(`${label} ${strategy} ${profile.name}: ${durationS} s, queue depth ${profile.queueDepth}${activeActive ? ' x 2 streams' : ''}`);

  const pauses: number[] = [];
  const commits: number[] = [];
  let flushedEpoch = -1;
  const waiter = new EventWaiter();
  const events = new AbortController();
  const eventsDone = control
    .followEvents(
      volume.name,
      (event, data) => {
        if (event === 'checkpoint' && typeof data.pauseMs === 'number') pauses.push(data.pauseMs);
        if (event === 'flushed') {
          if (typeof data.durationMs === 'number') commits.push(data.durationMs);
          if (typeof data.epoch === 'number') flushedEpoch = Math.max(flushedEpoch, data.epoch);
        }
        waiter.notify();
      },
      events.signal,
    )
    .catch((error: unknown) => {
      if (!events.signal.aborted) throw error;
    });

  const primary = await connect(volume.uris.primary[0], `${volume.name}/primary`);
  const secondary = activeActive ? await connect(volume.uris.secondary[0], `${volume.name}/secondary`) : undefined;

  let rssMax = 0;
  const sampler =
    target.pid === undefined
      ? undefined
      : setInterval(() => {
          void rssBytes(target.pid!).then((bytes) => {
            if (bytes !== undefined) rssMax = Math.max(rssMax, bytes);
          });
        }, rssSampleMs);
  if (target.pid !== undefined) rssMax = (await rssBytes(target.pid)) ?? 0;

  const stopCheckpoints = new AbortController();
  const apiMs: number[] = [];
  const checkpointsMax = Math.ceil(options.durationMs / options.checkpointMs) + 1;
  const checkpointLoop = (async () => {
    if (!activeActive) return;
    while (apiMs.length < checkpointsMax) {
      try {
        await sleep(options.checkpointMs, undefined, { signal: stopCheckpoints.signal });
      } catch {
        return;
      }
      apiMs.push((await control.checkpoint(volume.name)).ms);
    }
  })();

  const progressP: StreamProgress = { ops: 0 };
  const progressS: StreamProgress = { ops: 0 };
  const live = setInterval(() => {
    options.progress.live(`${label} ${strategy} ${profile.name}: ${progressP.ops + progressS.ops} ops, ${apiMs.length} checkpoints`);
  }, 200);
  let stalled = false;
  const watchdog = setTimeout(() => {
    // Destroying the connections fails the requests still waiting, so the run ends with an error.
    stalled = true;
    primary.destroy();
    secondary?.destroy();
  }, options.durationMs + streamStallMs);
  let results: StreamResult[];
  try {
    const limits = { durationMs: options.durationMs, opsMax: streamOpsMax };
    results = await Promise.all([
      runStream(primary, profile, options.seed, limits, progressP),
      ...(secondary ? [runStream(secondary, profile, options.seed, limits, progressS)] : []),
    ]);
  } catch (error) {
    if (!stalled) throw error;
    throw new Error(
      `${strategy} ${profile.name}: a request got no reply ${streamStallMs} ms after the run's end ` +
        `(${progressP.ops} + ${progressS.ops} ops done); the daemon stopped answering`,
      { cause: error },
    );
  } finally {
    clearTimeout(watchdog);
    clearInterval(live);
    stopCheckpoints.abort();
    await checkpointLoop.catch(() => {});
    if (sampler) clearInterval(sampler);
    await Promise.all([primary.close(), secondary?.close()]);
  }
  await checkpointLoop;
  try {
    // The checkpoint events of the timed part, then an untimed final checkpoint and its commit.
    await waiter.until(() => pauses.length >= apiMs.length, eventsSettleMsMax, 'checkpoint events');
    if (activeActive) {
      const { epoch } = await control.checkpoint(volume.name);
      const view = (await control.volumes()).find((v) => v.name === volume.name) as (VolumeInfo & { durableEpoch?: number }) | undefined;
      if ((view?.durableEpoch ?? epoch) < epoch) {
        await waiter.until(() => flushedEpoch >= epoch, eventsSettleMsMax, `the commit of epoch ${epoch}`);
      }
    }
  } finally {
    events.abort();
    await eventsDone;
  }

  const [p, s] = results;
  const rate = (r: StreamResult) => (r.reads + r.writes) / (r.elapsedMs / 1000);
  const slower = s !== undefined && rate(s) < rate(p) ? s : p;
  const latency = p.latency;
  const flushLatency = p.flushLatency;
  if (s) {
    latency.merge(s.latency);
    flushLatency.merge(s.flushLatency);
  }
  const timedPauses = pauses.slice(0, apiMs.length);
  const row: ResultRow = {
    profile: profile.name,
    strategy,
    opsPerSec: rate(slower),
    mbPerSec: slower.bytes / 1e6 / (slower.elapsedMs / 1000),
    p50Us: latency.percentile(50),
    p99Us: latency.percentile(99),
    flushMs: flushLatency.count > 0 ? flushLatency.percentile(50) / 1000 : null,
    flushP99Ms: flushLatency.count > 0 ? flushLatency.percentile(99) / 1000 : null,
    commitFlushMs: commits.length > 0 ? commits.reduce((a, b) => a + b, 0) / commits.length : null,
    checkpointPauseP99Ms: timedPauses.length > 0 ? percentile(timedPauses, 99) : null,
    checkpointApiP99Ms: apiMs.length > 0 ? percentile(apiMs, 99) : null,
    checkpoints: apiMs.length,
    rssMiB: target.pid === undefined ? null : rssMax / 2 ** 20,
    overheadVsNative: null,
    speedupVsColo: null,
    streams: { primaryOpsPerSec: rate(p), secondaryOpsPerSec: s ? rate(s) : null },
    ops: p.reads + p.writes + (s ? s.reads + s.writes : 0),
    flushes: p.flushes + (s ? s.flushes : 0),
    durationS: p.elapsedMs / 1000,
  };
  options.progress.line(
    `${label} ${strategy} ${profile.name}: ${Math.round(row.opsPerSec)} ops/s, p99 ${Math.round(row.p99Us)} µs, ` +
      `${row.checkpoints} checkpoints${row.checkpointPauseP99Ms === null ? '' : ` (pause p99 ${row.checkpointPauseP99Ms.toFixed(2)} ms)`}`,
  );
  return row;
}
