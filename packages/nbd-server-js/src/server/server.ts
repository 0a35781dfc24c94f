/**
 * NbdServer: a registry of exports (name -> BlockDevice) served over any number of TCP and Unix socket
 * listeners. Each connection is independent: a misbehaving client is disconnected without touching the
 * others. `close()` stops accepting, ends negotiations, lets transmission connections finish what is in
 * flight (new requests get ESHUTDOWN), and destroys whatever is left after the grace period.
 *
 * Everything a client can make the server hold is bounded: connections (per server and per export),
 * the time a handshake may take, and the memory of payloads and unsent replies across all connections
 * (memory-budget.ts). A refused connection is closed at once and reported as a 'refused' event; one the
 * watchdog drops (a handshake too slow, budget memory held without progress) as a 'dropped' event.
 */
import { EventEmitter } from 'node:events';
import { createServer, type Server, type Socket } from 'node:net';
import { KiB, MiB, type BlockDevice } from '@gannet/block-device';
import { DEFAULT_PORT } from '../protocol/constants.js';
import { serverTlsSetup, type ServerTlsSetup, type TlsServerCredentials } from '../tls.js';
import { Connection, type DropReason, type Logger, type WatchLimits } from './connection.js';
import { MemoryBudget, reserveFraction } from './memory-budget.js';
import { PayloadPool, pooledFootprint } from './payload-pool.js';
import type { ExportEntry, ExportRegistry } from './handshake.js';
import { stringBytesMax } from './replies.js';
import type { RequestEvent } from './transmission.js';
import type { ListenAddress } from './uri.js';

export type { DropReason, Logger, LogLevel, ReceiveMode } from './connection.js';
export type { RequestEvent, CommandName } from './transmission.js';
export type { ListenAddress } from './uri.js';
export { nbdUri } from './uri.js';

/** Largest READ/WRITE payload: advertised as the BLOCK_SIZE maximum and enforced. */
export const requestBytesMaxDefault = 32 * MiB;
/** READ buffers, WRITE payloads and unsent replies one connection may hold before it stops reading. */
export const inflightBytesMaxDefault = 64 * MiB;
/** Largest option payload (export names and meta context queries are at most 4 KiB strings each). */
export const optionBytesMax = 64 * KiB;
/** How long `close()` waits for in-flight requests before destroying connections. */
export const closeGraceMsDefault = 10_000;
/**
 * Payloads being received and replies not yet sent, across all connections: seven 32 MiB requests at
 * once (an eighth is kept for connections holding little), or hundreds of the sizes VMs send. Beyond
 * it clients wait; they are not refused.
 */
export const memoryBytesMaxDefault = 256 * MiB;
/** How long a client may hold budget memory without moving it before it is dropped. */
export const stallTimeoutMsDefault = 30_000;
/**
 * What "moving it" means for a WRITE payload: this many bytes per `stallTimeoutMs` (35 KiB/s by
 * default), so a client that drips a byte now and then to look alive is dropped all the same.
 */
export const stallBytesMin = 1 * MiB;
/** Open connections per server; more are closed at once. Each costs a descriptor and a few KiB. */
export const connectionsMaxDefault = 1024;
/** Connections in transmission per export (multi-conn clients open a handful). */
export const exportConnectionsMaxDefault = 128;
/** From accept to transmission, TLS included; qemu-nbd's --handshake-limit has the same default. */
export const handshakeTimeoutMsDefault = 10_000;
/** The watchdog looks at every connection at least this often (more often for short limits). */
const watchIntervalMsMax = 1000;
const watchIntervalMsMin = 10;
const payloadBytesLimit = 2 ** 32 - 1;

export interface ExportOptions {
  readonly description?: string;
  readonly readOnly?: boolean;
  /** Serve this export only to clients that started TLS (a server with `tls.mode` 'on'). */
  readonly tlsRequired?: boolean;
}

export type RefuseReason = 'connections-max' | 'export-connections-max';

/** The 'refused' event: a connection turned away at a cap. */
export interface RefusedEvent {
  readonly remote: string;
  readonly reason: RefuseReason;
  /** The export asked for, for 'export-connections-max'. */
  readonly exportName?: string;
}

/** The 'dropped' event: a connection the watchdog cut. */
export interface DroppedEvent {
  readonly remote: string;
  readonly reason: DropReason;
}

export interface NbdServerTlsOptions {
  /** 'on': clients may start TLS, and exports added with `tlsRequired` need it. 'require': every export needs it. */
  readonly mode: 'on' | 'require';
  readonly credentials: TlsServerCredentials;
}

export interface NbdServerOptions {
  readonly requestBytesMax?: number;
  readonly inflightBytesMax?: number;
  /** The memory budget shared by every connection (payloads being received, replies not yet sent). */
  readonly memoryBytesMax?: number;
  readonly stallTimeoutMs?: number;
  readonly connectionsMax?: number;
  readonly exportConnectionsMax?: number;
  readonly handshakeTimeoutMs?: number;
  /** NBD over TLS (STARTTLS); without it the server refuses STARTTLS. */
  readonly tls?: NbdServerTlsOptions;
  readonly logger?: Logger;
  /**
   * Called between request batches: after each socket read, once the requests it completed have been
   * handed to their devices. It runs on the data path as often as reads arrive, so keep it cheap. It
   * lets an application serve work of its own that must not wait for a busy event loop to come round
   * (gannet's control calls); an exception it throws is the application's bug and is not caught.
   */
  readonly betweenBatches?: () => void;
}

interface ClientState {
  exportName: string | null;
  closing: boolean;
}

const noLogger: Logger = () => {};
const nothingBetweenBatches = () => {};

/** The smallest memory budget that lets a request of `requestBytesMax` run (it must fit outside the reserve). */
export function memoryBytesMinFor(requestBytesMax: number): number {
  return Math.ceil(pooledFootprint(requestBytesMax) / (1 - reserveFraction));
}

function positiveInteger(name: string, value: number): number {
  if (!(Number.isSafeInteger(value) && value > 0)) throw new RangeError(`${name} must be a positive integer: ${value}`);
  return value;
}

export class NbdServer extends EventEmitter {
  readonly requestBytesMax: number;
  readonly inflightBytesMax: number;
  readonly connectionsMax: number;
  readonly exportConnectionsMax: number;
  readonly tlsMode: 'off' | 'on' | 'require';
  private readonly watchLimits: WatchLimits;
  private readonly tlsSetup: ServerTlsSetup | null;
  private readonly memoryBudget: MemoryBudget;
  private readonly exportConnections = new Map<ExportEntry, number>();
  private watchdog: NodeJS.Timeout | null = null;
  /**
   * An oversized WRITE (over `requestBytesMax`) is answered EINVAL and its payload read and dropped, so
   * the stream stays in step; beyond this length the stream is taken as corrupt and the connection ends
   * rather than reading gigabytes of what is most likely not a payload at all.
   */
  readonly writeSkipBytesMax: number;
  private readonly logger: Logger;
  private readonly betweenBatches: () => void;
  private readonly exports = new Map<string, ExportEntry>();
  private defaultName: string | null = null;
  private readonly listeners_: Server[] = [];
  private readonly connections = new Set<Connection>();
  /** The export each connection last looked up (the one it uses once in transmission), and whether it is being closed. */
  private readonly clients = new Map<Connection, ClientState>();
  private shuttingDown = false;
  private closing: Promise<void> | null = null;
  private readonly registry: ExportRegistry;
  private readonly payloadPool = new PayloadPool();

  constructor(options: NbdServerOptions = {}) {
    super();
    this.requestBytesMax = options.requestBytesMax ?? requestBytesMaxDefault;
    this.inflightBytesMax = options.inflightBytesMax ?? inflightBytesMaxDefault;
    this.writeSkipBytesMax = Math.min(2 * this.requestBytesMax, payloadBytesLimit);
    this.logger = options.logger ?? noLogger;
    this.betweenBatches = options.betweenBatches ?? nothingBetweenBatches;
    this.connectionsMax = positiveInteger('connectionsMax', options.connectionsMax ?? connectionsMaxDefault);
    this.exportConnectionsMax = positiveInteger('exportConnectionsMax', options.exportConnectionsMax ?? exportConnectionsMaxDefault);
    this.watchLimits = {
      handshakeTimeoutMs: positiveInteger('handshakeTimeoutMs', options.handshakeTimeoutMs ?? handshakeTimeoutMsDefault),
      stallTimeoutMs: positiveInteger('stallTimeoutMs', options.stallTimeoutMs ?? stallTimeoutMsDefault),
      stallBytesMin,
    };
    this.memoryBudget = new MemoryBudget(positiveInteger('memoryBytesMax', options.memoryBytesMax ?? memoryBytesMaxDefault));
    this.tlsMode = options.tls?.mode ?? 'off';
    this.tlsSetup = options.tls === undefined ? null : serverTlsSetup(options.tls.credentials);
    if (!(Number.isSafeInteger(this.requestBytesMax) && this.requestBytesMax >= 512 && this.requestBytesMax <= payloadBytesLimit - 8)) {
      throw new RangeError(`requestBytesMax must be an integer in [512, 2^32 - 9]: ${this.requestBytesMax}`);
    }
    if (!(Number.isSafeInteger(this.inflightBytesMax) && this.inflightBytesMax >= this.requestBytesMax)) {
      throw new RangeError(`inflightBytesMax must be an integer >= requestBytesMax: ${this.inflightBytesMax}`);
    }
    // The largest request must fit the part of the budget bulk requests may use, or it could never run.
    if (this.memoryBudget.bulkBytesMax < pooledFootprint(this.requestBytesMax)) {
      const least = memoryBytesMinFor(this.requestBytesMax);
      throw new RangeError(`memoryBytesMax must be at least ${least} for requestBytesMax ${this.requestBytesMax}: ${this.memoryBudget.bytesMax}`);
    }
    this.registry = {
      lookup: (name) => this.exports.get(name) ?? (name === '' && this.defaultName !== null ? this.exports.get(this.defaultName) : undefined),
      list: () => [...this.exports.values()],
    };
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /** The memory budget's state, and the pool's free buffers (held for reuse, outside the budget). */
  get memory(): { usedBytes: number; bytesMax: number; waitingConnections: number; pooledFreeBytes: number } {
    const b = this.memoryBudget;
    return { usedBytes: b.usedBytes, bytesMax: b.bytesMax, waitingConnections: b.waitingCount, pooledFreeBytes: this.payloadPool.retainedBytes };
  }

  addExport(name: string, device: BlockDevice, options: ExportOptions = {}): void {
    if (options.tlsRequired && this.tlsMode === 'off') throw new Error(`export ${JSON.stringify(name)} requires TLS, which this server has not`);
    if (Buffer.byteLength(name, 'utf8') > stringBytesMax) throw new RangeError(`export name longer than ${stringBytesMax} bytes`);
    if (name.includes('\0')) throw new RangeError('export name contains NUL');
    if (this.exports.has(name)) throw new Error(`export ${JSON.stringify(name)} already exists`);
    const sizes = device.blockSizes;
    if (!(Number.isSafeInteger(device.size) && device.size >= 0)) throw new RangeError(`device size ${device.size} is not a safe integer`);
    if (!(sizes.minimum >= 1 && sizes.minimum <= sizes.preferred && sizes.preferred <= Math.min(sizes.maximum, this.requestBytesMax))) {
      throw new RangeError(`device block sizes ${JSON.stringify(sizes)} do not fit requestBytesMax ${this.requestBytesMax}`);
    }
    this.exports.set(name, {
      name,
      device,
      description: options.description ?? '',
      readOnly: options.readOnly ?? false,
      tlsRequired: options.tlsRequired ?? false,
    });
  }

  /** Connections that use `name`, or are negotiating after looking it up. */
  exportConnectionCount(name: string): number {
    let count = 0;
    for (const client of this.clients.values()) if (client.exportName === name) count++;
    return count;
  }

  /** Resolves once every connection using `name` now has closed (new ones are not waited for). */
  exportConnectionsClosed(name: string): Promise<void> {
    const closing: Promise<void>[] = [];
    for (const [conn, client] of this.clients) if (client.exportName === name) closing.push(conn.closed);
    return Promise.all(closing).then(() => undefined);
  }

  /**
   * New connections no longer see the export, and the connections using it are closed as `close()`
   * closes every connection: a negotiation ends at once; requests in flight finish, later ones get
   * ESHUTDOWN, then the connection ends; whatever is left after `graceMs` is destroyed. Resolves once
   * they are all gone, so the caller may then close the device.
   */
  removeExport(name: string, options: { graceMs?: number } = {}): Promise<void> {
    if (!this.exports.delete(name)) throw new Error(`no export ${JSON.stringify(name)}`);
    if (this.defaultName === name) this.defaultName = null;
    return this.shutDownClients(name, options.graceMs ?? closeGraceMsDefault);
  }

  /**
   * Closes the connections using `name` as `removeExport` does, but keeps the export: new connections
   * are served. Fences a client that must no longer reach the device (an older session of a replication
   * peer): once this resolves, its requests in flight have finished and every later one was refused or
   * never read, unless `graceMs` ran out first (then a request still on the device may finish after).
   */
  closeExportConnections(name: string, options: { graceMs?: number } = {}): Promise<void> {
    if (!this.exports.has(name)) throw new Error(`no export ${JSON.stringify(name)}`);
    return this.shutDownClients(name, options.graceMs ?? closeGraceMsDefault);
  }

  /** Shuts down every connection using export `name` and waits for them (see drain). */
  private shutDownClients(name: string, graceMs: number): Promise<void> {
    const using: Connection[] = [];
    for (const [conn, client] of this.clients) {
      if (client.exportName !== name) continue;
      client.closing = true;
      conn.shutdown();
      using.push(conn);
    }
    return this.drain(using, graceMs);
  }

  /** Makes the empty export name select `name`. */
  setDefaultExport(name: string): void {
    if (!this.exports.has(name)) throw new Error(`no export ${JSON.stringify(name)}`);
    this.defaultName = name;
  }

  listen(address: { host?: string; port?: number } | { path: string }): Promise<ListenAddress> {
    if (this.shuttingDown) return Promise.reject(new Error('server is closed'));
    const server = createServer({ noDelay: true, pauseOnConnect: true }, (socket) => this.accept(socket));
    return new Promise<ListenAddress>((resolve, reject) => {
      server.once('error', reject);
      const onListening = () => {
        server.off('error', reject);
        server.on('error', (err) => this.logger('error', 'listener error', { error: err.message }));
        this.listeners_.push(server);
        const a = server.address();
        if (a === null) reject(new Error('listener has no address'));
        else if (typeof a === 'string') resolve({ path: a });
        else resolve({ host: a.address, port: a.port });
      };
      if ('path' in address) server.listen(address.path, onListening);
      else server.listen(address.port ?? DEFAULT_PORT, address.host ?? '127.0.0.1', onListening);
    });
  }

  private accept(socket: Socket): void {
    if (this.shuttingDown) {
      socket.destroy();
      return;
    }
    if (this.connections.size >= this.connectionsMax) {
      // Refused before anything is allocated for it: no greeting, the client sees the connection close.
      const remote = socket.remoteAddress !== undefined ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
      socket.destroy();
      this.emit('refused', { remote, reason: 'connections-max' } satisfies RefusedEvent);
      return;
    }
    const client: ClientState = { exportName: null, closing: false };
    const conn = new Connection(socket, {
      exports: {
        lookup: (name) => {
          const entry = this.registry.lookup(name);
          if (entry !== undefined) client.exportName = entry.name;
          return entry;
        },
        list: this.registry.list,
      },
      requestBytesMax: this.requestBytesMax,
      writeSkipBytesMax: this.writeSkipBytesMax,
      optionBytesMax,
      inflightBytesMax: this.inflightBytesMax,
      payloadPool: this.payloadPool,
      memoryBudget: this.memoryBudget,
      tls: { mode: this.tlsMode, setup: this.tlsSetup },
      logger: this.logger,
      isShuttingDown: () => this.shuttingDown || client.closing,
      wantsEvents: () => this.listenerCount('request') > 0,
      event: (ev: RequestEvent) => this.emit('request', ev),
      betweenBatches: this.betweenBatches,
      exportFull: (entry) => {
        const full = (this.exportConnections.get(entry) ?? 0) >= this.exportConnectionsMax;
        if (full) this.emit('refused', { remote: conn.remote, reason: 'export-connections-max', exportName: entry.name } satisfies RefusedEvent);
        return full;
      },
      joined: (entry) => this.exportConnections.set(entry, (this.exportConnections.get(entry) ?? 0) + 1),
      left: (entry) => {
        const n = (this.exportConnections.get(entry) ?? 1) - 1;
        if (n > 0) this.exportConnections.set(entry, n);
        else this.exportConnections.delete(entry);
      },
    });
    this.connections.add(conn);
    this.startWatchdog();
    this.clients.set(conn, client);
    this.emit('connection', { remote: conn.remote, receiveMode: conn.receiveMode });
    void conn.closed.then(() => {
      this.connections.delete(conn);
      this.clients.delete(conn);
      this.emit('close-connection', { remote: conn.remote, directBytes: conn.directBytes });
    });
  }

  /** One timer for every connection: handshake timeouts and stalled budget holders. */
  private startWatchdog(): void {
    if (this.watchdog !== null) return;
    const { handshakeTimeoutMs, stallTimeoutMs } = this.watchLimits;
    const intervalMs = Math.max(watchIntervalMsMin, Math.min(watchIntervalMsMax, Math.floor(Math.min(handshakeTimeoutMs, stallTimeoutMs) / 4)));
    this.watchdog = setInterval(() => this.watch(), intervalMs);
    this.watchdog.unref();
  }

  private watch(): void {
    const now = Date.now();
    for (const conn of this.connections) {
      const reason = conn.watch(now, this.watchLimits);
      if (reason === null) continue;
      // Debug only: a flood of idle sockets would otherwise write a line per socket; 'dropped' counts them.
      this.logger('debug', 'dropping connection', { remote: conn.remote, reason });
      conn.destroy();
      this.emit('dropped', { remote: conn.remote, reason } satisfies DroppedEvent);
    }
  }

  close(options: { graceMs?: number } = {}): Promise<void> {
    this.closing ??= this.doClose(options.graceMs ?? closeGraceMsDefault);
    return this.closing;
  }

  private async doClose(graceMs: number): Promise<void> {
    this.shuttingDown = true;
    this.payloadPool.close();
    const stopped = this.listeners_.map((s) => new Promise<void>((resolve) => s.close(() => resolve())));
    for (const c of this.connections) c.shutdown();
    await this.drain([...this.connections], graceMs);
    await Promise.all(stopped);
    if (this.watchdog !== null) clearInterval(this.watchdog);
    this.watchdog = null;
  }

  /** Waits for `connections` (already shut down) to close; destroys those left after `graceMs`. */
  private async drain(connections: readonly Connection[], graceMs: number): Promise<void> {
    if (connections.length === 0) return;
    const drained = Promise.all(connections.map((c) => c.closed));
    let timer: NodeJS.Timeout | undefined;
    const grace = new Promise<'timeout'>((resolve) => {
      timer = setTimeout(() => resolve('timeout'), graceMs);
    });
    const outcome = await Promise.race([drained.then(() => 'drained' as const), grace]);
    clearTimeout(timer);
    if (outcome === 'timeout') {
      this.logger('warn', 'grace period over, destroying connections', { connections: connections.length });
      for (const c of connections) c.destroy();
      await drained;
    }
  }
}
