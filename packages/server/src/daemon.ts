import { randomBytes } from 'node:crypto';
import { chmod, lstat, mkdir, readFile, stat, unlink, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { resolve as resolvePath, join } from 'node:path';
import { demoteToSecondary, discardSecondary, promoteToPrimary, type FailoverTarget, type Generation, type Peer, type PrimaryVolume, type Volume } from '@gannet/core';
import { NbdServer, type ListenAddress as NbdListenAddress, type TlsClientCredentials } from 'nbd-server-js';
import type { Logger } from 'pino';
import { ConfigError, primaryVolumeFields, tokenFileName, type DaemonConfig, type VolumeConfig } from './config.js';
import { formatHostPort, parseHostPort } from './defaults.js';
import {
  ApiError,
  type AnyVolumeView,
  type CheckpointResult,
  type DigestsView,
  type GroupView,
  type PeerAttachRequest,
  type PeerAttachView,
  type DemoteRequest,
  type PromoteRequest,
  type RecoverResult,
  type ResolveRequest,
  type ReloadResult,
  type RemoveResult,
  type VolumeView,
} from './control.js';
import type { ControlListenAddress, ControlOperations, MetricsText } from './control-lane.js';
import { ControlThread, type ControlThreadOptions } from './control-thread.js';
import type { EventName } from './events.js';
import { Metrics } from './metrics.js';
import { prepareNbd, watchNbdLimits, type NbdSetup } from './nbd-setup.js';
import { peerLink } from './peer-link.js';
import { OperationOrder } from './ordering.js';
import { PrimarySet, readPeerTls, readPeerToken } from './primary-set.js';
import {
  isPrimaryRecord,
  primaryRecordOf,
  readAnyRecord,
  reconcileRecord,
  removeLeftovers,
  rewriteRecord,
  scanVolumes,
  secondaryRecordOf,
  splitByRoles,
  volumeOptions,
  type AnyVolumeRecord,
} from './registry.js';
import { VolumeSet, type VolumeReload } from './volume-set.js';

/**
 * The gannet daemon: opens every volume of the data directory in the role its volume.json records,
 * serves NAME/primary and NAME/secondary per secondary volume over NBD (volume-set.ts) and NAME per
 * primary volume, replicated to the peer daemon (primary-set.ts); `role` is the role of the volumes it
 * creates, and a promotion or demotion moves a volume from one set to the other. The control API runs
 * over HTTP on a thread of its own (control-thread.ts).
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
/** How long a promotion waits for the failover it asked for (or found) to reach the backing file. */
export const promoteApplyTimeoutMs = 600_000;
/**
 * How long a promotion lets the VM's requests in flight on NAME/secondary finish before the swap; the
 * requests that arrive meanwhile wait until the primary serves them.
 */
export const promoteDrainTimeoutMs = 30_000;

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
  /** The volumes in the secondary role, and those in the primary role; a name is in one of them at most. */
  private readonly secondaries: VolumeSet;
  private readonly primaries: PrimarySet;
  private readonly order = new OperationOrder();
  /**
   * Volumes between the two sets while their role changes: the view from before, with the state
   * `promoting`, `demoting` or `resolving`, so that a status query in the middle finds the volume.
   */
  private readonly changing = new Map<string, AnyVolumeView>();
  /** The peer's control token and NBD TLS credentials, when a peer is configured; reread by a promotion. */
  private peerCredentials: { token: string; tls?: TlsClientCredentials } | undefined;
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
    /** The peer daemon's control token, and TLS credentials for its NBD, when a peer is configured. */
    peerCredentials: { token: string; tls?: TlsClientCredentials } | undefined,
  ) {
    this.peerCredentials = peerCredentials;
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
      order: this.order,
    };
    this.secondaries = new VolumeSet(context);
    this.primaries = new PrimarySet({ ...context, peerOf: (volume, control) => this.peerOf(volume, control) });
  }

  /** The link of a primary volume to its peer: the daemon's peer, or `control` (recorded at its promotion). */
  private peerOf(volume: string, control?: string): Peer {
    const credentials = this.peerCredentials;
    const configured = this.config.peer;
    if (credentials === undefined || configured === undefined) {
      throw new ConfigError('peer', `volume ${volume} is in the primary role: the daemon needs its peer (--peer HOST:PORT --peer-token-file FILE) to serve it`);
    }
    const address = control === undefined ? configured.control : parseHostPort(control);
    if (address === undefined) throw new ConfigError('peer', `volume ${volume}: its recorded peer "${control}" is not HOST:PORT`);
    const { token, tls } = credentials;
    const logger = this.logger.child({ component: 'peer', volume });
    return peerLink({ control: address, token, volume, logger, ...(tls !== undefined && { tls }) });
  }

  static async start(config: DaemonConfig, logger: Logger, options: DaemonOptions = {}): Promise<Daemon> {
    const dataDir = resolvePath(config.dataDir);
    await mkdir(dataDir, { recursive: true, mode: 0o700 });
    const { token, file } = await ensureToken(dataDir, logger);
    const peerCredentials = await readPeerCredentials(config);
    // The descriptor budget counts the volumes known now; volumes created at run time share it.
    const scan = await scanVolumes(dataDir, readAnyRecord);
    const volumes = new Set([...scan.volumes.map((found) => found.name), ...Object.keys(config.volumes)]).size;
    const nbdSetup = await prepareNbd(config, Math.max(volumes, 1), logger);
    const daemon = new Daemon({ ...config, dataDir }, logger, token, file, nbdSetup, options, peerCredentials);
    try {
      for (const dir of scan.leftovers) logger.warn({ dir }, 'removing the temporary directory of an interrupted creation or purge');
      for (const { name, dir } of scan.unfinished) logger.warn({ volume: name, dir }, 'removing a volume whose creation never finished');
      await removeLeftovers(dataDir, scan);
      // A role change interrupted between the engine's commit and volume.json: the engine's role wins.
      const volumes = await Promise.all(
        scan.volumes.map(async (found) => {
          if (!('record' in found)) return found;
          try {
            return { ...found, record: await reconcileRecord(found.dir, found.record) };
          } catch (error) {
            return { name: found.name, dir: found.dir, problem: `the role of volume ${found.name} cannot be read: ${(error as Error).message}` };
          }
        }),
      );
      const shares = splitByRoles(daemon.config, { ...scan, volumes });
      const primaryNames = new Set([...shares.primary.scan.volumes.map((found) => found.name), ...Object.keys(shares.primary.config.volumes)]);
      await daemon.secondaries.start(shares.secondary.config, shares.secondary.scan, primaryNames);
      await daemon.primaries.start(shares.primary.config, shares.primary.scan);
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
    return [...this.secondaries.names, ...this.primaries.names].sort();
  }

  /** The engine volume of a secondary volume, for a caller that embeds the daemon. */
  volumeOf(name: string): Volume {
    if (this.primaries.has(name)) throw new ApiError('conflict', `volume ${name} runs role primary: see primaryVolumeOf`);
    return this.secondaries.volumeOf(name);
  }

  /** The engine volume of a primary volume. */
  primaryVolumeOf(name: string): PrimaryVolume {
    if (!this.primaries.has(name) && this.secondaries.has(name)) throw new ApiError('conflict', `volume ${name} runs role secondary: see volumeOf`);
    return this.primaries.volumeOf(name);
  }

  /** The set holding `name`; for a name neither holds, the set of the default role (which answers 404). */
  private setOf(name: string): VolumeSet | PrimarySet {
    if (this.primaries.has(name)) return this.primaries;
    if (this.secondaries.has(name)) return this.secondaries;
    return this.config.role === 'primary' ? this.primaries : this.secondaries;
  }

  volumes(): AnyVolumeView[] {
    return [...this.secondaries.views(), ...this.primaries.views(), ...this.changing.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  volume(name: string): AnyVolumeView {
    return this.changing.get(name) ?? this.setOf(name).viewOf(name);
  }

  create(body: unknown): Promise<AnyVolumeView> {
    const name = (body as { name?: unknown } | null)?.name;
    const set = this.config.role === 'primary' ? this.primaries : this.secondaries;
    const other = set === this.primaries ? this.secondaries : this.primaries;
    if (typeof name === 'string' && other.has(name)) return Promise.reject(new ApiError('conflict', `volume ${name} already exists`));
    return set.create(body);
  }

  remove(name: string, options: { force: boolean; purge: boolean }): Promise<RemoveResult> {
    return this.setOf(name).remove(name, options);
  }

  recover(name: string): Promise<RecoverResult> {
    return this.setOf(name).recover(name);
  }

  /**
   * Checkpoints the named volumes (secondary volumes and groups atomically, a primary volume through its
   * peer); with no names, every volume of both roles that can take one.
   */
  async checkpoint(names?: string[]): Promise<CheckpointResult> {
    if (names === undefined) {
      const [secondary, primary] = await Promise.all([this.secondaries.checkpoint(), this.primaries.checkpoint()]);
      return { volumes: [...secondary.volumes, ...primary.volumes], skipped: [...(secondary.skipped ?? []), ...(primary.skipped ?? [])] };
    }
    const primaries = names.filter((name) => this.primaries.has(name));
    if (primaries.length === 0) return this.secondaries.checkpoint(names);
    if (primaries.length < names.length) {
      throw new ApiError('conflict', `${primaries.join(', ')} run role primary: checkpoint them apart from secondary volumes and groups`);
    }
    return this.primaries.checkpoint(names);
  }

  failover(name: string, to: FailoverTarget, force = false): Promise<AnyVolumeView> {
    return this.primaries.has(name) ? this.primaries.failover(name) : this.secondaries.failover(name, to, force);
  }

  attachPeer(name: string, from?: PeerAttachRequest, generation?: Generation | null): Promise<PeerAttachView> {
    return this.primaries.has(name) ? this.primaries.attachPeer(name) : this.secondaries.attachPeer(name, from, generation);
  }

  setInconsistent(name: string, inconsistent: boolean, generation?: Generation): Promise<VolumeView> {
    return this.primaries.has(name) ? this.primaries.setInconsistent(name) : this.secondaries.setInconsistent(name, inconsistent, generation);
  }

  digests(name: string, offset: number, length: number): Promise<DigestsView> {
    return this.primaries.has(name) ? this.primaries.digests(name) : this.secondaries.digests(name, offset, length);
  }

  groups(): GroupView[] {
    return this.secondaries.groups();
  }

  /**
   * `POST /v1/volumes/:name/promote`: a secondary volume becomes the primary of its VM's disk. It fails
   * over to the secondary view first unless it already failed over, waits until the kept state is in
   * disk.img, then, with the VM's requests on NAME/secondary held, has the engine turn the volume into a
   * primary on the same disk (promoteToPrimary: the engine's role file is the commit point), records the
   * role in volume.json, and points NAME/secondary at the primary's disk. NAME/primary (the old
   * primary's forward target) goes; NAME is served too. The primary links to `peer`, or the daemon's
   * peer. A primary volume is left as it is.
   */
  promote(name: string, request: PromoteRequest): Promise<AnyVolumeView> {
    if (this.closing) return Promise.reject(new ApiError('unavailable', 'the daemon is shutting down'));
    if (!this.primaries.has(name) && !this.secondaries.has(name)) return Promise.reject(new ApiError('not_found', `no such volume: ${name}`));
    return this.order.run([name], async () => {
      if (this.primaries.has(name)) return this.primaries.viewOf(name);
      const configured = this.config.peer;
      if (configured === undefined) {
        throw new ApiError('conflict', `volume ${name} cannot be promoted: the daemon has no peer token (start it with --peer HOST:PORT --peer-token-file FILE)`);
      }
      try {
        this.peerCredentials = await readPeerCredentials(this.config);
      } catch (error) {
        throw new ApiError('unavailable', (error as Error).message, undefined, 'ECONFIG');
      }
      const target = this.secondaries.promotable(name);
      // A secondary in split brain may be promoted: it is the survivor the operator chose, and the
      // other side, still split from it, stays refused until it is resolved there.
      const { state } = target.volume.stats();
      if (state === 'replicating') {
        this.logger.warn({ volume: name, force: request.force }, 'promote: failing over to the secondary view first');
        await target.volume.failover({ to: 'secondary', force: request.force });
      } else if (state !== 'failed-over' && state !== 'failing-over') {
        throw new ApiError('conflict', `volume ${name} cannot be promoted: it is ${state}`);
      }
      await failoverApplied(target.volume, promoteApplyTimeoutMs);
      const record = primaryRecordOf(target.record, new Date().toISOString(), request.peer);
      let released = false;
      let volume: PrimaryVolume | undefined;
      const started = performance.now();
      this.changing.set(name, { ...this.secondaries.viewOf(name), state: 'promoting' });
      try {
        await target.secondaryExport.swap(
          async () => {
            await this.secondaries.release(name);
            released = true;
            volume = await promoteToPrimary(target.volume, this.peerOf(name, request.peer), primarySettings(target.wanted));
            await rewriteRecord(target.dir, record);
            return volume.device;
          },
          { drainTimeoutMs: promoteDrainTimeoutMs },
        );
      } catch (error) {
        this.logger.error({ err: error, volume: name }, 'promote failed');
        if (released) {
          // The secondary volume is closed: its VM's connections end, and the volume is served again in
          // the role the engine committed, or shown in error.
          await volume?.close().catch(() => undefined);
          await this.nbd.removeExport(`${name}/secondary`, { graceMs: 0 });
          await this.reopenAfterFailure(name, target.dir, target.record, target.wanted, error);
        }
        throw error;
      } finally {
        this.changing.delete(name);
      }
      this.primaries.adoptPromoted(name, target.dir, record, target.wanted, volume!, target.secondaryExport);
      const pauseMs = Math.round(performance.now() - started);
      this.logger.warn({ volume: name, peer: request.peer ?? formatHostPort(configured.control), pauseMs }, 'promoted to the primary role');
      this.publish('role-changed', name, { role: 'primary', from: 'secondary', pauseMs });
      return this.primaries.viewOf(name);
    });
  }

  /**
   * `POST /v1/volumes/:name/demote`: a primary volume becomes a secondary on the same disk, a stale copy
   * the next primary that attaches brings up to date with a digest sync (only differing chunks are
   * sent). Refused while NBD clients use the volume, unless `force` (they are disconnected). Its exports
   * become NAME/primary and NAME/secondary. A secondary volume is left as it is.
   */
  demote(name: string, request: DemoteRequest): Promise<AnyVolumeView> {
    if (this.closing) return Promise.reject(new ApiError('unavailable', 'the daemon is shutting down'));
    if (!this.primaries.has(name) && !this.secondaries.has(name)) return Promise.reject(new ApiError('not_found', `no such volume: ${name}`));
    return this.order.run([name], async () => {
      if (this.secondaries.has(name)) return this.secondaries.viewOf(name);
      return this.demoteNow(name, request.force, 'demote');
    });
  }

  /** Demotes the primary volume `name` (in its order); `why` names the operation in logs and errors. */
  private async demoteNow(name: string, force: boolean, why: 'demote' | 'resolve'): Promise<AnyVolumeView> {
    const target = this.primaries.demotable(name);
    if (target.clients > 0 && !force) {
      throw new ApiError('conflict', `volume ${name} has ${target.clients} NBD client(s) connected: stop its VM first, or force (which disconnects them)`);
    }
    const record = secondaryRecordOf(target.record);
    this.changing.set(name, { ...this.primaries.viewOf(name), state: 'demoting' });
    try {
      this.logger.warn({ volume: name, force, clients: target.clients }, `${why}: the primary volume becomes a secondary`);
      await this.primaries.release(name);
      try {
        await target.volume.close();
        await demoteToSecondary(volumeOptions(target.dir, record, target.wanted));
        await rewriteRecord(target.dir, record);
      } catch (error) {
        this.logger.error({ err: error, volume: name }, `${why} failed`);
        await this.reopenAfterFailure(name, target.dir, target.record, target.wanted, error);
        throw error;
      }
      await this.secondaries.reopen(name, target.dir, record, target.wanted);
    } finally {
      this.changing.delete(name);
    }
    this.publish('role-changed', name, { role: 'secondary', from: 'primary' });
    return this.secondaries.viewOf(name);
  }

  /**
   * `POST /v1/volumes/:name/resolve {discardLocal: true}`: ends a split brain on this side, whose
   * changes since the split are dropped. A primary volume is demoted (its clients disconnected): the
   * peer, promoted if it is not a primary yet, resyncs it. A secondary volume's disk is discarded in the
   * engine (its clients disconnected) and served again as a replicating secondary with no generation:
   * the primary's next attach is no split brain, and its digest sync sends only what differs.
   */
  resolve(name: string, _request: ResolveRequest): Promise<AnyVolumeView> {
    if (this.closing) return Promise.reject(new ApiError('unavailable', 'the daemon is shutting down'));
    if (!this.primaries.has(name) && !this.secondaries.has(name)) return Promise.reject(new ApiError('not_found', `no such volume: ${name}`));
    return this.order.run([name], async () => {
      const notSplit = () => new ApiError('conflict', `volume ${name} is not in split brain: there is nothing to resolve`);
      if (this.primaries.has(name)) {
        if (this.primaries.volumeOf(name).stats().state !== 'split-brain') throw notSplit();
        const view = await this.demoteNow(name, true, 'resolve');
        this.logger.warn({ volume: name }, 'split brain resolved: this side\'s changes are discarded');
        return view;
      }
      const target = this.secondaries.promotable(name);
      if (target.volume.stats().splitBrain === undefined) throw notSplit();
      this.changing.set(name, { ...this.secondaries.viewOf(name), state: 'resolving' });
      try {
        await this.secondaries.release(name, { keepSecondary: false });
        try {
          await target.volume.close();
          await discardSecondary(target.volume.options);
        } catch (error) {
          this.logger.error({ err: error, volume: name }, 'resolve failed');
          await this.reopenAfterFailure(name, target.dir, target.record, target.wanted, error);
          throw error;
        }
        await this.secondaries.reopen(name, target.dir, target.record, target.wanted);
      } finally {
        this.changing.delete(name);
      }
      this.logger.warn({ volume: name }, 'split brain resolved: this side\'s changes are discarded');
      this.publish('role-changed', name, { role: 'secondary', from: 'secondary', discarded: true });
      return this.secondaries.viewOf(name);
    });
  }

  /**
   * A role change that failed after its volume left its set: the volume is served again in the role
   * the engine has committed (volume.json brought in line), or shown in error in that role.
   */
  private async reopenAfterFailure(name: string, dir: string, record: AnyVolumeRecord, wanted: VolumeConfig, cause: unknown): Promise<void> {
    let current: AnyVolumeRecord;
    try {
      current = await reconcileRecord(dir, record);
    } catch (error) {
      this.logger.error({ err: error, volume: name }, 'reading the role of a volume whose role change failed');
      current = record;
    }
    if (isPrimaryRecord(current)) {
      this.primaries.addFailedPromotion(name, dir, current, wanted, cause);
      return;
    }
    await this.secondaries.reopen(name, dir, current, wanted);
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
    const outcome = await this.reloadVolumes(next);
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

  /** Each set reloads the configured volumes it holds; those neither holds go to the default role's. */
  private async reloadVolumes(next: DaemonConfig): Promise<VolumeReload> {
    const toPrimary = (name: string) => this.primaries.has(name) || (!this.secondaries.has(name) && next.role === 'primary');
    const share = (primary: boolean) => Object.fromEntries(Object.entries(next.volumes).filter(([name]) => toPrimary(name) === primary));
    const primaryNames = new Set([...this.primaries.names, ...Object.keys(share(true))]);
    const secondary = await this.secondaries.reload({ ...next, volumes: share(false) }, primaryNames);
    const primary = await this.primaries.reload({ ...next, volumes: share(true) });
    return {
      added: [...secondary.added, ...primary.added].sort(),
      failed: [...secondary.failed, ...primary.failed],
      notInConfig: [...secondary.notInConfig, ...primary.notInConfig].sort(),
      restartNeeded: [...secondary.restartNeeded, ...primary.restartNeeded],
      groupsChanged: secondary.groupsChanged,
    };
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
    await this.order.idle();
    const [secondaryFailure, primaryFailure] = [await this.secondaries.closeAll(), await this.primaries.closeAll()];
    const failure = secondaryFailure ?? primaryFailure;
    const force = setTimeout(() => this.control?.forceClose(), controlShutdownGraceMs);
    await controlClosed;
    clearTimeout(force);
    await this.control?.terminate();
    if (failure !== undefined) throw failure;
  }
}

/** The peer's control token and NBD TLS credentials, read from the files the config names; none without a peer. */
async function readPeerCredentials(config: DaemonConfig): Promise<{ token: string; tls?: TlsClientCredentials } | undefined> {
  const { peer } = config;
  if (peer === undefined) return undefined;
  return {
    token: await readPeerToken(resolvePath(peer.tokenFile)),
    ...(peer.tls !== undefined && { tls: await readPeerTls(peer.tls) }),
  };
}

/** Resolves once the volume's failover is in its backing file; refuses after `timeoutMs`. */
function failoverApplied(volume: Volume, timeoutMs: number): Promise<void> {
  const applied = () => {
    const { state, failover } = volume.stats();
    return state === 'failed-over' && (failover === undefined || failover.phase === 'done');
  };
  if (applied()) return Promise.resolve();
  return new Promise<void>((resolve, reject) => {
    const events = ['failover', 'failover-durable', 'failover-applied'] as const;
    const check = () => {
      if (!applied()) return;
      stop();
      resolve();
    };
    const timer = setTimeout(() => {
      stop();
      reject(new ApiError('unavailable', `the failover was not in the backing file within ${timeoutMs} ms: promote again once it is (failover-applied event)`, undefined, 'ETIMEDOUT'));
    }, timeoutMs);
    const stop = () => {
      clearTimeout(timer);
      for (const event of events) volume.off(event, check);
    };
    for (const event of events) volume.on(event, check);
  });
}

/** The primary role's settings of a volume's config (ack mode, timeouts, resync rate), for a promotion. */
function primarySettings(wanted: VolumeConfig): Record<string, unknown> {
  const settings: Record<string, unknown> = {};
  for (const field of primaryVolumeFields) if (wanted[field] !== undefined) settings[field] = wanted[field];
  return settings;
}
