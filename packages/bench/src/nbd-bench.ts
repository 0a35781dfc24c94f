/**
 * `pnpm bench:nbd`: fio's nbd engine against the nbd-server-js CLI and nbdkit, same machine, same run,
 * same backing (a preallocated file, or a memory disk prefilled with data), so the ratio column says
 * how far our server is from a mature C server on this box.
 *
 * Rows: 4 KiB random read and write at queue depth 32, 1 MiB sequential read and write at depth 8, for
 * the file and the memory backend, and for gannet's buffered path, both exports of a `gannet serve`
 * daemon's gannet volume between checkpoints (writes land in memory, reads come from the buffers over
 * the backing file): `gannet` is NAME/secondary (the SVM's disk), `gannet-primary` NAME/primary (where
 * a primary host forwards every PVM write), each against nbdkit's memory plugin, the fastest thing
 * nbdkit offers. The table is headed by the date, the machine and the tools' versions. Each fio run is time-based with a ramp and a bounded runtime, and
 * the order alternates (ours, nbdkit) per row so drift hurts both alike. Every process it starts is
 * stopped, also on failure or Ctrl-C.
 *
 * Usage: node packages/bench/dist/nbd-bench.js [--runtime S] [--ramp S] [--size SIZE] [--json FILE]
 *        [--backends file,memory,gannet,gannet-primary] [--only REGEXP] [--profile DIR]
 * --profile runs our CLI under `node --cpu-prof` and prints the top functions by self time; with --only
 * and one backend, the profile covers a single workload (plus the ramp and the other server's turn,
 * which shows up as idle).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, watch } from 'node:fs';
import { copyFile, mkdir, mkdtemp, open, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { cpus, release, tmpdir, totalmem } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { startDaemon } from './daemon.js';
import { KiB, MiB, parseSize } from '@gannet/block-device';


/** Upper bound on one fio run beyond its own runtime (startup, connect, final stats). */
const fioSlackMs = 60_000;
/** How long a server gets to become ready. */
const serverReadyTimeoutMs = 20_000;
/** How long a server gets to exit after SIGTERM before SIGKILL. */
const serverStopGraceMs = 10_000;
/** Largest runtime per row we accept, so a typo cannot start an hours-long run. */
const runtimeSecondsMax = 600;
/** Buffer for writing the preallocated file. */
const fillChunkBytes = 4 * MiB;

const ourCli = fileURLToPath(new URL('../../nbd-server-js/bin/nbd-server-js.js', import.meta.url));

export interface Workload {
  readonly name: string;
  readonly rw: 'randread' | 'randwrite' | 'read' | 'write';
  readonly bs: string;
  readonly iodepth: number;
}

export const workloads: readonly Workload[] = [
  { name: 'randread 4k qd32', rw: 'randread', bs: '4k', iodepth: 32 },
  { name: 'randwrite 4k qd32', rw: 'randwrite', bs: '4k', iodepth: 32 },
  { name: 'seqread 1M qd8', rw: 'read', bs: '1M', iodepth: 8 },
  { name: 'seqwrite 1M qd8', rw: 'write', bs: '1M', iodepth: 8 },
];

export const backends = ['file', 'memory', 'gannet', 'gannet-primary'] as const;
export type Backend = (typeof backends)[number];

export interface Measurement {
  readonly iops: number;
  readonly mbPerSec: number;
  readonly p99Us: number;
}

export interface Row {
  readonly row: string;
  readonly backend: Backend;
  readonly workload: string;
  readonly ours: Measurement;
  readonly nbdkit: Measurement;
  /** ours.iops / nbdkit.iops */
  readonly ratio: number;
}

interface Options {
  runtimeS: number;
  rampS: number;
  sizeBytes: number;
  jsonPath?: string;
  backends: Backend[];
  profileDir?: string;
  /** Runs only the workloads whose name matches (e.g. 'randread'). */
  only?: RegExp;
}

function sizeOf(text: string): number {
  const bytes = parseSize(text);
  if (bytes === undefined || bytes <= 0) throw new Error(`bad size ${text} (e.g. 256M)`);
  return bytes;
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      runtime: { type: 'string', default: '10' },
      ramp: { type: 'string' },
      size: { type: 'string', default: '256M' },
      json: { type: 'string' },
      backends: { type: 'string', default: backends.join(',') },
      profile: { type: 'string' },
      only: { type: 'string' },
      help: { type: 'boolean', default: false },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(
      `usage: nbd-bench [--runtime S (10)] [--ramp S] [--size SIZE (256M)] [--json FILE] [--backends ${backends.join(',')}] [--only REGEXP] [--profile DIR]\n`,
    );
    process.exit(0);
  }
  const runtimeS = Number(values.runtime);
  if (!Number.isInteger(runtimeS) || runtimeS < 1 || runtimeS > runtimeSecondsMax) {
    throw new Error(`--runtime must be an integer in [1, ${runtimeSecondsMax}] seconds`);
  }
  const rampS = values.ramp === undefined ? Math.min(2, Math.floor(runtimeS / 5)) : Number(values.ramp);
  if (!Number.isInteger(rampS) || rampS < 0 || rampS > runtimeS) throw new Error('--ramp must be an integer in [0, runtime]');
  const chosen = values.backends!.split(',').map((b) => {
    if (!(backends as readonly string[]).includes(b)) throw new Error(`unknown backend ${b} (${backends.join(', ')})`);
    return b as Backend;
  });
  const sizeBytes = sizeOf(values.size!);
  if (sizeBytes < 16 * MiB || sizeBytes % MiB !== 0) throw new Error('--size must be a multiple of 1M, at least 16M');
  return {
    runtimeS,
    rampS,
    sizeBytes,
    jsonPath: values.json,
    backends: chosen,
    profileDir: values.profile === undefined ? undefined : resolve(values.profile),
    only: values.only === undefined ? undefined : new RegExp(values.only),
  };
}

// ---- processes ----

const started = new Set<ChildProcess>();

function stopProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) {
    started.delete(child);
    return Promise.resolve();
  }
  const exited = once(child, 'exit').then(() => undefined);
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), serverStopGraceMs);
  return exited.finally(() => {
    clearTimeout(timer);
    started.delete(child);
  });
}

/** Servers that are not plain child processes (the gannet daemon), stopped with the rest. */
const stoppers = new Set<() => Promise<void>>();

async function stopAll(): Promise<void> {
  await Promise.all([...started].map(stopProcess));
  await Promise.all([...stoppers].map((stop) => stop()));
}

function track(child: ChildProcess, what: string): { stderr: () => string } {
  started.add(child);
  let err = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (c: string) => {
    err = (err + c).slice(-64 * KiB);
  });
  child.once('error', (e) => {
    err += `\n${what}: ${e.message}`;
  });
  return { stderr: () => err };
}

function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      if (addr === null || typeof addr === 'string') return reject(new Error('no TCP address'));
      srv.close(() => resolvePort(addr.port));
    });
  });
}

interface Server {
  readonly name: string;
  readonly uri: string;
  /** 'still running' or how it exited, for error messages. */
  state(): string;
  stderr(): string;
  stop(): Promise<void>;
}

/** Our CLI on port 0; ready when it prints its URI. */
async function startOurs(target: { file: string } | { memory: number }, profileDir?: string): Promise<Server> {
  if (!existsSync(ourCli)) throw new Error(`${ourCli} missing`);
  const nodeArgs = profileDir ? ['--cpu-prof', `--cpu-prof-dir=${profileDir}`] : [];
  const dev = 'file' in target ? [target.file] : ['--memory', String(target.memory)];
  const child = spawn(process.execPath, [...nodeArgs, ourCli, '--host', '127.0.0.1', '--port', '0', ...dev], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const t = track(child, 'nbd-server-js');
  const uri = await new Promise<string>((resolveUri, reject) => {
    let buf = '';
    const timer = setTimeout(() => fail('not ready in time'), serverReadyTimeoutMs);
    function fail(why: string) {
      clearTimeout(timer);
      reject(new Error(`nbd-server-js: ${why}\n${t.stderr()}`));
    }
    child.once('exit', (code, signal) => fail(`exited early (code ${code}, signal ${signal})`));
    child.stdout!.setEncoding('utf8');
    child.stdout!.on('data', (c: string) => {
      buf += c;
      const m = /^nbd-server-js: serving (nbd:\/\/\S+)/m.exec(buf);
      if (m) {
        clearTimeout(timer);
        child.removeAllListeners('exit');
        resolveUri(m[1]);
      }
    });
  }).catch(async (err) => {
    await stopProcess(child);
    throw err;
  });
  return { name: 'nbd-server-js', uri, state: () => processState(child), stderr: t.stderr, stop: () => stopProcess(child) };
}

function processState(child: ChildProcess): string {
  return child.exitCode === null && child.signalCode === null ? 'still running' : `exited (${child.exitCode ?? child.signalCode})`;
}

/** `gannet serve` with one gannet volume; fio attaches to one of its views (the buffered path). */
async function startGannet(sizeBytes: number, dir: string, view: 'primary' | 'secondary'): Promise<Server> {
  const daemon = await startDaemon({ dataDir: join(dir, `gannet-${view}`), volumes: [{ name: 'bench', strategy: 'gannet', sizeBytes }] });
  stoppers.add(daemon.stop);
  const [volume] = await daemon.control.volumes();
  const uri = volume?.uris[view][0];
  if (uri === undefined) {
    await daemon.stop();
    throw new Error(`gannet serve lists no ${view} NBD URI for its volume\n${daemon.stderr()}`);
  }
  let alive = true;
  return {
    name: 'gannet',
    uri,
    state: () => {
      try {
        process.kill(daemon.pid, 0);
      } catch {
        alive = false;
      }
      return alive ? 'still running' : 'exited';
    },
    stderr: daemon.stderr,
    stop: async () => {
      await daemon.stop();
      stoppers.delete(daemon.stop);
    },
  };
}

/** nbdkit in the foreground on a free port; ready when it writes its pidfile (after it listens). */
async function startNbdkit(target: { file: string } | { memory: number }, dir: string): Promise<Server> {
  const port = await freePort();
  const pidfile = join(dir, `nbdkit-${port}.pid`);
  const plugin = 'file' in target ? ['file', target.file] : ['memory', String(target.memory)];
  const watcher = watch(dir);
  try {
    const child = spawn('nbdkit', ['-f', '--exit-with-parent', '-p', String(port), '-i', '127.0.0.1', '-P', pidfile, ...plugin], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    const t = track(child, 'nbdkit');
    await new Promise<void>((resolveReady, reject) => {
      const timer = setTimeout(() => fail('not ready in time'), serverReadyTimeoutMs);
      function done() {
        clearTimeout(timer);
        child.removeListener('exit', onExit);
        resolveReady();
      }
      function fail(why: string) {
        clearTimeout(timer);
        void stopProcess(child).then(() => reject(new Error(`nbdkit: ${why}\n${t.stderr()}`)));
      }
      function onExit(code: number | null) {
        fail(`exited early (code ${code}); is nbdkit installed? apt-get install nbdkit`);
      }
      child.once('exit', onExit);
      watcher.on('change', () => {
        if (existsSync(pidfile)) done();
      });
      if (existsSync(pidfile)) done();
    });
    return { name: 'nbdkit', uri: `nbd://127.0.0.1:${port}/`, state: () => processState(child), stderr: t.stderr, stop: () => stopProcess(child) };
  } finally {
    watcher.close();
  }
}

// ---- fio ----

interface FioRun {
  stdout: string;
  stderr: string;
  code: number | null;
}

/** fio runs in the bench's temporary directory, so any state file it writes goes away with it. */
function runFio(args: string[], timeoutMs: number, cwd: string): Promise<FioRun> {
  const child = spawn('fio', args, { stdio: ['ignore', 'pipe', 'pipe'], cwd });
  started.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8');
  child.stderr!.setEncoding('utf8');
  child.stdout!.on('data', (c: string) => (stdout += c));
  child.stderr!.on('data', (c: string) => (stderr += c));
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
  return new Promise((resolveRun, reject) => {
    child.once('error', (e) => {
      clearTimeout(timer);
      started.delete(child);
      reject(new Error(`fio: cannot run (${e.message}); apt-get install fio`));
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      started.delete(child);
      resolveRun({ stdout, stderr, code });
    });
  });
}

interface FioSide {
  iops: number;
  bw_bytes: number;
  clat_ns: { percentile?: Record<string, number> };
}

async function fioMeasure(server: Server, w: Workload, o: Options, cwd: string): Promise<Measurement> {
  const args = [
    `--name=${w.rw}`,
    '--ioengine=nbd',
    `--uri=${server.uri}`,
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--iodepth=${w.iodepth}`,
    `--size=${o.sizeBytes}`,
    '--time_based',
    `--runtime=${o.runtimeS}`,
    `--ramp_time=${o.rampS}`,
    '--norandommap',
    '--randrepeat=0',
    '--output-format=json',
  ];
  const r = await runFio(args, (o.runtimeS + o.rampS) * 1000 + fioSlackMs, cwd);
  if (r.code !== 0) {
    const state = server.state();
    throw new Error(
      `fio ${args.join(' ')} against ${server.name} failed (exit ${r.code}):\n${r.stderr}\n--- ${server.name} ${state}, stderr:\n${server.stderr()}`,
    );
  }
  const json = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: ({ error: number } & Record<'read' | 'write', FioSide>)[] };
  const job = json.jobs[0];
  if (job.error !== 0) throw new Error(`fio job error ${job.error}: ${r.stderr}`);
  const side = w.rw === 'randread' || w.rw === 'read' ? job.read : job.write;
  const p99 = side.clat_ns.percentile?.['99.000000'];
  return { iops: side.iops, mbPerSec: side.bw_bytes / 1e6, p99Us: p99 === undefined ? Number.NaN : p99 / 1000 };
}

/** Fills a memory disk with data so reads are of real bytes, not holes. */
async function prefill(uri: string, o: Options, cwd: string): Promise<void> {
  const args = ['--name=prefill', '--ioengine=nbd', `--uri=${uri}`, '--rw=write', '--bs=1M', '--iodepth=8', `--size=${o.sizeBytes}`, '--output-format=terse'];
  const r = await runFio(args, fioSlackMs * 5, cwd);
  if (r.code !== 0) throw new Error(`prefill failed: ${r.stderr}`);
}

async function writeDataFile(path: string, sizeBytes: number): Promise<void> {
  const fh = await open(path, 'w');
  try {
    const chunk = Buffer.alloc(fillChunkBytes);
    for (let i = 0; i < chunk.length; i += 4) chunk.writeUInt32LE((i * 2654435761) >>> 0, i);
    for (let off = 0; off < sizeBytes; off += chunk.length) {
      await fh.write(chunk, 0, Math.min(chunk.length, sizeBytes - off), off);
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
}

// ---- report ----

function fmt(n: number, digits = 0): string {
  return Number.isFinite(n) ? n.toFixed(digits) : '-';
}

export function formatTable(rows: readonly Row[]): string {
  const header = ['row', 'ours IOPS', 'ours MB/s', 'ours p99 us', 'nbdkit IOPS', 'nbdkit MB/s', 'nbdkit p99 us', 'ratio'];
  const body = rows.map((r) => [
    r.row,
    fmt(r.ours.iops),
    fmt(r.ours.mbPerSec, 1),
    fmt(r.ours.p99Us),
    fmt(r.nbdkit.iops),
    fmt(r.nbdkit.mbPerSec, 1),
    fmt(r.nbdkit.p99Us),
    `${fmt(r.ratio, 2)}x`,
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...body.map(line)].join('\n');
}

/** What each backend's rows compare, for the ratio table's header. */
const anchorOf: Record<Backend, string> = {
  file: 'ours file / nbdkit file',
  memory: 'ours memory / nbdkit memory',
  gannet: 'NAME/secondary / nbdkit memory',
  'gannet-primary': 'NAME/primary / nbdkit memory',
};

/** The ratios alone: a workload per line, a backend per column. */
export function formatRatios(rows: readonly Row[]): string {
  const present = backends.filter((b) => rows.some((r) => r.backend === b));
  const names = [...new Set(rows.map((r) => r.workload))];
  const header = ['workload', ...present.map((b) => anchorOf[b])];
  const body = names.map((w) => [
    w,
    ...present.map((b) => {
      const row = rows.find((r) => r.workload === w && r.backend === b);
      return row === undefined ? '-' : `${fmt(row.ratio, 2)}x`;
    }),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...body.map(line)].join('\n');
}

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
}

/** Top functions by self time from the .cpuprofile files Node wrote into `dir`. */
export async function summarizeProfiles(dir: string, topCount = 20): Promise<string> {
  const files = (await readdir(dir)).filter((f) => f.endsWith('.cpuprofile'));
  if (files.length === 0) return `no .cpuprofile in ${dir} (did the CLI exit cleanly on SIGTERM?)`;
  const self = new Map<string, number>();
  let total = 0;
  for (const f of files) {
    const prof = JSON.parse(await readFile(join(dir, f), 'utf8')) as { nodes: ProfileNode[]; samples: number[]; timeDeltas: number[] };
    const byId = new Map(prof.nodes.map((n) => [n.id, n]));
    prof.samples.forEach((id, i) => {
      const n = byId.get(id)!;
      const url = n.callFrame.url.replace(/^file:\/\/.*\/(packages|node_modules)\//, '$1/');
      const name = n.callFrame.functionName || '(anonymous)';
      const key = url ? `${name} ${url}:${n.callFrame.lineNumber + 1}` : name;
      const dt = prof.timeDeltas[i] ?? 0;
      self.set(key, (self.get(key) ?? 0) + dt);
      total += dt;
    });
  }
  // Idle is time the main thread waited (on sockets or the libuv pool): shown apart, so the percentages
  // say where the busy time goes.
  const idle = self.get('(idle)') ?? 0;
  self.delete('(idle)');
  const busy = total - idle;
  const top = [...self.entries()].sort((a, b) => b[1] - a[1]).slice(0, topCount);
  return [
    `CPU profile of nbd-server-js (${files.length} file(s)): ${fmt(total / 1000)} ms sampled, ${fmt(idle / 1000)} ms idle, ${fmt(busy / 1000)} ms busy; top ${topCount} by self time, % of busy:`,
    ...top.map(([k, us]) => `${fmt((100 * us) / busy, 1).padStart(5)}%  ${fmt(us / 1000).padStart(7)} ms  ${k}`),
  ].join('\n');
}

/** The first line a command prints, or `unknown` when it cannot run. */
function versionOf(command: string, args: string[]): Promise<string> {
  return new Promise((done) => {
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'ignore'] });
    let out = '';
    child.stdout!.setEncoding('utf8').on('data', (chunk: string) => {
      out += chunk;
    });
    child.once('error', () => done('unknown'));
    child.once('close', () => done(out.split('\n')[0]?.trim() || 'unknown'));
  });
}

/** What the figures were measured on: they mean nothing without it. */
async function machineLine(): Promise<string> {
  const [fio, nbdkit] = await Promise.all([versionOf('fio', ['--version']), versionOf('nbdkit', ['--version'])]);
  return (
    `${cpus().length} CPUs (${cpus()[0]?.model.trim() ?? 'unknown'}), ${(totalmem() / 2 ** 30).toFixed(1)} GiB RAM, ` +
    `Linux ${release()}, Node ${process.version}, ${fio}, ${nbdkit}`
  );
}

export async function main(argv: string[]): Promise<number> {
  const o = parseOptions(argv);
  const dir = await mkdtemp(join(tmpdir(), 'nbd-bench-'));
  const onSignal = () => {
    void stopAll().then(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  const rows: Row[] = [];
  try {
    if (o.profileDir) await mkdir(o.profileDir, { recursive: true });
    for (const backend of o.backends) {
      let ours: Server;
      let theirs: Server;
      if (backend === 'file') {
        const oursFile = join(dir, 'ours.img');
        const theirFile = join(dir, 'nbdkit.img');
        // Both files are copies of one seed: how a file was written changes how fast it takes writes
        // (page-cache folio sizes), so the two servers must start from files made the same way.
        const seedFile = join(dir, 'seed.img');
        await writeDataFile(seedFile, o.sizeBytes);
        await copyFile(seedFile, oursFile);
        await copyFile(seedFile, theirFile);
        await rm(seedFile);
        ours = await startOurs({ file: oursFile }, o.profileDir);
        theirs = await startNbdkit({ file: theirFile }, dir);
      } else {
        ours =
          backend === 'memory'
            ? await startOurs({ memory: o.sizeBytes }, o.profileDir)
            : await startGannet(o.sizeBytes, dir, backend === 'gannet' ? 'secondary' : 'primary');
        theirs = await startNbdkit({ memory: o.sizeBytes }, dir);
        await prefill(ours.uri, o, dir);
        await prefill(theirs.uri, o, dir);
      }
      try {
        for (const [i, w] of workloads.entries()) {
          if (o.only && !o.only.test(w.name)) continue;
          // Alternate who goes first, so slow drift (page cache, thermal) does not favour one side.
          let a: Measurement;
          let b: Measurement;
          if (i % 2 === 0) {
            a = await fioMeasure(ours, w, o, dir);
            b = await fioMeasure(theirs, w, o, dir);
          } else {
            b = await fioMeasure(theirs, w, o, dir);
            a = await fioMeasure(ours, w, o, dir);
          }
          const row: Row = { row: `${backend} ${w.name}`, backend, workload: w.name, ours: a, nbdkit: b, ratio: a.iops / b.iops };
          rows.push(row);
          process.stderr.write(`nbd-bench: ${row.row}: ours ${fmt(a.iops)} IOPS, nbdkit ${fmt(b.iops)} IOPS (${fmt(row.ratio, 2)}x)\n`);
        }
      } finally {
        await Promise.all([ours.stop(), theirs.stop()]);
      }
    }
  } finally {
    await stopAll();
    await rm(dir, { recursive: true, force: true });
    process.removeListener('SIGINT', onSignal);
    process.removeListener('SIGTERM', onSignal);
  }
  const generatedAt = new Date().toISOString();
  const machine = await machineLine();
  process.stdout.write(
    `nbd-bench: ${generatedAt}, ${machine}\n` +
      `fio nbd engine, runtime ${o.runtimeS} s (+${o.rampS} s ramp) per row, size ${o.sizeBytes / MiB} MiB, ratio = ours IOPS / nbdkit IOPS\n`,
  );
  process.stdout.write(`${formatTable(rows)}\n\n${formatRatios(rows)}\n`);
  if (o.jsonPath) {
    await writeFile(o.jsonPath, `${JSON.stringify({ generatedAt, machine, runtimeS: o.runtimeS, rampS: o.rampS, sizeBytes: o.sizeBytes, rows }, null, 2)}\n`);
  }
  if (o.profileDir) process.stdout.write(`${await summarizeProfiles(o.profileDir)}\n`);
  return 0;
}

const invokedDirectly = process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url);
if (invokedDirectly) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    async (err: unknown) => {
      await stopAll();
      process.stderr.write(`nbd-bench: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
      process.exit(1);
    },
  );
}
