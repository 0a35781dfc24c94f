import { readFile } from 'node:fs/promises';
import { join, resolve as resolvePath } from 'node:path';
import { SwappableDevice } from '@gannet/block-device';
import { PrimaryVolume, type Peer, type PrimaryOptions } from '@gannet/core';
import { loadClientX509, nbdUri, parsePskFile, type ListenAddress, type NbdServer, type TlsClientCredentials } from 'nbd-server-js';
import type { Logger } from 'pino';
import { z } from 'zod';
import {
  ConfigError,
  defaultVolumeSizeBytes,
  primaryVolumeFields,
  secondaryVolumeFields,
  volumeConfigSchema,
  volumeNameSchema,
  type DaemonConfig,
  type PeerConfig,
  type VolumeConfig,
} from './config.js';
import {
  ApiError,
  validate,
  type CheckpointResult,
  type PrimaryVolumeView,
  type RecoverResult,
  type RemoveResult,
  type VolumeErrorView,
} from './control.js';
import type { EventName } from './events.js';
import type { Metrics } from './metrics.js';
import { OperationOrder } from './ordering.js';
import {
  backingFileName,
  createVolumeDir,
  discardVolume,
  finishCreation,
  metaDirName,
  readPrimaryRecord,
  unmovable,
  volumeDir,
  type PrimaryRecord,
  type Scan,
} from './registry.js';
import { clientDisconnectGraceMs, closeOpenVolumes, eachBounded, errorCodeOf, exportCloseGraceMs, present, problemOf, retireDirectory, volumeOpenConcurrency, type VolumeReload } from './volume-set.js';

/**
 * The volumes of a daemon in the primary role (`gannet serve --role primary`): each one a PrimaryVolume,
 * the PVM's disk, served as the one NBD export NAME, every change forwarded to the volume of the same
 * name on the peer (the secondary daemon). The volume directories are the secondary role's layout
 * (registry.ts) with `role: primary` in volume.json, so neither role ever opens the other's files.
 *
 * Like VolumeSet, a volume that cannot be opened is kept in state `error` and the others are served;
 * control operations are ordered per volume. What only the secondary has (failover, recover, groups)
 * is refused with a message.
 */

/** Secondary daemons' control tokens are 64 hex digits; a token file is never more than a line. */
export const peerTokenFileBytesMax = 4096;

/** Reads the secondary's control token (a copy of its DATA_DIR/control.token); errors name the config field. */
export async function readPeerToken(file: string): Promise<string> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (error) {
    throw new ConfigError('peer.tokenFile', `cannot read ${file}: ${(error as Error).message}`);
  }
  if (text.length > peerTokenFileBytesMax) throw new ConfigError('peer.tokenFile', `${file} is larger than ${peerTokenFileBytesMax} bytes`);
  const token = text.trim();
  if (token.length < 16 || /\s/.test(token)) {
    throw new ConfigError('peer.tokenFile', `${file} does not hold a control token (one line of at least 16 characters, as the secondary's DATA_DIR/control.token)`);
  }
  return token;
}

/** The TLS credentials for the peer's NBD, read once at start; errors name the config field. */
export async function readPeerTls(tls: NonNullable<PeerConfig['tls']>): Promise<TlsClientCredentials> {
  if (tls.certificates !== undefined) {
    try {
      return { x509: await loadClientX509(resolvePath(tls.certificates)) };
    } catch (error) {
      throw new ConfigError('peer.tls.certificates', (error as Error).message);
    }
  }
  const file = resolvePath(tls.psk!);
  let keys: Map<string, Buffer>;
  try {
    keys = parsePskFile(await readFile(file, 'utf8'), file);
  } catch (error) {
    throw new ConfigError('peer.tls.psk', (error as Error).message);
  }
  const identity = tls.pskIdentity ?? keys.keys().next().value;
  const key = identity === undefined ? undefined : keys.get(identity);
  if (identity === undefined || key === undefined) {
    throw new ConfigError(tls.pskIdentity === undefined ? 'peer.tls.psk' : 'peer.tls.pskIdentity', `no key for ${identity === undefined ? 'any identity' : `identity ${identity}`} in ${file}`);
  }
  return { psk: { identity, key } };
}

interface OpenEntry {
  readonly kind: 'open';
  readonly name: string;
  readonly dir: string;
  readonly record: PrimaryRecord;
  readonly wanted: VolumeConfig;
  readonly volume: PrimaryVolume;
  /** A promoted volume's NAME/secondary, the export its VM attached to as a secondary; null otherwise. */
  readonly secondaryExport: SwappableDevice | null;
}

interface BrokenEntry {
  readonly kind: 'error';
  readonly name: string;
  readonly dir: string | null;
  readonly record: PrimaryRecord | null;
  readonly wanted: VolumeConfig;
  readonly error: VolumeErrorView;
  readonly cause: unknown;
}

type Entry = OpenEntry | BrokenEntry;

export interface PrimarySetContext {
  readonly dataDir: string;
  readonly nbd: NbdServer;
  readonly nbdAddresses: readonly ListenAddress[];
  readonly metrics: Metrics;
  readonly logger: Logger;
  /** Shared with the secondary role's set (see VolumeSetContext). */
  readonly order: OperationOrder;
  /** The link to the volume `name` on the peer: the daemon's peer, or `control` (HOST:PORT) when given. */
  peerOf(name: string, control?: string): Peer;
  publish(event: EventName, volume: string, data: Record<string, unknown>): void;
  closing(): boolean;
  readonly tlsRequired: boolean;
}

const createNameSchema = z.object({ name: volumeNameSchema }).passthrough();

const notOnPrimary = (what: string, name: string) => new ApiError('conflict', `${what} is an operation of a secondary volume; volume ${name} runs role primary here`);

/** The engine options of a primary volume: its record's size and files, then the config's limits. */
export function primaryOptions(dir: string, record: PrimaryRecord, wanted: VolumeConfig): PrimaryOptions {
  const limits: Record<string, unknown> = {};
  for (const field of primaryVolumeFields) if (wanted[field] !== undefined) limits[field] = wanted[field];
  return { ...limits, sizeBytes: record.sizeBytes, path: join(dir, backingFileName), dataDir: join(dir, metaDirName) };
}

function refuseSizeChange(name: string, dir: string, record: PrimaryRecord, wanted: VolumeConfig): void {
  if (wanted.sizeBytes !== undefined && wanted.sizeBytes !== record.sizeBytes) {
    throw new ConfigError(`volumes.${name}.sizeBytes`, `is ${wanted.sizeBytes} but the volume in ${dir} was created with ${record.sizeBytes} (it cannot change)`);
  }
}

export class PrimarySet {
  private readonly entries = new Map<string, Entry>();
  private readonly creating = new Set<string>();

  constructor(private readonly context: PrimarySetContext) {}

  private get order(): OperationOrder {
    return this.context.order;
  }

  /** Opens the primary volumes of the data directory (`scan`, leftovers already removed) and creates the configured ones that are missing. */
  async start(config: DaemonConfig, scan: Scan<PrimaryRecord>): Promise<void> {
    const configured = new Map(Object.entries(config.volumes));
    const existing: { name: string; dir: string; record: PrimaryRecord; wanted: VolumeConfig }[] = [];
    for (const found of scan.volumes) {
      const wanted = configured.get(found.name) ?? {};
      configured.delete(found.name);
      if ('problem' in found) {
        this.addBroken({ kind: 'error', name: found.name, dir: found.dir, record: null, wanted, error: problemOf('ERECORD', found.problem), cause: undefined });
        continue;
      }
      refuseSizeChange(found.name, found.dir, found.record, wanted);
      existing.push({ ...found, wanted });
    }
    await eachBounded(existing, volumeOpenConcurrency, ({ name, dir, record, wanted }) => this.openExisting(name, dir, record, wanted, 'opened'));
    await eachBounded([...configured], volumeOpenConcurrency, ([name, wanted]) => this.createConfigured(name, wanted));
  }

  get names(): string[] {
    return [...this.entries.keys()].sort();
  }

  has(name: string): boolean {
    return this.entries.has(name) || this.creating.has(name);
  }

  views(): PrimaryVolumeView[] {
    return this.names.map((name) => this.view(this.entries.get(name)!));
  }

  viewOf(name: string): PrimaryVolumeView {
    return this.view(this.lookup(name));
  }

  /** The engine volume of an open volume, for a caller that embeds the daemon. */
  volumeOf(name: string): PrimaryVolume {
    const entry = this.lookup(name);
    if (entry.kind !== 'open') throw unavailable(entry);
    return entry.volume;
  }

  idle(): Promise<void> {
    return this.order.idle();
  }

  /** Closes every open volume: each persists its exact dirty map, so a restart resyncs no more than needed. */
  closeAll(): Promise<unknown> {
    return closeOpenVolumes(this.entries, this.context.logger);
  }

  private lookup(name: string): Entry {
    const entry = this.entries.get(name);
    if (entry === undefined) throw new ApiError('not_found', `no such volume: ${name}`);
    return entry;
  }

  private ordered<T>(names: readonly string[], operation: () => Promise<T>): Promise<T> {
    if (this.context.closing()) return Promise.reject(new ApiError('unavailable', 'the daemon is shutting down'));
    return this.order.run(names, operation);
  }

  private async openExisting(name: string, dir: string, record: PrimaryRecord, wanted: VolumeConfig, how: 'opened'): Promise<Entry> {
    try {
      const volume = await PrimaryVolume.open(primaryOptions(dir, record, wanted), this.context.peerOf(name, record.peer));
      return this.serve({ kind: 'open', name, dir, record, wanted, volume, secondaryExport: null }, how);
    } catch (error) {
      const problem = problemOf(errorCodeOf(error), (error as Error).message);
      return this.addBroken({ kind: 'error', name, dir, record, wanted, error: problem, cause: error });
    }
  }

  /** As VolumeSet's: the directory appears whole, and a failure removes it again. */
  private async createVolume(name: string, wanted: VolumeConfig): Promise<OpenEntry> {
    const { dataDir, logger } = this.context;
    const record: PrimaryRecord = { name, role: 'primary', sizeBytes: wanted.sizeBytes ?? defaultVolumeSizeBytes, createdAt: new Date().toISOString() };
    const dir = await createVolumeDir(dataDir, record);
    let volume: PrimaryVolume | undefined;
    try {
      volume = await PrimaryVolume.open(primaryOptions(dir, record, wanted), this.context.peerOf(name));
      await finishCreation(dir);
      return this.serve({ kind: 'open', name, dir, record, wanted, volume, secondaryExport: null }, 'created');
    } catch (error) {
      await volume?.close().catch((closeError: unknown) => logger.error({ err: closeError, volume: name }, 'closing a volume whose creation failed'));
      await discardVolume(dataDir, dir, name).catch((discardError: unknown) =>
        logger.error({ err: discardError, volume: name, dir }, 'removing a volume whose creation failed'),
      );
      throw error;
    }
  }

  private async createConfigured(name: string, wanted: VolumeConfig): Promise<Entry> {
    try {
      return await this.createVolume(name, wanted);
    } catch (error) {
      const problem = problemOf(errorCodeOf(error), `creating volume ${name} failed: ${(error as Error).message}`);
      return this.addBroken({ kind: 'error', name, dir: null, record: null, wanted, error: problem, cause: error });
    }
  }

  /**
   * Serves a volume a promotion made (in the volume's order): `secondaryExport` is the NAME/secondary its
   * VM is attached to, already pointed at the volume's disk.
   */
  adoptPromoted(name: string, dir: string, record: PrimaryRecord, wanted: VolumeConfig, volume: PrimaryVolume, secondaryExport: SwappableDevice): void {
    this.serve({ kind: 'open', name, dir, record, wanted, volume, secondaryExport }, 'promoted');
  }

  /**
   * The open primary volume `name`, for a demotion (in its order), with the NBD clients on its exports,
   * or a conflict saying why it cannot be demoted.
   */
  demotable(name: string): { dir: string; record: PrimaryRecord; volume: PrimaryVolume; wanted: VolumeConfig; clients: number } {
    const entry = this.lookup(name);
    if (entry.kind !== 'open') throw new ApiError('conflict', `volume ${name} cannot be demoted: it is in error (${entry.error.code}): ${entry.error.message}`);
    const { nbd } = this.context;
    const clients = exportNames(entry).reduce((n, exportName) => n + nbd.exportConnectionCount(exportName), 0);
    return { dir: entry.dir, record: entry.record, volume: entry.volume, wanted: entry.wanted, clients };
  }

  /**
   * Takes a volume out of the set for a demotion (in its order): its exports go, their connections
   * closed at once (their requests in flight finish or fail). The caller closes the volume.
   */
  async release(name: string): Promise<void> {
    const entry = this.lookup(name);
    this.entries.delete(name);
    this.context.metrics.removeVolume(name);
    if (entry.kind === 'open') await Promise.all(exportNames(entry).map((exportName) => this.context.nbd.removeExport(exportName, { graceMs: 0 })));
  }

  /** A promotion that failed once the volume's record named the primary role: shown in error until a restart opens it. */
  addFailedPromotion(name: string, dir: string, record: PrimaryRecord, wanted: VolumeConfig, error: unknown): void {
    const problem = problemOf(errorCodeOf(error), `promoting volume ${name} failed: ${(error as Error).message}`);
    this.addBroken({ kind: 'error', name, dir, record, wanted, error: problem, cause: error });
  }

  private serve(opened: OpenEntry, how: 'opened' | 'created' | 'promoted'): OpenEntry {
    const { nbd, metrics, logger } = this.context;
    const { name, volume } = opened;
    const alias = opened.secondaryExport ?? (opened.record.promotedAt !== undefined ? new SwappableDevice(volume.device) : null);
    const entry: OpenEntry = { ...opened, secondaryExport: alias };
    const log = logger.child({ volume: name });
    const forward = (event: EventName, level: 'debug' | 'info' | 'warn', message: string) => (data: object) => {
      log[level](data, message);
      this.context.publish(event, name, { ...data });
    };
    volume.on('link', (data) => forward('link', data.state === 'up' ? 'info' : 'warn', `link ${data.state}`)(data));
    // Degraded or halted needs the operator's eye; resyncing is the way back to replicating.
    volume.on('state', (data) => forward('state', data.state === 'degraded' || data.state === 'halted' ? 'warn' : 'info', `state ${data.state}`)(data));
    volume.on('checkpoint', forward('checkpoint', 'info', 'checkpoint'));
    volume.on('durable', forward('durable', 'debug', 'peer durable'));
    volume.on('resync-start', forward('resync-start', 'info', 'resync started'));
    volume.on('resync-done', forward('resync-done', 'info', 'resync done'));
    volume.on('split-brain', forward('split-brain', 'warn', 'split brain: the peer and this volume both wrote since they split; the link is refused'));
    volume.on('error', (error) => {
      const code = errorCodeOf(error);
      log.error({ err: error, code }, 'volume error');
      metrics.onVolumeError(name, code);
      this.context.publish('error', name, { code, message: error.message });
    });
    metrics.addPrimary(name, volume);
    nbd.addExport(name, volume.device, { description: `gannet volume ${name}: primary role (the PVM's disk, replicated to ${volume.stats().link.peer})` });
    if (alias !== null && opened.secondaryExport === null) {
      nbd.addExport(`${name}/secondary`, alias, { description: `gannet volume ${name}: primary role, promoted from secondary (the same disk as ${name})` });
    }
    this.entries.set(name, entry);
    const stats = volume.stats();
    log.info({ sizeBytes: stats.sizeBytes, ackMode: stats.ackMode, state: stats.state, peer: stats.link.peer, dirtyBytes: stats.dirtyBytes }, `${how} volume`);
    this.context.publish('volume-added', name, { how, state: stats.state });
    return entry;
  }

  private addBroken(entry: BrokenEntry): BrokenEntry {
    const { metrics, logger } = this.context;
    this.entries.set(entry.name, entry);
    metrics.addBrokenVolume(entry.name);
    metrics.onVolumeError(entry.name, entry.error.code);
    logger.error({ volume: entry.name, code: entry.error.code, err: entry.cause ?? undefined, dir: entry.dir }, `volume not served: ${entry.error.message}`);
    this.context.publish('error', entry.name, { code: entry.error.code, message: entry.error.message });
    return entry;
  }

  private view(entry: Entry): PrimaryVolumeView {
    const { name } = entry;
    const promoted = entry.record?.promotedAt !== undefined;
    const exports = { disk: name, ...(promoted && { secondary: `${name}/secondary` }) };
    if (entry.kind === 'error') {
      return {
        name,
        role: 'primary',
        exports,
        uris: { disk: [] },
        state: 'error',
        error: { ...entry.error },
        ...(entry.record !== null && { sizeBytes: entry.record.sizeBytes }),
      };
    }
    const { nbd, nbdAddresses, tlsRequired } = this.context;
    const stats = entry.volume.stats();
    return {
      name,
      role: 'primary',
      exports,
      uris: {
        disk: nbdAddresses.map((address) => nbdUri(address, name, { tls: tlsRequired })),
        ...(promoted && { secondary: nbdAddresses.map((address) => nbdUri(address, exports.secondary!, { tls: tlsRequired })) }),
      },
      state: stats.state,
      ...(stats.error !== undefined && { error: { ...stats.error } }),
      sizeBytes: stats.sizeBytes,
      ...(promoted && { promotedAt: entry.record.promotedAt }),
      ackMode: stats.ackMode,
      link: { ...stats.link },
      inflightBytes: stats.inflightBytes,
      dirtyBytes: stats.dirtyBytes,
      unsentBytes: stats.unsentBytes,
      ...(stats.resync !== undefined && { resync: { ...stats.resync } }),
      ...(stats.lastResync !== undefined && { lastResync: { ...stats.lastResync } }),
      resyncBytesTotal: stats.resyncBytesTotal,
      resyncDataBytesTotal: stats.resyncDataBytesTotal,
      generation: stats.generation,
      ...(stats.splitBrain !== undefined && { splitBrain: stats.splitBrain }),
      peerEpoch: stats.peerEpoch,
      peerDurableEpoch: stats.peerDurableEpoch,
      clients: exportNames(entry).reduce((n, exportName) => n + nbd.exportConnectionCount(exportName), 0),
    };
  }

  /**
   * Checkpoints the peer of each named volume: the epoch returned is the durable-commit point (the peer's
   * backing file holds every write acknowledged before the call once its durable epoch reaches it). With
   * no names, every replicating volume, each on its own (a primary has no atomic group checkpoint).
   */
  checkpoint(names?: string[]): Promise<CheckpointResult> {
    const all = names === undefined;
    const chosen = [...new Set(names ?? this.names)];
    for (const name of chosen) if (!this.entries.has(name)) return Promise.reject(new ApiError('not_found', `no such volume: ${name}`));
    if (!all && chosen.length > 1) {
      return Promise.reject(new ApiError('conflict', 'a primary checkpoints one volume at a time: checkpoint a group atomically on the secondary'));
    }
    return this.ordered(chosen, async () => {
      const volumes: CheckpointResult['volumes'] = [];
      const skipped: NonNullable<CheckpointResult['skipped']> = [];
      for (const name of chosen) {
        const entry = this.lookup(name);
        if (entry.kind !== 'open') {
          if (!all) throw unavailable(entry);
          skipped.push({ name, reason: `error ${entry.error.code}: ${entry.error.message}` });
          continue;
        }
        const state = entry.volume.stats().state;
        if (all && state !== 'replicating') {
          skipped.push({ name, reason: state });
          continue;
        }
        const epoch = await entry.volume.checkpoint();
        // The peer reported its durable epoch with its answer to the checkpoint.
        volumes.push({ name, epoch, durableEpoch: entry.volume.stats().peerDurableEpoch ?? 0 });
      }
      this.context.logger.info({ volumes, skipped }, 'checkpoint requested');
      return all ? { volumes, skipped } : { volumes };
    });
  }

  failover(name: string): Promise<never> {
    return Promise.reject(notOnPrimary('failover', name));
  }

  recover(name: string): Promise<RecoverResult> {
    return Promise.reject(notOnPrimary('recover', name));
  }

  /** A primary attaching to a primary: two primaries configured as each other's peer. */
  attachPeer(name: string): Promise<never> {
    return Promise.reject(notOnPrimary('attaching a primary (its peer must be a secondary volume)', name));
  }

  setInconsistent(name: string): Promise<never> {
    return Promise.reject(notOnPrimary('marking a volume inconsistent', name));
  }

  digests(name: string): Promise<never> {
    return Promise.reject(notOnPrimary('answering digests (a full sync reads them from the secondary)', name));
  }

  /** `POST /v1/volumes`: a name, sizeBytes, and the primary role's settings of the config file. */
  create(body: unknown): Promise<PrimaryVolumeView> {
    let name: string;
    let wanted: VolumeConfig;
    try {
      if (this.context.closing()) throw new ApiError('unavailable', 'the daemon is shutting down');
      if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new ApiError('bad_request', 'body: expected an object', 'body');
      name = validate(createNameSchema, body).name;
      const { name: _name, ...fields } = body as Record<string, unknown>;
      if (fields.sizeBytes === undefined) throw new ApiError('bad_request', 'sizeBytes: required (bytes, or e.g. 64M, 20G)', 'sizeBytes');
      wanted = validate(volumeConfigSchema, fields);
      for (const field of secondaryVolumeFields) {
        if (wanted[field] !== undefined) throw new ApiError('bad_request', `${field}: not a setting of role primary`, field);
      }
      if (this.entries.has(name) || this.creating.has(name)) throw new ApiError('conflict', `volume ${name} already exists`);
    } catch (error) {
      return Promise.reject(error);
    }
    this.creating.add(name);
    return this.ordered([name], async () => {
      try {
        const entry = await this.createVolume(name, wanted);
        this.context.metrics.onVolumeAdded();
        return this.view(entry);
      } finally {
        this.creating.delete(name);
      }
    });
  }

  /**
   * Deletes a volume: refused while an NBD client uses it, or while it holds bytes the peer has not made
   * durable (the secondary's copy would be all that is left of them), unless `force`.
   */
  remove(name: string, { force, purge }: { force: boolean; purge: boolean }): Promise<RemoveResult> {
    try {
      this.lookup(name);
    } catch (error) {
      return Promise.reject(error);
    }
    return this.ordered([name], async () => {
      const { nbd, dataDir, logger, metrics } = this.context;
      const entry = this.lookup(name);
      const stuck = entry.dir !== null && (await present(entry.dir)) ? await unmovable(dataDir, entry.dir) : undefined;
      if (stuck !== undefined) throw new ApiError('conflict', `volume ${name} cannot be deleted: ${stuck}`);
      let closeError: string | undefined;
      if (entry.kind === 'open') {
        const exports = exportNames(entry);
        const connected = () => exports.reduce((n, exportName) => n + nbd.exportConnectionCount(exportName), 0);
        let clients = connected();
        if (clients > 0 && !force) {
          let timer: NodeJS.Timeout | undefined;
          const grace = new Promise<void>((resolve) => {
            timer = setTimeout(resolve, clientDisconnectGraceMs);
          });
          await Promise.race([Promise.all(exports.map((exportName) => nbd.exportConnectionsClosed(exportName))), grace]);
          clearTimeout(timer);
          clients = connected();
        }
        if (clients > 0 && !force) {
          throw new ApiError('conflict', `volume ${name} has ${clients} NBD client(s) connected: disconnect them first, or force (which closes them)`);
        }
        const { dirtyBytes } = entry.volume.stats();
        if (dirtyBytes > 0 && !force) {
          throw new ApiError('conflict', `volume ${name} has ${dirtyBytes} bytes its peer has not made durable: checkpoint and wait, or force`);
        }
        logger.warn({ volume: name, force, purge, clients }, 'deleting volume');
        await Promise.all(exports.map((exportName) => nbd.removeExport(exportName, { graceMs: exportCloseGraceMs })));
        try {
          await entry.volume.close();
        } catch (error) {
          closeError = (error as Error).message;
          logger.error({ err: error, volume: name }, 'closing a deleted volume failed');
        }
      }
      this.entries.delete(name);
      metrics.onVolumeRemoved(name);
      const movedTo = entry.dir !== null ? await retireDirectory(dataDir, entry.dir, name, purge, logger) : undefined;
      logger.warn({ volume: name, purged: purge, movedTo }, 'deleted volume');
      this.context.publish('volume-removed', name, { purged: purge, ...(movedTo !== undefined && { movedTo }) });
      return { name, purged: purge, ...(movedTo !== undefined && { movedTo }), ...(closeError !== undefined && { closeError }) };
    });
  }

  /**
   * Applies a reread config file: adds the volumes it names that are not served; changed settings of open
   * volumes apply at their next open (the engine takes them only then).
   */
  reload(config: DaemonConfig): Promise<VolumeReload> {
    return this.ordered(['*reload'], async () => {
      const added: string[] = [];
      const failed: VolumeReload['failed'] = [];
      const restartNeeded: string[] = [];
      const add: [string, VolumeConfig][] = [];
      for (const [name, wanted] of Object.entries(config.volumes)) {
        const entry = this.entries.get(name);
        if (entry === undefined || (entry.kind === 'error' && entry.dir === null)) {
          if (!this.creating.has(name)) add.push([name, wanted]);
          continue;
        }
        if (entry.record !== null && entry.dir !== null) refuseSizeChange(name, entry.dir, entry.record, wanted);
        for (const field of primaryVolumeFields) if (entry.wanted[field] !== wanted[field]) restartNeeded.push(`volumes.${name}.${field}`);
      }
      await eachBounded(add, volumeOpenConcurrency, async ([name, wanted]) => {
        this.creating.add(name);
        try {
          const dir = volumeDir(this.context.dataDir, name);
          const entry = await this.order.run([name], async () => {
            if (!(await present(dir))) return this.createConfigured(name, wanted);
            try {
              const record = await readPrimaryRecord(dir, name);
              refuseSizeChange(name, dir, record, wanted);
              return await this.openExisting(name, dir, record, wanted, 'opened');
            } catch (error) {
              const problem = problemOf(error instanceof ConfigError ? 'ECONFIG' : 'ERECORD', (error as Error).message);
              return this.addBroken({ kind: 'error', name, dir, record: null, wanted, error: problem, cause: undefined });
            }
          });
          if (entry.kind === 'open') {
            added.push(name);
            this.context.metrics.onVolumeAdded();
          } else {
            failed.push({ name, code: entry.error.code, message: entry.error.message });
          }
        } finally {
          this.creating.delete(name);
        }
      });
      const notInConfig = this.names.filter((name) => !(name in config.volumes));
      return { added: added.sort(), failed, notInConfig, restartNeeded, groupsChanged: false };
    });
  }
}

/** The NBD exports of an open volume: NAME, and NAME/secondary for a promoted one. */
function exportNames(entry: OpenEntry): string[] {
  return entry.secondaryExport !== null ? [entry.name, `${entry.name}/secondary`] : [entry.name];
}

function unavailable(entry: BrokenEntry): ApiError {
  return new ApiError('unavailable', `volume ${entry.name} is in error (${entry.error.code}): ${entry.error.message}`, undefined, entry.error.code);
}
