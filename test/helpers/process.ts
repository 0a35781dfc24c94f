/**
 * Process helpers for tests that drive real programs: run a command to completion, start a long-lived
 * one and wait (event-driven) for a line on its stdout, and stop everything that was started. Every
 * started process is tracked until it has exited, so a test file's `afterEach(stopAllProcesses)` leaves
 * nothing behind even when an assertion failed half way.
 */
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { findProgram, packageOf, systemPython } from '../setup/requirements.mjs';

/** How long a started process gets to print the line we wait for. */
export const readyTimeoutMs = 15_000;
/** How long a process gets to exit after SIGTERM before SIGKILL. */
export const stopGraceMs = 5_000;
/** Default limit for a command run to completion; below vitest's 60 s test timeout, so a hung client fails with its output. */
export const commandTimeoutMs = 30_000;
/** Output kept per stream, so a chatty process cannot grow the test's memory without bound. */
export const outputBytesMax = 16 * 1024 * 1024;

const toolPaths = new Map<string, string>();

/**
 * The full path of a program the tests drive, or an error (never a skip) naming its Debian package:
 * interop coverage that silently disappears on a machine without the clients is worse than a red test.
 * `python3-nbd` stands for the libnbd binding of the system Python. `pnpm test` checks all of them
 * first (test/setup/requirements.mjs), so this fails only when a test runs on its own.
 */
export function requireTool(name: string): string {
  const known = toolPaths.get(name);
  if (known !== undefined) return known;
  let path: string | undefined;
  if (name === 'python3-nbd') {
    try {
      execFileSync(systemPython, ['-c', 'import nbd'], { stdio: 'ignore', timeout: 10_000 });
      path = systemPython;
    } catch {
      throw new Error(`python3 module nbd (${systemPython}) is not installed: apt-get install python3-libnbd`);
    }
  } else {
    path = findProgram(name);
    if (path === undefined) throw new Error(`${name} is not installed: apt-get install ${packageOf(name)}`);
  }
  toolPaths.set(name, path);
  return path;
}

export { systemPython };

export interface CommandResult {
  readonly stdout: string;
  readonly stderr: string;
  /** Exit status, or null when killed by a signal. */
  readonly status: number | null;
  readonly signal: NodeJS.Signals | null;
}

export interface RunOptions {
  readonly timeoutMs?: number;
  readonly env?: NodeJS.ProcessEnv;
  readonly cwd?: string;
  readonly input?: string | Buffer;
}

/**
 * Runs a command to completion and captures its output. Never rejects on a non-zero exit (tests assert
 * on `status`); rejects only when the program could not be started. A timeout kills it (SIGKILL) and
 * shows up as `signal`.
 */
export function runCommand(file: string, args: readonly string[], options: RunOptions = {}): Promise<CommandResult> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      file,
      args,
      {
        timeout: options.timeoutMs ?? commandTimeoutMs,
        killSignal: 'SIGKILL',
        maxBuffer: outputBytesMax,
        env: options.env ?? process.env,
        cwd: options.cwd,
        encoding: 'utf8',
      },
      (err, stdout, stderr) => {
        const e = err as (NodeJS.ErrnoException & { code?: unknown; signal?: NodeJS.Signals | null }) | null;
        if (e && typeof e.code === 'string') {
          // A spawn failure (ENOENT and such), not an exit status.
          reject(new Error(`${file}: cannot run: ${e.message}`));
          return;
        }
        resolve({
          stdout,
          stderr,
          status: e ? (typeof e.code === 'number' ? e.code : null) : 0,
          signal: e ? (e.signal ?? null) : null,
        });
      },
    );
    if (options.input !== undefined) child.stdin?.end(options.input);
    else child.stdin?.end();
  });
}

/** Formats a result for assertion messages, so a failed exit status shows why. */
export function describeResult(cmd: string, r: CommandResult): string {
  return `${cmd} exited status=${r.status} signal=${r.signal}\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`;
}

/** Runs a command and throws with its output unless it exits 0. */
export async function runOk(file: string, args: readonly string[], options: RunOptions = {}): Promise<CommandResult> {
  const r = await runCommand(file, args, options);
  if (r.status !== 0) throw new Error(describeResult(`${file} ${args.join(' ')}`, r));
  return r;
}

export interface StartedProcess {
  readonly child: ChildProcess;
  readonly pid: number;
  /** The match of the `ready` pattern on a stdout line. */
  readonly ready: RegExpExecArray;
  stdout(): string;
  stderr(): string;
  /** True while the process has not exited. */
  alive(): boolean;
  /** Resolves with the exit status (or signal name) once the process has exited. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** SIGTERM, wait up to `stopGraceMs`, then SIGKILL. Idempotent. */
  stop(): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const running = new Set<StartedProcess>();

export interface StartOptions {
  /** Pattern matched against each complete stdout line; the process is ready on the first match. */
  readonly ready: RegExp;
  readonly timeoutMs?: number;
  readonly env?: NodeJS.ProcessEnv;
  readonly cwd?: string;
}

function appendBounded(acc: string, chunk: string): string {
  const next = acc + chunk;
  return next.length > outputBytesMax ? next.slice(next.length - outputBytesMax) : next;
}

/**
 * Starts a long-lived process and resolves once a stdout line matches `ready`. Fails with the
 * process's stderr if it exits first or the timeout passes (and then stops it).
 */
export function startProcess(file: string, args: readonly string[], options: StartOptions): Promise<StartedProcess> {
  const child = spawn(file, args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: options.env ?? process.env,
    cwd: options.cwd,
  });
  let out = '';
  let err = '';
  let pending = '';
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
  });
  let exitedFlag = false;
  void exited.then(() => {
    exitedFlag = true;
  });
  child.stdout!.setEncoding('utf8');
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (chunk: string) => {
    err = appendBounded(err, chunk);
  });

  let stopping: Promise<{ code: number | null; signal: NodeJS.Signals | null }> | undefined;
  const stop = (): Promise<{ code: number | null; signal: NodeJS.Signals | null }> => {
    if (stopping) return stopping;
    stopping = (async () => {
      if (!exitedFlag) {
        child.kill('SIGTERM');
        let timer: NodeJS.Timeout | undefined;
        const killed = new Promise<void>((resolve) => {
          timer = setTimeout(() => {
            if (!exitedFlag) child.kill('SIGKILL');
            resolve();
          }, stopGraceMs);
        });
        await Promise.race([exited, killed]);
        clearTimeout(timer);
      }
      const status = await exited;
      running.delete(handle);
      return status;
    })();
    return stopping;
  };

  const handle: StartedProcess = {
    child,
    pid: child.pid ?? -1,
    ready: undefined as unknown as RegExpExecArray,
    stdout: () => out,
    stderr: () => err,
    alive: () => !exitedFlag,
    exited,
    stop,
  };
  running.add(handle);

  const cmdline = `${file} ${args.join(' ')}`;
  return new Promise<StartedProcess>((resolve, reject) => {
    let settled = false;
    const fail = (why: string) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      void stop().then(() => {
        reject(new Error(`${cmdline}: ${why}\n--- stdout\n${out}\n--- stderr\n${err}`));
      });
    };
    const timer = setTimeout(() => fail(`no line matching ${options.ready} within ${options.timeoutMs ?? readyTimeoutMs} ms`), options.timeoutMs ?? readyTimeoutMs);
    child.once('error', (e) => fail(`cannot start: ${e.message}`));
    void exited.then(({ code, signal }) => fail(`exited (code=${code} signal=${signal}) before it was ready`));
    child.stdout!.on('data', (chunk: string) => {
      out = appendBounded(out, chunk);
      if (settled) return;
      pending += chunk;
      let nl: number;
      while ((nl = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        const m = options.ready.exec(line);
        if (m) {
          settled = true;
          clearTimeout(timer);
          (handle as { ready: RegExpExecArray }).ready = m;
          resolve(handle);
          return;
        }
      }
    });
  });
}

/** Stops every process started through this module that is still running. For afterEach/afterAll. */
export async function stopAllProcesses(): Promise<void> {
  await Promise.all([...running].map((p) => p.stop()));
}

/** A port that was free a moment ago, for programs that cannot listen on port 0 and report it. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      if (addr === null || typeof addr === 'string') {
        srv.close();
        reject(new Error('freePort: no TCP address'));
        return;
      }
      srv.close(() => resolve(addr.port));
    });
  });
}

const tmpDirs = new Set<string>();

/** A fresh temporary directory, removed by `removeTmpDirs`. */
export async function makeTmpDir(prefix = 'gannet-test-'): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  tmpDirs.add(dir);
  return dir;
}

export async function removeTmpDirs(): Promise<void> {
  const dirs = [...tmpDirs];
  tmpDirs.clear();
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
}

/** Reads VmRSS of a Linux process, in bytes. */
export async function rssBytes(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const m = /^VmRSS:\s+(\d+)\s+kB$/m.exec(status);
  if (!m) throw new Error(`rssBytes: no VmRSS in /proc/${pid}/status`);
  return Number(m[1]) * 1024;
}
