import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { cpus, tmpdir, totalmem } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { loadProfiles, selectProfiles } from './profiles.js';
import { Progress } from './progress.js';
import { addRelativeFigures, markdownTable, strategyOrder, writeReport, type BenchStrategy, type MachineInfo } from './report.js';
import { runBench } from './runner.js';
import { KiB, MiB } from '@gannet/block-device';

/**
 * `gannet-bench` / `pnpm bench`: native vs COLO-style vs GANNET over the workload
 * profiles, through NBD, with a report in --out. Exit status 0 on success, 1 on a failed run, 2 on
 * bad usage.
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
volumes of a gannet daemon through NBD, and writes results.json, report.md and chart.svg to --out.

  --out DIR             report directory (default ./bench-results)
  --quick               every profile briefly (${quickDurationS} s, ${quickVolumeBytes / MiB} MiB volumes): a smoke test
  --duration S          seconds per profile and strategy (default ${durationSDefault})
  --checkpoint-ms N     checkpoint interval for colo and gannet (default ${checkpointMsDefault})
  --profiles A,B        only these profiles
  --strategies A,B      among native,colo,gannet (default all)
  --size MIB            volume size in MiB (default ${volumeBytesDefault / MiB})
  --seed N              workload seed (default 1)
  --repeat N            runs per profile and strategy, interleaved; the report keeps the median (default 1)
  --profiles-dir DIR    profiles directory (default fixtures/profiles)
  --work-dir DIR        where started daemons keep their data (default: a fresh temporary directory, removed after)
  --gannet PATH         the gannet CLI script (default packages/server/bin/gannet.js)
  --daemon URL          use a running daemon's control API instead of starting one per strategy
  --token-file FILE     its bearer token (default: $GANNET_TOKEN)
  --daemon-pid PID      its pid, for RSS samples
  --volume S=NAME       with --daemon: the volume to use for strategy S (default: the first with its strategy)
  --quiet               no progress on stderr
  -h, --help            this text
`;

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

export async function main(argv: readonly string[]): Promise<number> {
  const progress = new Progress({ quiet: argv.includes('--quiet') });
  const stops = new Set<() => Promise<void>>();
  const onSignal = (signal: NodeJS.Signals) => {
    progress.line(`${signal}: stopping daemons`);
    void Promise.all([...stops].map((stop) => stop())).finally(() => process.exit(130));
  };
  let code: number;
  let workDir: string | undefined;
  let removeWorkDir = false;
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
        help: { type: 'boolean', short: 'h' },
      },
    });
    if (values.help) {
      process.stdout.write(usage);
      return 0;
    }
    const quick = values.quick === true;
    const durationS = positiveNumber(values.duration, '--duration', quick ? quickDurationS : durationSDefault, durationSMax);
    const checkpointMs = positiveNumber(values['checkpoint-ms'], '--checkpoint-ms', quick ? quickCheckpointMs : checkpointMsDefault);
    if (checkpointMs < checkpointMsMin) throw new UsageError(`--checkpoint-ms: at least ${checkpointMsMin}`);
    const volumeBytes = values.size === undefined ? (quick ? quickVolumeBytes : volumeBytesDefault) : positiveNumber(values.size, '--size', 0) * MiB;
    if (!Number.isInteger(volumeBytes / 4096)) throw new UsageError('--size: the volume must be a multiple of 4 KiB');
    const seed = Math.floor(positiveNumber(values.seed, '--seed', 1));
    const repeat = positiveNumber(values.repeat, '--repeat', 1, repeatMax);
    if (!Number.isInteger(repeat)) throw new UsageError('--repeat: expected a whole number');
    const strategies = (list(values.strategies) ?? [...strategyOrder]).map((s) => {
      if (!(strategyOrder as readonly string[]).includes(s)) throw new UsageError(`--strategies: unknown "${s}" (native, colo, gannet)`);
      return s as BenchStrategy;
    });
    const profiles = selectProfiles(await loadProfiles(values['profiles-dir']), list(values.profiles));
    const out = resolve(values.out ?? 'bench-results');

    let daemon: Parameters<typeof runBench>[0]['daemon'];
    if (values.daemon !== undefined) {
      const token = values['token-file'] !== undefined ? (await readFile(values['token-file'], 'utf8')).trim() : process.env.GANNET_TOKEN;
      if (!token) throw new UsageError('--daemon needs --token-file FILE or $GANNET_TOKEN');
      const volumes: Partial<Record<BenchStrategy, string>> = {};
      for (const spec of values.volume ?? []) {
        const [s, name] = spec.split('=');
        if (!(strategyOrder as readonly string[]).includes(s) || !name) throw new UsageError(`--volume: expected S=NAME, got "${spec}"`);
        volumes[s as BenchStrategy] = name;
      }
      const pid = values['daemon-pid'] === undefined ? undefined : positiveNumber(values['daemon-pid'], '--daemon-pid', 0);
      daemon = { url: values.daemon, token, pid, volumes };
    }

    if (values['work-dir'] !== undefined) workDir = resolve(values['work-dir']);
    else {
      workDir = await mkdtemp(join(tmpdir(), 'gannet-bench-'));
      removeWorkDir = true;
    }
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    const machine = await machineInfo(workDir);
    progress.line(
      `gannet-bench: ${profiles.length} profile(s) x ${strategies.join(', ')}, ${durationS} s each` +
        `${repeat > 1 ? `, ${repeat} rounds` : ''}, checkpoint every ${checkpointMs} ms`,
    );
    const rows = await runBench({
      profiles,
      strategies,
      durationMs: durationS * 1000,
      checkpointMs,
      volumeBytes,
      seed,
      repeat,
      workDir,
      progress,
      gannetBin: values.gannet,
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
      settings: { durationS, checkpointMs, volumeBytes, seed, repeat, quick, daemon: daemon?.url ?? 'started per strategy' },
      rows,
    });
    process.stdout.write(`${markdownTable(rows)}\n\nreport: ${files.markdown}\nresults: ${files.json}\nchart: ${files.svg}\n`);
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
