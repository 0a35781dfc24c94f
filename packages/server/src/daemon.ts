import { randomBytes } from 'node:crypto';
import { chmod, lstat, mkdir, readFile, stat, unlink, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { resolve as resolvePath, join } from 'node:path';
import type { FailoverTarget, Generation, PrimaryVolume, Volume } from '@gannet/core';
import { NbdServer, type ListenAddress as NbdListenAddress, type TlsClientCredentials } from 'nbd-server-js';
import type { Logger } from 'pino';
import { ConfigError, tokenFileName, type DaemonConfig } from './config.js';
import { ApiError, type AnyVolumeView, type CheckpointResult, type DigestsView, type GroupView, type PeerAttachRequest, type PeerAttachView, type RecoverResult, type ReloadResult, type RemoveResult, type VolumeView } from './control.js';
import type { ControlListenAddress, ControlOperations, MetricsText } from './control-lane.js';
import { ControlThread, type ControlThreadOptions } from './control-thread.js';
import type { EventName } from './events.js';
import { Metrics } from './metrics.js';
import { prepareNbd, watchNbdLimits, type NbdSetup } from './nbd-setup.js';
import { peerLink } from './peer-link.js';
import { PrimarySet, readPeerTls, readPeerToken } from './primary-set.js';
import { scanVolumes } from './registry.js';
import { VolumeSet } from './volume-set.js';

/**
 * The gannet daemon: opens every volume of the data directory, serves NAME/primary and NAME/secondary
 * per volume over NBD (role secondary, volume-set.ts) or NAME, replicated to the peer daemon (role
 * primary, primary-set.ts), and the control API over HTTP on a thread of its own (control-thread.ts).
 * The main thread owns the volumes and answers the control thread's calls, also from inside
 * the NBD data path so that they do not wait behind it (control-lane.ts). Control operations that change
 * a volume run one at a time per volume (ordering.ts), so a failover never races a checkpoint of the
 * same group, and a slow one on one volume holds up no other volume.
 */

export const tokenBytes = 32;
/** How long shutdown waits for NBD requests in flight before closing their sockets. */
export const nbdShutdownGraceMs = 10_000;
/** How long shutdown waits for control responses in flight before closing their sockets. */
export const controlShutdownGraceMs = 5_000;

export type ControlAddress = ControlListenAddress;

export interface DaemonOptions {
  /** Rereads the config file (with the start's flags over it), for SIGHUP and POST /v1/reload. */
  readonly reloadConfig?: () => Promise<DaemonConfig>;
}

/** Top-level settings a reload applies at once; every other setting is taken only at start. */
const liveSettings = new Set(['volumes', 'groups', 'logLevel']);

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** The fields (dotted paths) of `next` that differ from the running configuration and need a restart. */
export function settingsNeedingRestart(running: DaemonConfig, next: DaemonConfig): string[] {
  const changed: string[] = [];
  const walk = (a: unknown, b: unknown, path: string) => {
    if (isObject(a) && isObject(b)) {
      for (const key of new Set([...Object.keys(a), ...Object.keys(b)])) walk(a[key], b[key], `${path}.${key}`);
    } else if (JSON.stringify(a) !== JSON.stringify(b)) {
      changed.push(path);
    }
  };
  const keys = new Set([...Object.keys(running), ...Object.keys(next)]);
  for (const key of keys) if (!liveSettings.has(key)) walk((running as Record<string, unknown>)[key], (next as Record<string, unknown>)[key], key);
  return changed;
}

/** Reads the control token, creating it (mode 0600) on first start. */
export async function ensureToken(dataDir: string, logger: Logger): Promise<{ token: string; file: string }> {
  const file = join(dataDir, tokenFileName);
  try {
    await writeFile(file, `${randomBytes(tokenBytes).toString('hex')}\n`, { flag: 'wx', mode: 0o600 });
    logger.info({ file }, 'created control token');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
  }
  const info = await stat(file);
  if ((info.mode & 0o077) !== 0) {
    logger.warn({ file, mode: (info.mode & 0o777).toString(8) }, 'control token was readable by others; setting mode 0600');
    await chmod(file, 0o600);
  }
  const token = (await readFile(file, 'utf8')).trim();
  if (token.length < 16) throw new Error(`${file}: token shorter than 16 characters; delete the file to get a new one`);
  return { token, file };
}

/**
 * A Unix socket left behind by a daemon killed with SIGKILL would make listen() fail with EADDRINUSE;
 * it is removed when nothing accepts on it. A live socket is left alone (listen() then reports it).
 */
export async function removeStaleSocket(path: string): Promise<void> {
  try {
    if (!(await lstat(path)).isSocket()) return;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw error;
  }
  const live = await new Promise<boolean>((resolve) => {
    const probe = connect(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', (error: NodeJS.ErrnoException) => resolve(error.code !== 'ECONNREFUSED'));
  });
  if (!live) await unlink(path);
}

export class Daemon implements ControlOperations {
  readonly metrics: Metrics;
  readonly nbdAddresses: NbdListenAddress[] = [];
  readonly controlAddresses: ControlAddress[] = [];
  /** Resolves, with why, if the control API went down for good; the CLI then shuts the daemon down. */
  readonly failed: Promise<Error>;
  private reportFailure!: (error: Error) => void;
  private readonly volumeSet: VolumeSet | PrimarySet;
  private readonly nbd: NbdServer;
  private control: ControlThread | undefined;
  private closing: Promise<void> | undefined;

  private constructor(
    /** As started, with the live settings of the last reload. */
    public config: DaemonConfig,
    readonly logger: Logger,
    readonly token: string,
    readonly tokenFile: string,
    nbdSetup: NbdSetup,
    private readonly options: DaemonOptions,
    /** Role primary: the secondary daemon's control token, and TLS credentials for its NBD. */
    peerCredentials: { token: string; tls?: TlsClientCredentials } | undefined,
  ) {
    this.failed = new Promise((resolve) => {
      this.reportFailure = resolve;
    });
    const nbdLogger = logger.child({ component: 'nbd' });
    const { nbd } = config;
    this.nbd = new NbdServer({
      ...(nbd.requestBytesMax !== undefined && { requestBytesMax: nbd.requestBytesMax }),
      memoryBytesMax: nbd.memoryBytesMax,
      stallTimeoutMs: nbd.stallTimeoutMs,
      connectionsMax: nbdSetup.connectionsMax,
      exportConnectionsMax: nbd.exportConnectionsMax,
      handshakeTimeoutMs: nbd.handshakeTimeoutMs,
      ...(nbdSetup.tls !== undefined && { tls: nbdSetup.tls }),
      logger: (level, message, fields) => nbdLogger[level](fields ?? {}, message),
      // Control calls waiting on the lane are answered between NBD request batches.
      betweenBatches: () => this.control?.poll(),
    });
    this.metrics = new Metrics(() => this.nbd.connectionCount);
    this.nbd.on('request', (event) => this.metrics.onRequest(event));
    this.nbd.on('connection', (event) => {
      this.metrics.onConnection();
      nbdLogger.debug(event, 'connection');
    });
    watchNbdLimits(this.nbd, this.metrics.registry, logger, (event, volume, data) => this.publish(event, volume, data));
    const context = {
      dataDir: config.dataDir,
      nbd: this.nbd,
      nbdAddresses: this.nbdAddresses,
      metrics: this.metrics,
      logger,
      publish: (event: EventName, volume: string, data: Record<string, unknown>) => this.publish(event, volume, data),
      closing: () => this.closing !== undefined,
      tlsRequired: config.nbd.tls.mode === 'require',
    };
    const { peer } = config;
    if (config.role === 'primary' && peer !== undefined && peerCredentials !== undefined) {
      const peerLogger = logger.child({ component: 'peer' });
      const { token, tls } = peerCredentials;
      this.volumeSet = new PrimarySet({
        ...context,
        peerOf: (volume) => peerLink({ control: peer.control, token, volume, logger: peerLogger.child({ volume }), ...(tls !== undefined && { tls }) }),
      });
    } else {
      this.volumeSet = new VolumeSet(context);
    }
  }

  static async start(config: DaemonConfig, logger: Logger, options: DaemonOptions = {}): Promise<Daemon> {
    const dataDir = resolvePath(config.dataDir);
    await mkdir(dataDir, { recursive: true, mode: 0o700 });
    const { token, file } = await ensureToken(dataDir, logger);
    const { peer } = config;
    const peerCredentials =
      config.role === 'primary' && peer !== undefined
        ? {
            token: await readPeerToken(resolvePath(peer.tokenFile)),
            ...(peer.tls !== undefined && { tls: await readPeerTls(peer.tls) }),
          }
        : undefined;
    // The descriptor budget counts the volumes known now; volumes created at run time share it.
    const scan = await scanVolumes(dataDir);
    const volumes = new Set([...scan.volumes.map((found) => found.name), ...Object.keys(config.volumes)]).size;
    const nbdSetup = await prepareNbd(config, Math.max(volumes, 1), logger);
    const daemon = new Daemon({ ...config, dataDir }, logger, token, file, nbdSetup, options, peerCredentials);
    try {
      await daemon.volumeSet.start(daemon.config);
      await daemon.listen();
    } catch (error) {
      await daemon.close().catch((closeError: unknown) => logger.error({ err: closeError }, 'cleanup after failed start'));
      throw error;
    }
    return daemon;
  }

  private async listen(): Promise<void> {
    const { nbd, control } = this.config;
    this.nbdAddresses.push(await this.nbd.listen(nbd.listen));
    if (nbd.socket !== undefined) {
      const path = resolvePath(nbd.socket);
      await removeStaleSocket(path);
      this.nbdAddresses.push(await this.nbd.listen({ path }));
    }
    const listen: ControlAddress[] = [control.listen];
    if (control.socket !== undefined) listen.push({ path: resolvePath(control.socket) });
    const options: ControlThreadOptions = {
      token: this.token,
      bodyBytesMax: control.bodyBytesMax,
      connectionsMax: control.connectionsMax,
      listen,
      operations: this,
      logger: this.logger,
      served: (lane) => this.metrics.onControlCall(lane),
      prepare: async (addresses) => {
        for (const address of addresses) if ('path' in address) await removeStaleSocket(address.path);
      },
    };
    this.control = await ControlThread.start(options);
    void this.control.failed.then(this.reportFailure);
    this.controlAddresses.push(...this.control.addresses);
  }

  private publish(event: EventName, volume: string, data: Record<string, unknown>): void {
    this.control?.publish(event, volume, data);
  }

  get volumeNames(): string[] {
    return this.volumeSet.names;
  }

  /** The engine volume of a secondary daemon's volume, for a caller that embeds the daemon. */
  volumeOf(name: string): Volume {
    if (this.volumeSet instanceof PrimarySet) throw new ApiError('conflict', 'this daemon runs role primary: see primaryVolumeOf');
    return this.volumeSet.volumeOf(name);
  }

  /** The engine volume of a primary daemon's volume. */
  primaryVolumeOf(name: string): PrimaryVolume {
    if (!(this.volumeSet instanceof PrimarySet)) throw new ApiError('conflict', 'this daemon runs role secondary: see volumeOf');
    return this.volumeSet.volumeOf(name);
  }

  volumes(): AnyVolumeView[] {
    return this.volumeSet.views();
  }

  volume(name: string): AnyVolumeView {
    return this.volumeSet.viewOf(name);
  }

  create(body: unknown): Promise<AnyVolumeView> {
    return this.volumeSet.create(body);
  }

  remove(name: string, options: { force: boolean; purge: boolean }): Promise<RemoveResult> {
    return this.volumeSet.remove(name, options);
  }

  recover(name: string): Promise<RecoverResult> {
    return this.volumeSet instanceof PrimarySet ? this.volumeSet.recover() : this.volumeSet.recover(name);
  }

  checkpoint(names?: string[]): Promise<CheckpointResult> {
    return this.volumeSet.checkpoint(names);
  }

  failover(name: string, to: FailoverTarget, force = false): Promise<AnyVolumeView> {
    return this.volumeSet instanceof PrimarySet ? this.volumeSet.failover() : this.volumeSet.failover(name, to, force);
  }

  attachPeer(name: string, from?: PeerAttachRequest, generation?: Generation | null): Promise<PeerAttachView> {
    return this.volumeSet instanceof PrimarySet ? this.volumeSet.attachPeer() : this.volumeSet.attachPeer(name, from, generation);
  }

  setInconsistent(name: string, inconsistent: boolean, generation?: Generation): Promise<VolumeView> {
    return this.volumeSet instanceof PrimarySet ? this.volumeSet.setInconsistent() : this.volumeSet.setInconsistent(name, inconsistent, generation);
  }

  digests(name: string, offset: number, length: number): Promise<DigestsView> {
    return this.volumeSet instanceof PrimarySet ? this.volumeSet.digests() : this.volumeSet.digests(name, offset, length);
  }

  groups(): GroupView[] {
    return this.volumeSet instanceof PrimarySet ? [] : this.volumeSet.groups();
  }

  /**
   * Rereads the config file (SIGHUP, POST /v1/reload): adds the volumes it names, takes its groups and
   * log level, and reports what it cannot apply while running. A bad file changes nothing.
   */
  async reload(): Promise<ReloadResult> {
    if (this.options.reloadConfig === undefined) {
      throw new ApiError('conflict', 'the daemon was started without --config: there is no config file to reread');
    }
    if (this.closing) throw new ApiError('unavailable', 'the daemon is shutting down');
    let next: DaemonConfig;
    try {
      next = await this.options.reloadConfig();
    } catch (error) {
      if (error instanceof ConfigError) throw new ApiError('bad_request', error.message, error.field);
      throw error;
    }
    next = { ...next, dataDir: resolvePath(next.dataDir) };
    const restartNeeded = settingsNeedingRestart(this.config, next);
    const outcome = await this.volumeSet.reload(next);
    const applied: string[] = [];
    if (next.logLevel !== this.config.logLevel) {
      this.logger.level = next.logLevel;
      applied.push('logLevel');
    }
    if (outcome.groupsChanged) applied.push('groups');
    this.config = { ...this.config, logLevel: next.logLevel, volumes: next.volumes, groups: next.groups };
    const result: ReloadResult = {
      added: outcome.added,
      failed: outcome.failed,
      notInConfig: outcome.notInConfig,
      restartNeeded: [...restartNeeded, ...outcome.restartNeeded],
      applied,
    };
    this.logger.info(result, 'reread the config file');
    return result;
  }

  async metricsText(): Promise<MetricsText> {
    return { contentType: this.metrics.contentType, text: await this.metrics.text() };
  }

  /** Stops accepting, drains NBD requests, lets control operations finish, then closes every volume. */
  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  private async shutdown(): Promise<void> {
    this.logger.info('shutting down');
    // Ends the event streams, stops accepting and closes idle keep-alive connections (node's
    // server.close() does both); a request that still arrives on an open connection is answered with
    // `connection: close`.
    const controlClosed = this.control?.stopAccepting() ?? Promise.resolve();
    await this.nbd.close({ graceMs: nbdShutdownGraceMs });
    await this.volumeSet.idle();
    const failure = await this.volumeSet.closeAll();
    const force = setTimeout(() => this.control?.forceClose(), controlShutdownGraceMs);
    await controlClosed;
    clearTimeout(force);
    await this.control?.terminate();
    if (failure !== undefined) throw failure;
  }
}
