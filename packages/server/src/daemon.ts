import { randomBytes } from 'node:crypto';
import { chmod, lstat, mkdir, readFile, stat, unlink, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { resolve as resolvePath, join } from 'node:path';
import { checkpointGroup, openVolume, type FailoverTarget, type Volume } from '@gannet/core';
import { NbdServer, nbdUri, type ListenAddress as NbdListenAddress } from 'nbd-server-js';
import type { Logger } from 'pino';
import { tokenFileName, type DaemonConfig } from './config.js';
import { ApiError, type VolumeView } from './control.js';
import type { ControlListenAddress, ControlOperations, MetricsText } from './control-lane.js';
import { ControlThread, type ControlThreadOptions } from './control-thread.js';
import type { EventName } from './events.js';
import { Metrics } from './metrics.js';
import { prepareNbd, watchNbdLimits, type NbdSetup } from './nbd-setup.js';
import { createVolumeRecord, resolveVolumes, type VolumeSpec } from './registry.js';

/**
 * The gannet daemon: opens every volume of the data directory, serves NAME/primary and NAME/secondary
 * per volume over NBD, and the control API over HTTP on a thread of its own (control-thread.ts). The
 * main thread owns the volumes and answers the control thread's calls, also from inside the NBD data
 * path so that they do not wait behind it (control-lane.ts). Control operations that change a volume
 * (checkpoint, failover) run one at a time, so a failover never races a checkpoint of the same group.
 */

export const tokenBytes = 32;
/** How long shutdown waits for NBD requests in flight before closing their sockets. */
export const nbdShutdownGraceMs = 10_000;
/** How long shutdown waits for control responses in flight before closing their sockets. */
export const controlShutdownGraceMs = 5_000;

export type ControlAddress = ControlListenAddress;

interface ManagedVolume {
  readonly spec: VolumeSpec;
  readonly volume: Volume;
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
  private readonly managed = new Map<string, ManagedVolume>();
  private readonly nbd: NbdServer;
  private control: ControlThread | undefined;
  private operations: Promise<unknown> = Promise.resolve();
  private closing: Promise<void> | undefined;

  private constructor(
    readonly config: DaemonConfig,
    readonly logger: Logger,
    readonly token: string,
    readonly tokenFile: string,
    nbdSetup: NbdSetup,
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
    watchNbdLimits(this.nbd, this.metrics.registry, logger);
  }

  static async start(config: DaemonConfig, logger: Logger): Promise<Daemon> {
    const dataDir = resolvePath(config.dataDir);
    await mkdir(dataDir, { recursive: true, mode: 0o700 });
    const { token, file } = await ensureToken(dataDir, logger);
    const specs = await resolveVolumes({ ...config, dataDir });
    const nbdSetup = await prepareNbd(config, specs.length, logger);
    const daemon = new Daemon({ ...config, dataDir }, logger, token, file, nbdSetup);
    try {
      for (const spec of specs) await daemon.openManaged(spec);
      await daemon.listen();
    } catch (error) {
      await daemon.close().catch((closeError: unknown) => logger.error({ err: closeError }, 'cleanup after failed start'));
      throw error;
    }
    return daemon;
  }

  private async openManaged(spec: VolumeSpec): Promise<void> {
    if (spec.created) await createVolumeRecord(spec);
    const volume = await openVolume(spec.options);
    const name = spec.name;
    const log = this.logger.child({ volume: name });
    this.managed.set(name, { spec, volume });
    this.metrics.addVolume(name, volume);
    volume.on('checkpoint', (event) => {
      log.info(event, 'checkpoint');
      this.publish('checkpoint', name, { ...event });
    });
    volume.on('flushed', (event) => {
      log.debug(event, 'flushed');
      this.publish('flushed', name, { ...event });
    });
    volume.on('pressure', (event) => {
      log.warn(event, 'memory pressure: checkpoint soon');
      this.publish('pressure', name, { ...event });
    });
    volume.on('failover', (event) => {
      log.warn(event, 'failed over');
      this.publish('failover', name, { ...event });
    });
    volume.on('error', (error) => {
      log.error({ err: error }, 'volume error');
      this.publish('error', name, { message: error.message, code: (error as { code?: unknown }).code ?? null });
    });
    this.nbd.addExport(`${name}/primary`, volume.primary, {
      description: `gannet volume ${name}: primary view (the PVM's forwarded writes)`,
    });
    this.nbd.addExport(`${name}/secondary`, volume.secondary, {
      description: `gannet volume ${name}: secondary view (the SVM's disk)`,
    });
    const stats = volume.stats();
    log.info(
      { created: spec.created, sizeBytes: stats.sizeBytes, strategy: stats.strategy, epoch: stats.epoch, state: stats.state },
      spec.created ? 'created volume' : 'opened volume',
    );
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

  /** With TLS required, the URIs handed out are `nbds`: clients given them insist on TLS. */
  private get tlsRequired(): boolean {
    return this.config.nbd.tls.mode === 'require';
  }

  get volumeNames(): string[] {
    return [...this.managed.keys()];
  }

  volumeOf(name: string): Volume {
    return this.lookup(name).volume;
  }

  private lookup(name: string): ManagedVolume {
    const managed = this.managed.get(name);
    if (!managed) throw new ApiError('not_found', `no such volume: ${name}`);
    return managed;
  }

  private view(name: string, { spec, volume }: ManagedVolume): VolumeView {
    const stats = volume.stats();
    const exports = { primary: `${name}/primary`, secondary: `${name}/secondary` };
    return {
      name,
      exports,
      uris: {
        primary: this.nbdAddresses.map((address) => nbdUri(address, exports.primary, { tls: this.tlsRequired })),
        secondary: this.nbdAddresses.map((address) => nbdUri(address, exports.secondary, { tls: this.tlsRequired })),
      },
      strategy: stats.strategy,
      state: stats.state,
      ...(stats.failoverTarget !== undefined && { failoverTarget: stats.failoverTarget }),
      sizeBytes: stats.sizeBytes,
      blockBytes: spec.options.blockBytes,
      epoch: stats.epoch,
      durableEpoch: stats.durableEpoch,
      bufferedBytes: { ...stats.bufferedBytes },
      spilledBytes: stats.spilledBytes,
      tornRanges: stats.tornRanges.map((range) => ({ offset: range.offset, length: range.length })),
    };
  }

  volumes(): VolumeView[] {
    return [...this.managed].map(([name, managed]) => this.view(name, managed));
  }

  volume(name: string): VolumeView {
    return this.view(name, this.lookup(name));
  }

  /** Runs volume-changing operations one after another, and never after shutdown began. */
  private serialize<T>(operation: () => Promise<T>): Promise<T> {
    if (this.closing) return Promise.reject(new ApiError('unavailable', 'the daemon is shutting down'));
    const result = this.operations.then(operation);
    this.operations = result.catch(() => undefined);
    return result;
  }

  private requireReplicating(name: string, volume: Volume, action: string): void {
    const stats = volume.stats();
    if (stats.state === 'replicating') return;
    const detail = stats.failoverTarget !== undefined ? ` (to ${stats.failoverTarget})` : '';
    throw new ApiError('conflict', `cannot ${action} volume ${name}: it is ${stats.state}${detail}`);
  }

  checkpoint(names?: string[]): Promise<{ name: string; epoch: number }[]> {
    const chosen = [...new Set(names ?? this.volumeNames)];
    for (const name of chosen) this.lookup(name);
    return this.serialize(async () => {
      const volumes = chosen.map((name) => this.lookup(name).volume);
      chosen.forEach((name, index) => this.requireReplicating(name, volumes[index], 'checkpoint'));
      const epochs = volumes.length === 1 ? [await volumes[0].checkpoint()] : await checkpointGroup(volumes);
      if (epochs.length !== volumes.length) throw new Error(`checkpointGroup returned ${epochs.length} epochs for ${volumes.length} volumes`);
      this.logger.info({ volumes: chosen, epochs }, 'checkpoint requested');
      return chosen.map((name, index) => ({ name, epoch: epochs[index] }));
    });
  }

  failover(name: string, to: FailoverTarget): Promise<VolumeView> {
    const managed = this.lookup(name);
    return this.serialize(async () => {
      this.requireReplicating(name, managed.volume, 'fail over');
      this.logger.warn({ volume: name, to }, 'failover requested');
      await managed.volume.failover({ to });
      return this.view(name, managed);
    });
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
    await this.operations;
    let failure: unknown;
    for (const [name, { volume }] of this.managed) {
      try {
        await volume.close();
        this.logger.info({ volume: name }, 'closed volume');
      } catch (error) {
        this.logger.error({ err: error, volume: name }, 'closing volume failed');
        failure ??= error;
      }
    }
    const force = setTimeout(() => this.control?.forceClose(), controlShutdownGraceMs);
    await controlClosed;
    clearTimeout(force);
    await this.control?.terminate();
    if (failure !== undefined) throw failure;
  }
}
