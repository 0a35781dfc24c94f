import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { cpus, loadavg, tmpdir, totalmem } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { loadProfiles, selectProfiles } from './profiles.js';
import { Progress } from './progress.js';
import { addRelativeFigures, markdownTable, strategyOrder, writeReport, type BenchStrategy, type MachineInfo } from './report.js';
import type { AckMode } from './daemon.js';
import { runBench, topologies, type Topology } from './runner.js';
import {
  fioVersion,
  runSustained,
  sustainedCheckpointMsDefault,
  sustainedDurationSDefault,
  sustainedDurationSMin,
  sustainedProfiles,
  sustainedQueueDepth,
  sustainedVolumeBytesDefault,
} from './sustained.js';
import { sustainedTable, writeSustainedReport } from './sustained-report.js';
import { MiB } from '@gannet/block-device';

/**
 * `gannet-bench` / `pnpm bench`: native vs COLO-style vs GANNET over the workload
 * profiles, through NBD, with a report in --out; `--sustained` runs the sustained suite (fio at QD32
 * under frequent checkpoints, per-second throughput) instead. Exit status 0 on success, 1 on a failed
 * run, 2 on bad usage.
 */


export const durationSDefault = 30;
export const durationSMax = 3600;
export const checkpointMsDefault = 1000;
export const checkpointMsMin = 10;
export const volumeBytesDefault = 1024 * MiB;
/** --quick: every profile briefly, so the whole run (3 strategies x 5 profiles) stays well under a minute. */
export const quickDurationS = 1.5;
export const quickCheckpointMs = 250;
export const quickVolumeBytes = 64 * MiB;
export const repeatMax = 100;

const usage = `usage: gannet-bench [options]

Runs every workload profile (fixtures/profiles/*.json) against native (passthrough), colo and gannet
through NBD, and writes results.json, report.md and chart.svg to --out. Colo and gannet run as deployed:
a primary daemon serves the PVM stream from its own disk and replicates to a secondary daemon with the
strategy, which serves the SVM stream.

  --out DIR             report directory (default ./bench-results)
  --quick               every profile briefly (${quickDurationS} s, ${quickVolumeBytes / MiB} MiB volumes): a smoke test
  --duration S          seconds per profile and strategy (default ${durationSDefault})
  --checkpoint-ms N     checkpoint interval for colo and gannet (default ${checkpointMsDefault})
  --topology T          deployment (default) or one-daemon: both VM streams into one secondary daemon
  --ack-mode M          deployment: the primary's ack mode, peer (the PVM hears back once both disks
                        have the write; the default) or local (once its own disk has)
  --profiles A,B        only these profiles
  --strategies A,B      among native,colo,gannet (default all)
  --size MIB            volume size in MiB (default ${volumeBytesDefault / MiB})
  --seed N              workload seed (default 1)
  --repeat N            runs per profile and strategy, interleaved; the report keeps the median (default 1)
  --profiles-dir DIR    profiles directory (default fixtures/profiles)
  --work-dir DIR        where started daemons keep their data (default: a fresh temporary directory, removed after)
  --gannet PATH         the gannet CLI script (default packages/server/bin/gannet.js)
  --daemon URL          use a running daemon's control API instead of starting them (topology one-daemon)
  --token-file FILE     its bearer token (default: $GANNET_TOKEN)
  --daemon-pid PID      its pid, for RSS samples
  --volume S=NAME       with --daemon: the volume to use for strategy S (default: the first with its strategy)
  --quiet               no progress on stderr
  -h, --help            this text

  --sustained           the sustained suite instead: one fio job (nbd engine, QD${sustainedQueueDepth}) per profile
                        into <vol>/primary while colo and gannet are checkpointed (native: NBD FLUSH) at
                        each cadence; reports per-second throughput and the checkpoint call's latency.
                        Profiles: ${sustainedProfiles.map((p) => p.name).join(', ')}. With it:
                        --duration S (whole seconds, default ${sustainedDurationSDefault}), --checkpoint-ms A,B (cadences,
                        default ${sustainedCheckpointMsDefault.join(',')}), --profiles, --strategies, --size MIB (default
                        ${sustainedVolumeBytesDefault / MiB}), --seed, --work-dir, --gannet, --out, --quiet.
`;

/** Options of the profile runs that mean nothing to the sustained suite. */
const notSustained = ['quick', 'repeat', 'profiles-dir', 'daemon', 'token-file', 'daemon-pid', 'volume', 'topology', 'ack-mode'] as const;

class UsageError extends Error {}

function positiveNumber(text: string | undefined, flag: string, fallback: number, max = Number.MAX_SAFE_INTEGER): number {
  if (text === undefined) return fallback;
  const value = Number(text);
  if (!(Number.isFinite(value) && value > 0 && value <= max)) throw new UsageError(`${flag}: expected a number in (0, ${max}], got "${text}"`);
  return value;
}

function list(text: string | undefined): string[] | undefined {
  return text === undefined ? undefined : text.split(',').map((s) => s.trim()).filter((s) => s !== '');
}

function commandOutput(file: string, args: string[]): Promise<string> {
  return new Promise((done) => {
    execFile(file, args, { timeout: 10_000, encoding: 'utf8' }, (error, stdout) => done(error ? '' : stdout));
  });
}

async function machineInfo(dir: string): Promise<MachineInfo> {
  const df = (await commandOutput('df', ['-hT', dir])).trim().split('\n').pop() ?? '';
  const [device, type, size, , avail] = df.split(/\s+/);
  return {
    nproc: cpus().length,
    cpuModel: cpus()[0]?.model.trim() ?? 'unknown',
    memTotalGiB: totalmem() / 2 ** 30,
    node: process.version,
    platform: `${process.platform} ${process.arch}`,
    dataDirFs: df === '' ? 'unknown' : `${device} (${type}, ${size}, ${avail} free)`,
  };
}

export async function main(rawArgv: readonly string[]): Promise<number> {
  // `pnpm bench -- --flag` hands the script a literal `--` first, which would end the options.
  const argv = rawArgv[0] === '--' ? rawArgv.slice(1) : rawArgv;
  const progress = new Progress({ quiet: argv.includes('--quiet') });
  const stops = new Set<() => Promise<void>>();
  let code: number;
  let workDir: string | undefined;
  let removeWorkDir = false;
  const onSignal = (signal: NodeJS.Signals) => {
    progress.line(`${signal}: stopping the processes started`);
    // process.exit skips main's finally, so the temporary data (gigabytes after a sustained row) goes here.
    void Promise.all([...stops].map((stop) => stop()))
      .then(() => (workDir !== undefined && removeWorkDir ? rm(workDir, { recursive: true, force: true }) : undefined))
      .finally(() => process.exit(130));
  };
  try {
    const { values } = parseArgs({
      args: [...argv],
      strict: true,
      allowPositionals: false,
      options: {
        out: { type: 'string' },
        quick: { type: 'boolean' },
        duration: { type: 'string' },
        'checkpoint-ms': { type: 'string' },
        topology: { type: 'string' },
        'ack-mode': { type: 'string' },
        profiles: { type: 'string' },
        strategies: { type: 'string' },
        size: { type: 'string' },
        seed: { type: 'string' },
        repeat: { type: 'string' },
        'profiles-dir': { type: 'string' },
        'work-dir': { type: 'string' },
        gannet: { type: 'string' },
        daemon: { type: 'string' },
        'token-file': { type: 'string' },
        'daemon-pid': { type: 'string' },
        volume: { type: 'string', multiple: true },
        quiet: { type: 'boolean' },
        sustained: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
    });
    if (values.help) {
      process.stdout.write(usage);
      return 0;
    }
    const strategies = (list(values.strategies) ?? [...strategyOrder]).map((s) => {
      if (!(strategyOrder as readonly string[]).includes(s)) throw new UsageError(`--strategies: unknown "${s}" (native, colo, gannet)`);
      return s as BenchStrategy;
    });
    const seed = Math.floor(positiveNumber(values.seed, '--seed', 1));
    const out = resolve(values.out ?? 'bench-results');
    const run = values.sustained
      ? sustainedSuite(values, { strategies, seed, out, progress, stops })
      : await profileSuite(values, { strategies, seed, out, progress, stops });

    if (values['work-dir'] !== undefined) workDir = resolve(values['work-dir']);
    else {
      workDir = await mkdtemp(join(tmpdir(), 'gannet-bench-'));
      removeWorkDir = true;
    }
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    process.stdout.write(await run(workDir, await machineInfo(workDir)));
    code = 0;
  } catch (error) {
    progress.clearLive();
    if (error instanceof UsageError || (error as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
      process.stderr.write(`gannet-bench: ${(error as Error).message}\n\n${usage}`);
      code = 2;
    } else {
      process.stderr.write(`gannet-bench: ${(error as Error)?.stack ?? String(error)}\n`);
      code = 1;
    }
  } finally {
    await Promise.all([...stops].map((stop) => stop()));
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    if (workDir !== undefined && removeWorkDir) await rm(workDir, { recursive: true, force: true });
  }
  process.exitCode = code;
  return code;
}

interface SuiteContext {
  readonly strategies: readonly BenchStrategy[];
  readonly seed: number;
  readonly out: string;
  readonly progress: Progress;
  readonly stops: Set<() => Promise<void>>;
}

interface SuiteValues {
  readonly [flag: string]: string | boolean | string[] | undefined;
}

/** A checked plan: given the work directory and the machine, runs and reports, and returns the text for stdout. */
type Suite = (workDir: string, machine: MachineInfo) => Promise<string>;

const text = (values: SuiteValues, flag: string): string | undefined => values[flag] as string | undefined;

/** The workload profiles of fixtures/profiles, with the in-JS NbdClient workload. */
async function profileSuite(values: SuiteValues, { strategies, seed, out, progress, stops }: SuiteContext): Promise<Suite> {
  const quick = values.quick === true;
  const durationS = positiveNumber(text(values, 'duration'), '--duration', quick ? quickDurationS : durationSDefault, durationSMax);
  const checkpointMs = positiveNumber(text(values, 'checkpoint-ms'), '--checkpoint-ms', quick ? quickCheckpointMs : checkpointMsDefault);
  if (checkpointMs < checkpointMsMin) throw new UsageError(`--checkpoint-ms: at least ${checkpointMsMin}`);
  const size = text(values, 'size');
  const volumeBytes = size === undefined ? (quick ? quickVolumeBytes : volumeBytesDefault) : positiveNumber(size, '--size', 0) * MiB;
  if (!Number.isInteger(volumeBytes / 4096)) throw new UsageError('--size: the volume must be a multiple of 4 KiB');
  const repeat = positiveNumber(text(values, 'repeat'), '--repeat', 1, repeatMax);
  if (!Number.isInteger(repeat)) throw new UsageError('--repeat: expected a whole number');
  const profiles = selectProfiles(await loadProfiles(text(values, 'profiles-dir')), list(text(values, 'profiles')));
  const topologyText = text(values, 'topology') ?? (text(values, 'daemon') === undefined ? 'deployment' : 'one-daemon');
  if (!(topologies as readonly string[]).includes(topologyText)) throw new UsageError(`--topology: deployment or one-daemon, not "${topologyText}"`);
  const topology = topologyText as Topology;
  if (text(values, 'daemon') !== undefined && topology !== 'one-daemon') throw new UsageError('--daemon measures one running daemon: --topology one-daemon');
  const ackModeText = text(values, 'ack-mode');
  if (ackModeText !== undefined && ackModeText !== 'peer' && ackModeText !== 'local') throw new UsageError(`--ack-mode: peer or local, not "${ackModeText}"`);
  if (ackModeText !== undefined && topology !== 'deployment') throw new UsageError('--ack-mode: only with --topology deployment (it is the primary daemon\'s)');
  const ackMode: AckMode = ackModeText ?? 'peer';

  let daemon: Parameters<typeof runBench>[0]['daemon'];
  const daemonUrl = text(values, 'daemon');
  if (daemonUrl !== undefined) {
    const tokenFile = text(values, 'token-file');
    const token = tokenFile !== undefined ? (await readFile(tokenFile, 'utf8')).trim() : process.env.GANNET_TOKEN;
    if (!token) throw new UsageError('--daemon needs --token-file FILE or $GANNET_TOKEN');
    const volumes: Partial<Record<BenchStrategy, string>> = {};
    for (const spec of (values.volume as string[] | undefined) ?? []) {
      const [s, name] = spec.split('=');
      if (!(strategyOrder as readonly string[]).includes(s) || !name) throw new UsageError(`--volume: expected S=NAME, got "${spec}"`);
      volumes[s as BenchStrategy] = name;
    }
    const pidText = text(values, 'daemon-pid');
    const pid = pidText === undefined ? undefined : positiveNumber(pidText, '--daemon-pid', 0);
    daemon = { url: daemonUrl, token, pid, volumes };
  }

  return async (workDir, machine) => {
    progress.line(
      `gannet-bench: ${profiles.length} profile(s) x ${strategies.join(', ')}, ${durationS} s each` +
        `${repeat > 1 ? `, ${repeat} rounds` : ''}, checkpoint every ${checkpointMs} ms, topology ${topology}${topology === 'deployment' ? ` (ack mode ${ackMode})` : ''}`,
    );
    const rows = await runBench({
      topology,
      ackMode,
      profiles,
      strategies,
      durationMs: durationS * 1000,
      checkpointMs,
      volumeBytes,
      seed,
      repeat,
      workDir,
      progress,
      gannetBin: text(values, 'gannet'),
      daemon,
      onStop: (stop) => stops.add(stop),
    });
    // Rows grouped by profile, strategies in a fixed order, whatever order they ran in.
    rows.sort((a, b) => profiles.findIndex((p) => p.name === a.profile) - profiles.findIndex((p) => p.name === b.profile) ||
      strategyOrder.indexOf(a.strategy) - strategyOrder.indexOf(b.strategy));
    addRelativeFigures(rows);
    const files = await writeReport(out, {
      generatedAt: new Date().toISOString(),
      machine,
      settings: { durationS, checkpointMs, volumeBytes, seed, repeat, quick, daemon: daemon?.url ?? 'started per strategy', topology, ...(topology === 'deployment' && { ackMode }) },
      rows,
    });
    return `${markdownTable(rows)}\n\nreport: ${files.markdown}\nresults: ${files.json}\nchart: ${files.svg}\n`;
  };
}

/** The sustained suite: fio at QD32 into <vol>/primary under frequent checkpoints, per second. */
function sustainedSuite(values: SuiteValues, { strategies, seed, out, progress, stops }: SuiteContext): Suite {
  for (const flag of notSustained) {
    if (values[flag] !== undefined) throw new UsageError(`--${flag} does not apply to --sustained`);
  }
  const durationS = positiveNumber(text(values, 'duration'), '--duration', sustainedDurationSDefault, durationSMax);
  if (!Number.isInteger(durationS) || durationS < sustainedDurationSMin) {
    throw new UsageError(`--duration: whole seconds, at least ${sustainedDurationSMin}, with --sustained`);
  }
  const cadences = list(text(values, 'checkpoint-ms'))?.map((ms) => positiveNumber(ms, '--checkpoint-ms', 0)) ?? [...sustainedCheckpointMsDefault];
  if (cadences.length === 0 || cadences.some((ms) => !Number.isInteger(ms) || ms < checkpointMsMin)) {
    throw new UsageError(`--checkpoint-ms: whole milliseconds, at least ${checkpointMsMin} each`);
  }
  const size = text(values, 'size');
  const volumeBytes = size === undefined ? sustainedVolumeBytesDefault : positiveNumber(size, '--size', 0) * MiB;
  if (!Number.isInteger(volumeBytes / 65536)) throw new UsageError('--size: with --sustained, a multiple of 64 KiB (the largest request)');
  const names = list(text(values, 'profiles'));
  const profiles = (names ?? sustainedProfiles.map((p) => p.name)).map((name) => {
    const found = sustainedProfiles.find((p) => p.name === name);
    if (!found) throw new UsageError(`--profiles: unknown sustained profile "${name}" (known: ${sustainedProfiles.map((p) => p.name).join(', ')})`);
    return found;
  });

  return async (workDir, machine) => {
    const fio = await fioVersion();
    const loadAverageStart = loadavg();
    progress.line(
      `gannet-bench --sustained: ${profiles.length} profile(s) x checkpoint every ${cadences.join(', ')} ms x ` +
        `${strategies.join(', ')}, ${durationS} s each, ${fio}, load average ${loadAverageStart.map((l) => l.toFixed(2)).join(' ')}`,
    );
    const rows = await runSustained({
      profiles,
      checkpointMs: cadences,
      strategies,
      durationS,
      volumeBytes,
      seed,
      workDir,
      progress,
      gannetBin: text(values, 'gannet'),
      onStop: (stop) => stops.add(stop),
    });
    const files = await writeSustainedReport(out, {
      generatedAt: new Date().toISOString(),
      machine,
      settings: {
        suite: 'sustained',
        durationS,
        checkpointMs: cadences,
        volumeBytes,
        queueDepth: sustainedQueueDepth,
        seed,
        fio,
        loadAverageStart,
        loadAverageEnd: loadavg(),
      },
      rows,
    });
    return `${sustainedTable(rows)}\n\nreport: ${files.markdown}\nresults: ${files.json}\nchart: ${files.svg}\n`;
  };
}
