/**
 * A real qemu-system-x86_64 for tests, with QMP on a unix socket and the serial console on stdio.
 *
 * The test listens on the QMP socket and QEMU connects to it (a client chardev), so nothing polls for a
 * socket to appear. Every QEMU started here is tracked by its pid until it has exited; `stopAllQemu()`
 * (afterAll) kills what is left. Each wait has a bound and fails with the console and stderr.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { requireTool } from './process.js';

/** How long QEMU gets to connect to the QMP socket, and a QMP command to answer. */
export const qmpTimeoutMs = 20_000;
/** Console and stderr kept per QEMU, so a chatty guest cannot grow the test's memory without bound. */
const outputCharsMax = 4 * 1024 * 1024;

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
}

interface Pending {
  resolve(value: unknown): void;
  reject(error: Error): void;
}

/** A QMP connection: commands answered in order, events collected. */
export class Qmp {
  readonly events: QmpEvent[] = [];
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private closedWith: Error | undefined;
  private greet!: () => void;
  /** Resolves on QEMU's greeting, the first line of a QMP session. */
  readonly greeted = new Promise<void>((resolve) => {
    this.greet = resolve;
  });

  constructor(
    private readonly socket: Socket,
    private readonly describe: () => string,
  ) {
    // readline re-emits the socket's errors; QEMU resets the connection when it quits.
    createInterface({ input: socket })
      .on('line', (line) => this.receive(line))
      .on('error', (error) => this.fail(error));
    socket.on('close', () => this.fail(new Error('QMP connection closed')));
  }

  private receive(line: string): void {
    const message = JSON.parse(line) as { QMP?: unknown; id?: number; event?: string; return?: unknown; error?: { class: string; desc: string } };
    if (message.QMP !== undefined) {
      this.greet();
      return;
    }
    if (message.event !== undefined) {
      this.events.push(message as QmpEvent);
      return;
    }
    if (message.id === undefined) return;
    const pending = this.pending.get(message.id);
    if (pending === undefined) return;
    this.pending.delete(message.id);
    if (message.error !== undefined) pending.reject(new Error(`QMP error ${message.error.class}: ${message.error.desc}`));
    else pending.resolve(message.return);
  }

  private fail(error: Error): void {
    this.closedWith ??= error;
    for (const pending of this.pending.values()) pending.reject(new Error(`QMP: ${error.message}\n${this.describe()}`));
    this.pending.clear();
  }

  /** Sends one command (a QMP JSON object) and resolves with its `return`, rejecting on `error`. */
  execute(command: { execute: string; arguments?: unknown }): Promise<unknown> {
    if (this.closedWith !== undefined) return Promise.reject(new Error(`QMP ${command.execute}: ${this.closedWith.message}\n${this.describe()}`));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`QMP ${command.execute}: no answer within ${qmpTimeoutMs} ms\n${this.describe()}`));
      }, qmpTimeoutMs);
      this.pending.set(id, {
        resolve: (value) => {
          clearTimeout(timer);
          resolve(value);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      });
      this.socket.write(`${JSON.stringify({ ...command, id })}\n`);
    });
  }

  /** An HMP command through `human-monitor-command`; resolves with its output (HMP reports errors there). */
  async hmp(commandLine: string): Promise<string> {
    const output = await this.execute({ execute: 'human-monitor-command', arguments: { 'command-line': commandLine } });
    return output as string;
  }
}

export interface Qemu {
  readonly child: ChildProcess;
  readonly pid: number;
  readonly qmp: Qmp;
  /** Everything on QEMU's stdout so far (the serial port on stdio, if any), and its stderr. */
  console(): string;
  stderr(): string;
  /**
   * Resolves with the first console line, after the ones already matched, that matches `pattern`;
   * rejects after `timeoutMs` or when QEMU exits first.
   */
  waitForLine(pattern: RegExp, timeoutMs: number): Promise<RegExpExecArray>;
  /** Types a line on the serial console. */
  typeLine(text: string): void;
  readonly exited: Promise<Exit>;
  /** Resolves with QEMU's exit, or rejects after `timeoutMs`. */
  waitExit(timeoutMs: number): Promise<Exit>;
  /** SIGKILL by pid, then wait for the exit. */
  kill(): Promise<Exit>;
}

const running = new Map<number, Promise<Exit>>();

function killPid(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch (error) {
    // Exited after the check and before the kill: its 'close' is on the way.
    if ((error as NodeJS.ErrnoException).code !== 'ESRCH') throw error;
  }
}

function bounded(text: string): string {
  return text.length > outputCharsMax ? text.slice(text.length - outputCharsMax) : text;
}

export interface QemuOptions {
  /** Files QEMU writes (a serial port sent to a file, say) whose end goes into failure messages. */
  logFiles?: readonly string[];
}

function tail(file: string): string {
  try {
    return readFileSync(file, 'utf8').slice(-4000);
  } catch (error) {
    return (error as Error).message;
  }
}

/**
 * Starts qemu-system-x86_64 with `args` plus a QMP client chardev on `dir/qmp.sock`, and resolves once
 * QMP has greeted and accepted qmp_capabilities.
 */
export async function startQemu(args: readonly string[], dir: string, options: QemuOptions = {}): Promise<Qemu> {
  const qemuPath = requireTool('qemu-system-x86_64');
  const socketPath = join(dir, 'qmp.sock');
  const server = createServer();
  const connected = new Promise<Socket>((resolve) => server.once('connection', resolve));
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(socketPath, resolve);
  });

  const child = spawn(
    qemuPath,
    [...args, '-chardev', `socket,id=gannet-qmp,path=${socketPath}`, '-mon', 'chardev=gannet-qmp,mode=control'],
    { stdio: ['pipe', 'pipe', 'pipe'] },
  );
  if (child.pid === undefined) {
    server.close();
    throw new Error(`${qemuPath}: could not be started`);
  }
  const pid = child.pid;
  // 'close', not 'exit': the last console lines are read by then.
  const exited = new Promise<Exit>((resolve) => child.once('close', (code, signal) => resolve({ code, signal })));
  running.set(pid, exited);
  void exited.then(() => running.delete(pid));

  let consoleText = '';
  let stderrText = '';
  const lines: string[] = [];
  let matched = 0;
  const lineListeners = new Set<() => void>();
  child.stderr!.setEncoding('utf8').on('data', (chunk: string) => {
    stderrText = bounded(stderrText + chunk);
  });
  child.stdout!.setEncoding('utf8').on('data', (chunk: string) => {
    consoleText = bounded(consoleText + chunk);
  });
  createInterface({ input: child.stdout! })
    .on('line', (line) => {
      lines.push(line.replace(/\r$/, ''));
      for (const listener of [...lineListeners]) listener();
    })
    .on('error', () => undefined);
  // A guest that has powered off no longer reads its console; what was typed is then dropped.
  child.stdin!.on('error', () => undefined);

  const describe = () =>
    [
      `--- stdout (last 4000 chars)\n${consoleText.slice(-4000)}`,
      `--- stderr\n${stderrText.slice(-4000)}`,
      ...(options.logFiles ?? []).map((file) => `--- ${file} (last 4000 chars)\n${tail(file)}`),
    ].join('\n');
  const withBound = <T>(promise: Promise<T>, ms: number, what: string): Promise<T> => {
    let timer: NodeJS.Timeout;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms\n${describe()}`)), ms);
    });
    return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
  };
  const exitedEarly = (what: string) =>
    exited.then((exit) => {
      throw new Error(`${what}: QEMU exited first (${exit.code ?? exit.signal})\n${describe()}`);
    });

  let socket: Socket;
  try {
    socket = await withBound(Promise.race([connected, exitedEarly('QMP connection')]), qmpTimeoutMs, 'QMP connection');
  } catch (error) {
    child.kill('SIGKILL');
    await exited;
    throw error;
  } finally {
    server.close();
  }
  const qmp = new Qmp(socket, describe);
  await withBound(Promise.race([qmp.greeted, exitedEarly('QMP greeting')]), qmpTimeoutMs, 'QMP greeting');
  await qmp.execute({ execute: 'qmp_capabilities' });

  const handle: Qemu = {
    child,
    pid,
    qmp,
    console: () => consoleText,
    stderr: () => stderrText,
    waitForLine(pattern, timeoutMs) {
      const found = new Promise<RegExpExecArray>((resolve) => {
        const check = () => {
          for (; matched < lines.length; matched++) {
            const match = pattern.exec(lines[matched]);
            if (match) {
              matched++;
              lineListeners.delete(check);
              resolve(match);
              return;
            }
          }
        };
        lineListeners.add(check);
        check();
      });
      return withBound(Promise.race([found, exitedEarly(`console line ${pattern}`)]), timeoutMs, `console line ${pattern}`);
    },
    typeLine(text) {
      child.stdin!.write(`${text}\n`);
    },
    exited,
    waitExit: (timeoutMs) => withBound(exited, timeoutMs, 'QEMU exit'),
    async kill() {
      if (running.has(pid)) killPid(pid);
      return exited;
    },
  };
  return handle;
}

/** Kills (by pid) every QEMU started here that is still running. For afterAll/afterEach. */
export async function stopAllQemu(): Promise<void> {
  const left = [...running];
  for (const [pid] of left) killPid(pid);
  await Promise.all(left.map(([, exited]) => exited));
}
