import { setTimeout as sleep } from 'node:timers/promises';
import { NbdClient } from 'nbd-server-js';
import type { Profile } from './profiles.js';
import { join } from 'node:path';
import {
  ControlClient,
  controlAddress,
  cpuSeconds,
  parseNbdUri,
  rssBytes,
  startDaemon,
  type AckMode,
  type PrimaryVolumeInfo,
  type StartedDaemon,
  type StrategyName,
  type VolumeInfo,
} from './daemon.js';
import type { Progress } from './progress.js';
import type { BenchStrategy, ResultRow } from './report.js';
import { percentile } from './stats.js';
import { Lockstep, runStream, type StreamProgress, type StreamResult } from './workload.js';

/**
 * Runs every (strategy, profile) pair, with one fresh volume per profile, profile by profile. Native is
 * one VM stream alone on a passthrough volume (a local file behind the same daemon code). For colo and
 * gannet the topology is the deployment's (`deployment`, the default): a daemon in the secondary role
 * with the strategy, which serves the SVM stream on `<vol>/secondary`, and a daemon in the primary role
 * that serves the PVM stream from its own backing file and forwards every write to the secondary's
 * `<vol>/primary`; checkpoints go to the primary's control API (it checkpoints its peer), and the row's
 * ops/s is the PVM stream's. `one-daemon` sends both streams to one secondary daemon (`<vol>/primary` and
 * `<vol>/secondary`, the PVM's writes arriving as a primary host would forward them, its reads served
 * there too), ops/s the slower stream's. Both streams run the same workload (same seed) at once, with a
 * checkpoint every `checkpointMs`; deployed, they are kept within vmLeadRequestsMax requests of each other. After a pair the volume is checkpointed and its commit waited for
 * (untimed), so the next pair does not share the disk with a previous background flush.
 */

export const topologies = ['deployment', 'one-daemon'] as const;
export type Topology = (typeof topologies)[number];

/** Hard bound on requests per stream, whatever the duration. */
export const streamOpsMax = 50_000_000;
export const rssSampleMs = 100;
/** How long to wait for events (checkpoint pauses, the last commit) after the streams stop. */
export const eventsSettleMsMax = 60_000;
/** A stream still running this long after its deadline has a request the daemon never answered. */
export const streamStallMs = 30_000;
/** Daemon log lines shown when a run fails. */
const daemonLogTailChars = 4_000;
/**
 * Deployed, how far (in requests) one VM's stream may run ahead of the other's: they execute the same
 * instructions, so the faster waits for the slower (see Lockstep).
 */
export const vmLeadRequestsMax = 64;
/** How long a primary daemon's volumes get to finish their first sync with the secondary. */
export const firstSyncMsMax = 120_000;
const firstSyncPollMs = 100;

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
  /** Where the PVM stream goes for colo and gannet (default deployment; a running daemon is one-daemon). */
  readonly topology?: Topology;
  /** Deployment: the primary daemon's ack mode (its default when left out). */
  readonly ackMode?: AckMode;
  readonly progress: Progress;
  readonly gannetBin?: string;
  /** Use a running daemon instead of starting one per strategy. */
  readonly daemon?: { readonly url: string; readonly token: string; readonly pid?: number; readonly volumes: Partial<Record<BenchStrategy, string>> };
  /** Called with every process started, so the CLI can stop them on a signal. */
  readonly onStop?: (stop: () => Promise<void>) => void;
}

interface Target {
  /** The secondary role's daemon: the SVM stream, the volume's events, and (one-daemon) everything. */
  readonly control: ControlClient;
  readonly pid: number | undefined;
  readonly volume: VolumeInfo;
  readonly daemon?: StartedDaemon;
  /** Deployment: the primary role's daemon, serving the PVM stream and taking the checkpoint calls. */
  readonly primary?: { readonly daemon: StartedDaemon; readonly uri: string | undefined };
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
  const topology = options.topology ?? (options.daemon ? 'one-daemon' : 'deployment');
  if (options.daemon && topology !== 'one-daemon') throw new Error('a running daemon (--daemon) is measured as one-daemon');
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
      if (strategy === 'native' || topology === 'one-daemon') {
        targets.set(strategy, (profile) => ({ control: daemon.control, pid: daemon.pid, volume: pickVolume(volumes, profile.name), daemon }));
        continue;
      }
      options.progress.line(`starting gannet serve --role primary replicating to it, and its first sync of ${options.profiles.length} volume(s)`);
      const primary = await startDaemon({
        dataDir: `${options.workDir}/${strategy}-primary`,
        volumes: options.profiles.map((p) => ({ name: p.name, sizeBytes: options.volumeBytes, ...(options.ackMode !== undefined && { ackMode: options.ackMode }) })),
        gannetBin: options.gannetBin,
        peer: { control: controlAddress(daemon.control), tokenFile: join(daemon.dataDir, 'control.token') },
      });
      daemons.push(primary);
      options.onStop?.(primary.stop);
      const disks = await firstSync(primary, options.profiles.map((p) => p.name));
      targets.set(strategy, (profile) => ({
        control: daemon.control,
        pid: daemon.pid,
        volume: pickVolume(volumes, profile.name),
        daemon,
        primary: { daemon: primary, uri: disks.get(profile.name)?.uris.disk[0] },
      }));
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

/** Waits until every volume of a primary daemon is replicating (its peer's disk whole). */
async function firstSync(primary: StartedDaemon, names: readonly string[]): Promise<Map<string, PrimaryVolumeInfo>> {
  const deadline = performance.now() + firstSyncMsMax;
  for (;;) {
    const volumes = (await primary.control.volumes()) as unknown as PrimaryVolumeInfo[];
    const byName = new Map(volumes.map((v) => [v.name, v]));
    const waiting = names.filter((name) => byName.get(name)?.state !== 'replicating');
    if (waiting.length === 0) return byName;
    if (performance.now() > deadline) {
      const states = waiting
        .map((name) => {
          const volume = byName.get(name);
          return `${name}: ${volume?.state ?? 'absent'}${volume?.link?.error === undefined ? '' : ` (${volume.link.error})`}`;
        })
        .join(', ');
      throw new Error(`the primary daemon's volumes did not reach replicating within ${firstSyncMsMax} ms (${states})`);
    }
    await sleep(firstSyncPollMs);
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
  const deployed = target.primary !== undefined;
  /** Where the PVM stream and the checkpoint calls go. */
  const pvmControl = target.primary?.daemon.control ?? control;
  const pids = [target.pid, target.primary?.daemon.pid].filter((pid): pid is number => pid !== undefined);
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

  const primary = deployed
    ? await connect(target.primary!.uri, `${volume.name} on the primary daemon`)
    : await connect(volume.uris.primary[0], `${volume.name}/primary`);
  const secondary = activeActive ? await connect(volume.uris.secondary[0], `${volume.name}/secondary`) : undefined;

  // RSS of the daemons together, sampled at the same moments.
  const rssNow = async () => (await Promise.all(pids.map(rssBytes))).reduce<number>((sum, bytes) => sum + (bytes ?? 0), 0);
  let rssMax = 0;
  const sampler =
    pids.length === 0
      ? undefined
      : setInterval(() => {
          void rssNow().then((bytes) => {
            rssMax = Math.max(rssMax, bytes);
          });
        }, rssSampleMs);
  if (pids.length > 0) rssMax = await rssNow();
  const cpuStart = await Promise.all([target.pid, target.primary?.daemon.pid].map((pid) => (pid === undefined ? undefined : cpuSeconds(pid))));
  const wallStart = performance.now();

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
      apiMs.push((await pvmControl.checkpoint(volume.name)).ms);
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
    const lockstep = deployed && secondary ? new Lockstep(vmLeadRequestsMax) : undefined;
    const sideOf = (side: 0 | 1) => (lockstep === undefined ? limits : { ...limits, lockstep: { group: lockstep, side } });
    // When one stream ends the other runs out alone.
    const release = () => lockstep?.release();
    results = await Promise.all([
      runStream(primary, profile, options.seed, sideOf(0), progressP).finally(release),
      ...(secondary ? [runStream(secondary, profile, options.seed, sideOf(1), progressS).finally(release)] : []),
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
  const wallS = (performance.now() - wallStart) / 1000;
  const cpuEnd = await Promise.all([target.pid, target.primary?.daemon.pid].map((pid) => (pid === undefined ? undefined : cpuSeconds(pid))));
  const cores = (i: number): number | null =>
    cpuStart[i] === undefined || cpuEnd[i] === undefined ? null : (cpuEnd[i]! - cpuStart[i]!) / wallS;
  await checkpointLoop;
  try {
    // The checkpoint events of the timed part, then an untimed final checkpoint and its commit.
    await waiter.until(() => pauses.length >= apiMs.length, eventsSettleMsMax, 'checkpoint events');
    if (activeActive) {
      const { epoch } = await pvmControl.checkpoint(volume.name);
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
  // Deployed, the PVM's stream is the figure (its overhead against native); on one daemon, the slower VM paces both.
  const slower = deployed || s === undefined || rate(s) >= rate(p) ? p : s;
  const latency = p.latency;
  const flushLatency = p.flushLatency;
  if (s && !deployed) {
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
    rssMiB: pids.length === 0 ? null : rssMax / 2 ** 20,
    cpuCores: { secondary: cores(0), primary: cores(1) },
    topology: strategy === 'native' ? 'native' : deployed ? 'deployment' : 'one-daemon',
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
