import { spawn } from 'node:child_process';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { KiB, MiB } from '@gannet/block-device';

/**
 * The harness's view of a gannet daemon: start one as a child process (free ports, a config file that
 * picks the strategy per volume) or attach to a running one; call its control API; follow its event
 * stream; sample its RSS.
 */

/** How long a started daemon gets to print `gannet ready`. */
export const daemonReadyTimeoutMs = 30_000;
/** How long a daemon gets to exit after SIGTERM before SIGKILL. */
export const daemonStopGraceMs = 10_000;
/** Control API calls (a checkpoint included) taking longer than this fail the run. */
export const controlTimeoutMs = 60_000;
/** Output kept from the daemon, for error messages. */
const outputBytesMax = 256 * KiB;
/** The event stream's buffered partial frame, at most. */
const sseFrameBytesMax = MiB;

export const readyLine = 'gannet ready';
/** The `gannet` executable of the @gannet/server package this harness depends on. */
export const defaultGannetBin = join(dirname(createRequire(import.meta.url).resolve('@gannet/server/package.json')), 'bin', 'gannet.js');

export type StrategyName = 'gannet' | 'colo' | 'passthrough';

export interface VolumeInfo {
  readonly name: string;
  readonly strategy: string;
  readonly sizeBytes: number;
  readonly uris: { readonly primary: readonly string[]; readonly secondary: readonly string[] };
}

export interface NbdTarget {
  readonly host: string;
  readonly port: number;
  readonly exportName: string;
}

/** nbd://HOST:PORT/EXPORT (the export name URI-encoded, '/' as %2F or literal). */
export function parseNbdUri(uri: string): NbdTarget {
  const url = new URL(uri);
  if (url.protocol !== 'nbd:') throw new Error(`not an nbd:// URI: ${uri}`);
  const host = url.hostname.replace(/^\[|\]$/g, '');
  return { host, port: Number(url.port || 10809), exportName: decodeURIComponent(url.pathname.slice(1)) };
}

export class ControlClient {
  readonly baseUrl: string;
  private readonly token: string;

  constructor(baseUrl: string, token: string) {
    this.baseUrl = baseUrl.replace(/\/+$/, '');
    this.token = token;
  }

  async call<T>(method: 'GET' | 'POST', path: string, body?: unknown): Promise<T> {
    const response = await fetch(`${this.baseUrl}${path}`, {
      method,
      headers: { authorization: `Bearer ${this.token}`, ...(body !== undefined && { 'content-type': 'application/json' }) },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(controlTimeoutMs),
    });
    const text = await response.text();
    if (!response.ok) throw new Error(`${method} ${path}: HTTP ${response.status}: ${text.trim()}`);
    return JSON.parse(text) as T;
  }

  async volumes(): Promise<VolumeInfo[]> {
    return (await this.call<{ volumes: VolumeInfo[] }>('GET', '/v1/volumes')).volumes;
  }

  /** Returns the new epoch and the request's round-trip time (the pause the replicator sees). */
  async checkpoint(volume: string): Promise<{ epoch: number; ms: number }> {
    const t0 = performance.now();
    const { epoch } = await this.call<{ epoch: number }>('POST', `/v1/volumes/${encodeURIComponent(volume)}/checkpoint`, {});
    return { epoch, ms: performance.now() - t0 };
  }

  /** Follows /v1/events (SSE) until `signal` aborts; calls `onEvent` per frame with its JSON data. */
  async followEvents(
    volume: string | undefined,
    onEvent: (event: string, data: Record<string, unknown>) => void,
    signal: AbortSignal,
  ): Promise<void> {
    const query = volume === undefined ? '' : `?volume=${encodeURIComponent(volume)}`;
    const response = await fetch(`${this.baseUrl}/v1/events${query}`, { headers: { authorization: `Bearer ${this.token}` }, signal });
    if (!response.ok || response.body === null) throw new Error(`GET /v1/events: HTTP ${response.status}`);
    const decoder = new TextDecoder();
    let pending = '';
    try {
      for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
        pending += decoder.decode(chunk, { stream: true });
        if (pending.length > sseFrameBytesMax) throw new Error('event stream: frame larger than the limit');
        let end: number;
        while ((end = pending.indexOf('\n\n')) >= 0) {
          const frame = pending.slice(0, end);
          pending = pending.slice(end + 2);
          let event = 'message';
          let data = '';
          for (const line of frame.split('\n')) {
            if (line.startsWith('event:')) event = line.slice(6).trim();
            else if (line.startsWith('data:')) data += line.slice(5).trim();
          }
          if (data !== '') onEvent(event, JSON.parse(data) as Record<string, unknown>);
        }
      }
    } catch (error) {
      if (!signal.aborted) throw error;
    }
  }
}

export interface DaemonVolumeSpec {
  readonly name: string;
  /** The secondary role's buffering strategy; a primary daemon's volumes have none. */
  readonly strategy?: StrategyName;
  readonly sizeBytes: number;
  /** A primary daemon's volumes: when the VM hears back (the daemon's default when left out). */
  readonly ackMode?: AckMode;
}

export type AckMode = 'peer' | 'local';

/** A volume of a daemon in the primary role, as GET /v1/volumes shows it. */
export interface PrimaryVolumeInfo {
  readonly name: string;
  readonly state: string;
  readonly link?: { readonly state: string; readonly error?: string };
  readonly uris: { readonly disk: readonly string[] };
}

/** A secondary daemon a primary daemon replicates to: its control API (HOST:PORT) and token file. */
export interface PeerSpec {
  readonly control: string;
  readonly tokenFile: string;
}

export interface StartedDaemon {
  readonly pid: number;
  readonly control: ControlClient;
  readonly dataDir: string;
  /** The tail of its stderr (its log), for error messages. */
  stderr(): string;
  stop(): Promise<void>;
}

/**
 * Starts `gannet serve` with a config file holding one volume per spec, on free loopback ports, and
 * resolves once it prints `gannet ready`. Fails with the daemon's output if it exits or times out first.
 */
export async function startDaemon(options: {
  readonly dataDir: string;
  readonly volumes: readonly DaemonVolumeSpec[];
  readonly gannetBin?: string;
  /** Starts a daemon in the primary role, replicating every volume to this peer. */
  readonly peer?: PeerSpec;
}): Promise<StartedDaemon> {
  await mkdir(options.dataDir, { recursive: true });
  const configFile = join(options.dataDir, 'bench-config.json');
  const config = {
    dataDir: options.dataDir,
    logLevel: 'warn',
    nbd: { listen: '127.0.0.1:0' },
    control: { listen: '127.0.0.1:0' },
    ...(options.peer !== undefined && { role: 'primary', peer: options.peer }),
    volumes: Object.fromEntries(options.volumes.map((v) => [
        v.name,
        { sizeBytes: v.sizeBytes, ...(v.strategy !== undefined && { strategy: v.strategy }), ...(v.ackMode !== undefined && { ackMode: v.ackMode }) },
      ])),
  };
  await writeFile(configFile, `${JSON.stringify(config, null, 2)}\n`);
  const child = spawn(process.execPath, [options.gannetBin ?? defaultGannetBin, 'serve', '--config', configFile], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  const keep = (acc: string, chunk: string) => (acc + chunk).slice(-outputBytesMax);
  child.stdout!.setEncoding('utf8');
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (chunk: string) => {
    err = keep(err, chunk);
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  let hasExited = false;
  void exited.then(() => {
    hasExited = true;
  });

  const stop = async (): Promise<void> => {
    if (hasExited) return;
    child.kill('SIGTERM');
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      exited,
      new Promise<void>((resolve) => {
        timer = setTimeout(() => {
          if (!hasExited) child.kill('SIGKILL');
          resolve();
        }, daemonStopGraceMs);
      }),
    ]);
    clearTimeout(timer);
    await exited;
  };

  const controlUrl = await new Promise<string>((resolve, reject) => {
    let url: string | undefined;
    let pending = '';
    const fail = (why: string) => {
      clearTimeout(timer);
      void stop().then(() => reject(new Error(`gannet serve: ${why}\n--- stdout\n${out}\n--- stderr\n${err}`)));
    };
    const timer = setTimeout(() => fail(`not ready within ${daemonReadyTimeoutMs} ms`), daemonReadyTimeoutMs);
    child.once('error', (e: Error) => fail(`cannot start: ${e.message}`));
    void exited.then(() => fail(`exited (code ${child.exitCode}, signal ${child.signalCode}) before it was ready`));
    child.stdout!.on('data', (chunk: string) => {
      out = keep(out, chunk);
      pending += chunk;
      let nl: number;
      while ((nl = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        const control = /^control:\s+(http:\/\/\S+)/.exec(line);
        if (control && url === undefined) url = control[1];
        if (line.trim() === readyLine) {
          clearTimeout(timer);
          if (url === undefined) fail('printed no `control: http://...` line');
          else resolve(url);
        }
      }
    });
  });
  const token = (await readFile(join(options.dataDir, 'control.token'), 'utf8')).trim();
  return { pid: child.pid!, control: new ControlClient(controlUrl, token), dataDir: options.dataDir, stderr: () => err, stop };
}

/** The control API's HOST:PORT, as a primary daemon's peer.control wants it. */
export function controlAddress(control: ControlClient): string {
  return new URL(control.baseUrl).host;
}

/** Linux's USER_HZ, the unit of /proc/PID/stat's CPU times (100 on every architecture Node runs on). */
const clockTicksPerSecond = 100;

/** CPU seconds (user + system) a Linux process has used, or undefined if it cannot be read. */
export async function cpuSeconds(pid: number): Promise<number | undefined> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may hold spaces and parentheses: count fields after its closing one.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / clockTicksPerSecond;
  } catch {
    return undefined;
  }
}

/** VmRSS of a Linux process in bytes, or undefined if it cannot be read (not Linux, process gone). */
export async function rssBytes(pid: number): Promise<number | undefined> {
  try {
    const status = await readFile(`/proc/${pid}/status`, 'utf8');
    const match = /^VmRSS:\s+(\d+)\s+kB$/m.exec(status);
    return match ? Number(match[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}
