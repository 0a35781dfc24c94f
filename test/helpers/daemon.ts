import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { requireTool } from './process.js';

/**
 * Runs the real `gannet` daemon (packages/server/bin/gannet.js, from dist: build first) as a child
 * process on free loopback ports, waits for its `gannet ready` line and parses the addresses it printed.
 * Every process started here is tracked so `stopAll()` (afterEach) leaves none behind.
 */

export const repoRoot = fileURLToPath(new URL('../..', import.meta.url));
export const gannetBin = join(repoRoot, 'packages/server/bin/gannet.js');
export const readyTimeoutMs = 30_000;
export const stopTimeoutMs = 30_000;
export const commandTimeoutMs = 30_000;

export interface Address {
  host: string;
  port: number;
}

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface DaemonHandle {
  readonly child: ChildProcess;
  readonly pid: number;
  readonly dataDir: string;
  readonly nbd: Address;
  readonly control: Address;
  readonly controlUrl: string;
  readonly token: string;
  readonly stdoutLines: string[];
  stderr(): string;
  /** Resolves with the first stderr log line (JSON, pino) that `match` accepts, seen from now on or already. */
  logLine(match: (line: Record<string, unknown>) => boolean, timeoutMs?: number): Promise<Record<string, unknown>>;
  readonly exited: Promise<Exit>;
  /** Sends `signal` (SIGTERM by default) and waits for the exit. */
  stop(signal?: NodeJS.Signals): Promise<Exit>;
}

const running = new Set<ChildProcess>();
const temporaryDirs = new Set<string>();
/**
 * Run by stopAll: `beforeKill` ones first (resuming a paused file system, which a process blocked on it
 * needs to die), the others once the processes are gone and before the temporary directories go
 * (unmounting); last registered, first run.
 */
const cleanups: { run: () => Promise<void>; beforeKill: boolean }[] = [];

export function onCleanup(run: () => Promise<void>, options: { beforeKill?: boolean } = {}): void {
  cleanups.push({ run, beforeKill: options.beforeKill ?? false });
}

async function runCleanups(beforeKill: boolean): Promise<void> {
  const due = cleanups.filter((cleanup) => cleanup.beforeKill === beforeKill).reverse();
  for (const cleanup of due) cleanups.splice(cleanups.indexOf(cleanup), 1);
  for (const cleanup of due) await cleanup.run();
}

export const logLineTimeoutMs = 20_000;

export { requireTool } from './process.js';

export async function makeTempDir(prefix = 'gannet-test-'): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  temporaryDirs.add(dir);
  return dir;
}

function waitExit(child: ChildProcess): Promise<Exit> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve({ code: child.exitCode, signal: child.signalCode });
    else child.once('exit', (code, signal) => resolve({ code, signal }));
  });
}

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no result within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export interface StartOptions {
  dataDir?: string;
  /** Extra arguments after `serve`; defaults give free loopback ports and one 64 MiB volume. */
  args?: string[];
  volumes?: string[];
  /** A command the daemon runs under, e.g. `['prlimit', '--nofile=1024:4096', '--']` (it must exec it, keeping the pid). */
  wrapper?: string[];
  /** Options for node itself, before the script (`--import` a test preload, say). */
  nodeArgs?: string[];
  /** Added to the environment the daemon inherits. */
  env?: Record<string, string>;
}

export async function startDaemon(options: StartOptions = {}): Promise<DaemonHandle> {
  const dataDir = options.dataDir ?? (await makeTempDir());
  const volumes = options.volumes ?? ['vol0:64M'];
  const args = [
    gannetBin,
    'serve',
    '--data-dir',
    dataDir,
    '--nbd',
    '127.0.0.1:0',
    '--control',
    '127.0.0.1:0',
    '--log-level',
    'warn',
    ...volumes.flatMap((volume) => ['--volume', volume]),
    ...(options.args ?? []),
  ];
  const [command, ...prefix] = [...(options.wrapper ?? []), process.execPath, ...(options.nodeArgs ?? [])];
  const child = spawn(command, [...prefix, ...args], { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...options.env } });
  running.add(child);
  const exited = waitExit(child).finally(() => running.delete(child));
  let stderr = '';
  const logWaiters = new Set<(line: string) => void>();
  createInterface({ input: child.stderr! }).on('line', (line) => {
    stderr += `${line}\n`;
    for (const waiter of logWaiters) waiter(line);
  });
  const parseLog = (line: string): Record<string, unknown> | undefined => {
    try {
      return JSON.parse(line) as Record<string, unknown>;
    } catch {
      return undefined;
    }
  };
  const logLine = (match: (line: Record<string, unknown>) => boolean, timeoutMs = logLineTimeoutMs) => {
    for (const line of stderr.split('\n')) {
      const parsed = parseLog(line);
      if (parsed !== undefined && match(parsed)) return Promise.resolve(parsed);
    }
    let waiter!: (line: string) => void;
    const found = new Promise<Record<string, unknown>>((resolve) => {
      waiter = (line) => {
        const parsed = parseLog(line);
        if (parsed !== undefined && match(parsed)) resolve(parsed);
      };
      logWaiters.add(waiter);
    });
    return withTimeout(found, timeoutMs, 'daemon log line').finally(() => logWaiters.delete(waiter));
  };
  const stdoutLines: string[] = [];
  const lines = createInterface({ input: child.stdout! });
  const ready = new Promise<void>((resolve, reject) => {
    lines.on('line', (line) => {
      stdoutLines.push(line);
      if (line === 'gannet ready') resolve();
    });
    exited.then((exit) =>
      reject(new Error(`gannet serve exited (${exit.code ?? exit.signal}) before ready:\n${stdoutLines.join('\n')}\n${stderr}`)),
    );
  });
  try {
    await withTimeout(ready, readyTimeoutMs, 'gannet serve ready');
  } catch (error) {
    child.kill('SIGKILL');
    await exited;
    throw error;
  }
  const find = (pattern: RegExp): Address => {
    for (const line of stdoutLines) {
      const match = pattern.exec(line);
      if (match) return { host: match[1], port: Number(match[2]) };
    }
    throw new Error(`no line matching ${pattern} in:\n${stdoutLines.join('\n')}`);
  };
  const nbd = find(/^nbd: ([\d.]+):(\d+)$/);
  const control = find(/^control: http:\/\/([\d.]+):(\d+) /);
  const token = (await readFile(join(dataDir, 'control.token'), 'utf8')).trim();
  return {
    child,
    pid: child.pid!,
    logLine,
    dataDir,
    nbd,
    control,
    controlUrl: `http://${control.host}:${control.port}`,
    token,
    stdoutLines,
    stderr: () => stderr,
    exited,
    async stop(signal: NodeJS.Signals = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return withTimeout(exited, stopTimeoutMs, `gannet serve exit after ${signal}`);
    },
  };
}

/**
 * Kills whatever is still running, runs the registered cleanups (unmounting what tests mounted inside
 * temporary directories) and removes the temporary directories; call from afterEach/afterAll.
 */
export async function stopAll(): Promise<void> {
  await runCleanups(true);
  const children = [...running];
  for (const child of children) child.kill('SIGKILL');
  await Promise.all(children.map(waitExit));
  await runCleanups(false);
  for (const dir of temporaryDirs) await rm(dir, { recursive: true, force: true });
  temporaryDirs.clear();
}

export interface RunResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a program to completion; never throws on a non-zero exit (tests assert on `status`). */
export function run(file: string, args: string[], options: { cwd?: string } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      file,
      args,
      { cwd: options.cwd ?? repoRoot, timeout: commandTimeoutMs, maxBuffer: 64 * 1024 * 1024, encoding: 'utf8' },
      (error, stdout, stderr) => {
        if (error && typeof error.code !== 'number') {
          reject(new Error(`${file} ${args.join(' ')}: ${error.message}\n${stderr}`));
          return;
        }
        resolve({ status: child.exitCode, stdout, stderr });
      },
    );
  });
}

/** `gannet ARGS...` (the CLI, from dist). */
export function gannet(args: string[]): Promise<RunResult> {
  return run(process.execPath, [gannetBin, ...args]);
}

/** The CLI's client flags that reach `daemon`. */
export function clientFlags(daemon: DaemonHandle): string[] {
  return ['--control', `${daemon.control.host}:${daemon.control.port}`, '--data-dir', daemon.dataDir];
}

/** qemu-io on one export, with the same nbd driver options the daemon prints for QEMU. */
export function qemuIo(daemon: DaemonHandle, exportName: string, commands: string[]): Promise<RunResult> {
  const qemuIoPath = requireTool('qemu-io');
  const image =
    `driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=${daemon.nbd.host},` +
    `file.server.port=${daemon.nbd.port},file.export=${exportName}`;
  return run(qemuIoPath, ['--image-opts', image, ...commands.flatMap((command) => ['-c', command])]);
}

/** Asserts a qemu-io run did every command without error (qemu-io reports some failures only in output). */
export function assertQemuOk(result: RunResult, what: string): void {
  const text = result.stdout + result.stderr;
  if (result.status !== 0 || /fail|error|mismatch/i.test(text)) {
    throw new Error(`${what}: qemu-io status ${result.status}\n${text}`);
  }
}

/** The NBD URI of one of the daemon's exports, as libnbd tools take it. */
export function exportUri(daemon: DaemonHandle, exportName: string): string {
  return `nbd://${daemon.nbd.host}:${daemon.nbd.port}/${encodeURIComponent(exportName)}`;
}

/** The export names `nbdinfo --list` shows. */
export async function listedExports(daemon: DaemonHandle): Promise<string[]> {
  const listed = await run(requireTool('nbdinfo'), ['--list', '--json', `nbd://${daemon.nbd.host}:${daemon.nbd.port}`]);
  if (listed.status !== 0) throw new Error(`nbdinfo --list: status ${listed.status}\n${listed.stderr}`);
  return (JSON.parse(listed.stdout) as { exports: { 'export-name': string }[] }).exports.map((entry) => entry['export-name']).sort();
}

/** An authorised request to the control API. */
export async function api(daemon: DaemonHandle, method: string, path: string, body?: unknown, token = daemon.token) {
  const response = await fetch(`${daemon.controlUrl}${path}`, {
    method,
    headers: {
      ...(token !== '' && { authorization: `Bearer ${token}` }),
      ...(body !== undefined && { 'content-type': 'application/json' }),
    },
    body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await response.text();
  let json: any;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: response.status, json, text, headers: response.headers };
}

export interface PrintedQemuLines {
  /** The PVM's `-drive` value (after `-drive `), PVM_IMAGE still in it. */
  primaryDrive: string;
  /** The QMP commands for the PVM's monitor, in order. */
  primaryQmp: { execute: string; arguments?: Record<string, unknown> }[];
  /** The SVM's `-drive` value. */
  secondaryDrive: string;
}

/** The QEMU lines the daemon printed at startup for `volume` (for its first NBD address). */
export function printedQemuLines(daemon: DaemonHandle, volume: string): PrintedQemuLines {
  const lines = daemon.stdoutLines.map((line) => line.trim());
  const block = lines.findIndex((line) => line.startsWith(`volume ${volume}:`));
  const at = (prefix: string) => lines.findIndex((line, index) => index > block && line.startsWith(prefix));
  const primary = at('primary QEMU (PVM)');
  const secondary = at('secondary QEMU (SVM)');
  if (block < 0 || primary < 0 || secondary < 0 || !lines[primary + 1].startsWith('-drive ') || !lines[secondary + 1].startsWith('-drive ')) {
    throw new Error(`no QEMU lines for volume ${volume} in:\n${lines.join('\n')}`);
  }
  const primaryQmp = [];
  for (let i = primary + 2; lines[i].startsWith('{'); i++) primaryQmp.push(JSON.parse(lines[i]));
  return {
    primaryDrive: lines[primary + 1].slice('-drive '.length),
    primaryQmp,
    secondaryDrive: lines[secondary + 1].slice('-drive '.length),
  };
}

/**
 * The config file of a primary daemon replicating volume `vm` to `secondary`: its control API (at
 * `controlHost`, by default the address it listens on) and a copy of its token, with quick reconnects,
 * so that a restarted secondary is found within a fraction of a second instead of the default backoff.
 */
export async function primaryConfig(
  secondary: DaemonHandle,
  options: { volumeBytes: number; peerTimeoutMs?: number; volumeLines?: string[]; controlHost?: string },
): Promise<string> {
  const dir = await makeTempDir();
  const tokenFile = join(dir, 'peer.token');
  await writeFile(tokenFile, `${secondary.token}\n`, { mode: 0o600 });
  const file = join(dir, 'primary.yaml');
  await writeFile(
    file,
    [
      'role: primary',
      `peer: { control: "${options.controlHost ?? secondary.control.host}:${secondary.control.port}", tokenFile: ${tokenFile} }`,
      'volumes:',
      '  vm:',
      `    sizeBytes: ${options.volumeBytes}`,
      '    peerReconnectMs: 50',
      '    peerReconnectMsMax: 250',
      ...(options.peerTimeoutMs === undefined ? [] : [`    peerTimeoutMs: ${options.peerTimeoutMs}`]),
      ...(options.volumeLines ?? []),
      '',
    ].join('\n'),
  );
  return file;
}
