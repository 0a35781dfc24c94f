import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { resolve as resolvePath } from 'node:path';
import {
  loadPskFile,
  loadServerX509,
  TlsCredentialsError,
  type DroppedEvent,
  type NbdServer,
  type NbdServerTlsOptions,
  type RefusedEvent,
} from 'nbd-server-js';
import type { Logger } from 'pino';
import { Counter, Gauge, type Registry } from 'prom-client';
import { ConfigError, type DaemonConfig, type TlsConfig } from './config.js';

/**
 * What the daemon's NBD server is built with beyond plain settings (TLS credentials, a connection cap
 * that fits the descriptor limit), and what the operator sees of its limits (metrics and log lines).
 *
 * Descriptors. Every NBD connection, control connection, volume file and LevelDB table is one; a
 * daemon that runs out of them answers nothing, not even the control API (a flood of 20,000 idle
 * sockets did exactly that). So the soft limit is raised to the hard limit at start, and the NBD
 * connection cap is kept low enough that NBD clients alone can never take the descriptors the control
 * API (its own cap) and the engine need. Node cannot call setrlimit; `prlimit` from util-linux sets
 * the limit of a running process, ours included, so the daemon runs it once on its own pid.
 */

/** Descriptors set aside for Node itself (event loop, worker threads, stdio, logs) and journal files. */
export const descriptorsBaseReserve = 256;
/** Per volume: backing file, spill files, LevelDB's files (its tables stay few for the small metadata). */
export const descriptorsPerVolume = 64;
/** prlimit runs once at start; it answers in milliseconds. */
export const prlimitTimeoutMs = 10_000;
/** Refusals and drops are logged as a summary at most this often, so a flood does not flood the log. */
export const limitLogIntervalMs = 1_000;

export interface DescriptorLimits {
  readonly soft: number;
  readonly hard: number;
}

/** `Max open files` of /proc/PID/limits (Infinity for unlimited), or null where it cannot be read. */
export async function readDescriptorLimits(pid: number = process.pid): Promise<DescriptorLimits | null> {
  let text: string;
  try {
    text = await readFile(`/proc/${pid}/limits`, 'utf8');
  } catch {
    return null;
  }
  const match = /^Max open files\s+(\S+)\s+(\S+)/m.exec(text);
  if (!match) return null;
  const value = (field: string) => (field === 'unlimited' ? Infinity : Number(field));
  return { soft: value(match[1]), hard: value(match[2]) };
}

function runPrlimit(hard: number): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('prlimit', ['--pid', String(process.pid), `--nofile=${hard}:${hard}`], { timeout: prlimitTimeoutMs }, (error, _stdout, stderr) => {
      if (error) reject(Object.assign(error, { stderr: stderr.trim() }));
      else resolve();
    });
  });
}

/** Raises the soft descriptor limit to the hard one; returns the limits in force afterwards. */
export async function raiseDescriptorLimit(logger: Logger): Promise<DescriptorLimits | null> {
  const before = await readDescriptorLimits();
  if (before === null) {
    logger.warn('cannot read the descriptor limit (/proc/self/limits); NBD connections are capped by configuration only');
    return null;
  }
  if (before.soft >= before.hard || !Number.isFinite(before.hard)) return before;
  try {
    await runPrlimit(before.hard);
  } catch (error) {
    const reason = (error as NodeJS.ErrnoException).code === 'ENOENT' ? 'prlimit (util-linux) is not installed' : (error as Error).message;
    logger.warn({ soft: before.soft, hard: before.hard, reason }, 'cannot raise the descriptor limit; the NBD connection cap is fitted to the soft limit');
    return before;
  }
  const after = (await readDescriptorLimits()) ?? before;
  logger.info({ from: before.soft, to: after.soft }, 'raised the descriptor limit');
  return after;
}

/**
 * The NBD connection cap that fits the descriptor limit beside the control API's connections and the
 * engine's files. Null when nothing would be left for NBD at all.
 */
export function fitNbdConnections(configured: number, limits: DescriptorLimits | null, controlConnectionsMax: number, volumes: number): number | null {
  if (limits === null || !Number.isFinite(limits.soft)) return configured;
  const reserve = descriptorsBaseReserve + controlConnectionsMax + descriptorsPerVolume * volumes;
  const available = limits.soft - reserve;
  if (available < 1) return null;
  return Math.min(configured, available);
}

/** The TLS credentials the config names, read now so that a bad file stops the start with its name. */
export async function loadNbdTls(tls: TlsConfig): Promise<NbdServerTlsOptions | undefined> {
  if (tls.mode === 'off') return undefined;
  const field = tls.certificates !== undefined ? 'nbd.tls.certificates' : 'nbd.tls.psk';
  try {
    const credentials = tls.certificates !== undefined
      ? { x509: await loadServerX509(resolvePath(tls.certificates), { verifyPeer: tls.verifyPeer }) }
      : { psk: await loadPskFile(resolvePath(tls.psk!)) };
    return { mode: tls.mode, credentials };
  } catch (error) {
    if (error instanceof TlsCredentialsError) throw new ConfigError(field, error.message);
    throw error;
  }
}

export interface NbdSetup {
  readonly connectionsMax: number;
  readonly tls: NbdServerTlsOptions | undefined;
}

/** Reads the TLS credentials and raises the descriptor limit, fitting the NBD cap under it. */
export async function prepareNbd(config: DaemonConfig, volumes: number, logger: Logger): Promise<NbdSetup> {
  const tls = await loadNbdTls(config.nbd.tls);
  const descriptors = await raiseDescriptorLimit(logger);
  const controlListeners = config.control.socket === undefined ? 1 : 2;
  const connectionsMax = fitNbdConnections(config.nbd.connectionsMax, descriptors, config.control.connectionsMax * controlListeners, volumes);
  if (connectionsMax === null) {
    throw new ConfigError('nbd.connectionsMax', `the descriptor limit (${descriptors?.soft}) leaves none for NBD beside the control API and ${volumes} volume(s); raise it (ulimit -n)`);
  }
  if (connectionsMax < config.nbd.connectionsMax) {
    logger.warn({ configured: config.nbd.connectionsMax, cap: connectionsMax, descriptors: descriptors?.soft }, 'NBD connection cap lowered to fit the descriptor limit');
  }
  return { connectionsMax, tls };
}

/**
 * Metrics, log lines and `nbd-limits` events for NBD refusals and drops, and the memory budget's gauges.
 * Counters are labelled by reason; every reason starts at 0 so a dashboard sees the series before the
 * first event. Log lines and events are batched per limitLogIntervalMs: a flood makes one a second.
 */
export function watchNbdLimits(
  nbd: NbdServer,
  registry: Registry,
  logger: Logger,
  publish: (event: 'nbd-limits', volume: string, data: Record<string, unknown>) => void,
): void {
  const registers = [registry];
  const refused = new Counter({
    name: 'gannet_nbd_connections_refused_total',
    help: 'NBD connections refused at a cap, by reason: connections-max (the daemon) or export-connections-max (one export).',
    labelNames: ['reason'],
    registers,
  });
  const dropped = new Counter({
    name: 'gannet_nbd_connections_dropped_total',
    help: 'NBD connections the daemon cut, by reason: handshake-timeout, or stalled (held NBD memory without moving it).',
    labelNames: ['reason'],
    registers,
  });
  for (const reason of ['connections-max', 'export-connections-max'] satisfies RefusedEvent['reason'][]) refused.inc({ reason }, 0);
  for (const reason of ['handshake-timeout', 'stalled'] satisfies DroppedEvent['reason'][]) dropped.inc({ reason }, 0);
  new Gauge({
    name: 'gannet_nbd_memory_bytes',
    help: 'NBD payloads being received and replies not yet sent, across all connections.',
    registers,
    collect() {
      this.set(nbd.memory.usedBytes);
    },
  });
  new Gauge({
    name: 'gannet_nbd_memory_bytes_max',
    help: 'The NBD memory budget (nbd.memoryBytesMax).',
    registers,
    collect() {
      this.set(nbd.memory.bytesMax);
    },
  });
  new Gauge({
    name: 'gannet_nbd_memory_waiting_connections',
    help: 'NBD connections not being read because their next request does not fit the memory budget.',
    registers,
    collect() {
      this.set(nbd.memory.waitingConnections);
    },
  });

  const log = logger.child({ component: 'nbd' });
  let pending = new Map<string, number>();
  let timer: NodeJS.Timeout | null = null;
  const note = (what: string) => {
    pending.set(what, (pending.get(what) ?? 0) + 1);
    if (timer !== null) return;
    timer = setTimeout(() => {
      timer = null;
      const counts = Object.fromEntries(pending);
      pending = new Map();
      log.warn({ counts, connections: nbd.connectionCount }, 'NBD connections refused or dropped');
      publish('nbd-limits', '', { counts, connections: nbd.connectionCount });
    }, limitLogIntervalMs);
    timer.unref();
  };
  nbd.on('refused', (event: RefusedEvent) => {
    refused.inc({ reason: event.reason });
    note(`refused:${event.reason}`);
  });
  nbd.on('dropped', (event: DroppedEvent) => {
    dropped.inc({ reason: event.reason });
    note(`dropped:${event.reason}`);
  });
}
