import { randomUUID } from 'node:crypto';
import { access } from 'node:fs/promises';
import { SwappableDevice } from '@gannet/block-device';
import {
  checkpointGroup,
  deviceDigests,
  digestBytes,
  digestChunkBytes,
  openVolume,
  ReplicatedVolume,
  type FailoverTarget,
  type Generation,
  type ResolvedVolumeOptions,
  type Volume,
} from '@gannet/core';
import { nbdUri, type ListenAddress, type NbdServer } from 'nbd-server-js';
import type { Logger } from 'pino';
import { z } from 'zod';
import { volumeConfigSchema, volumeLimitFields, volumeNameSchema, type DaemonConfig, type VolumeConfig } from './config.js';
import {
  ApiError,
  validate,
  type CheckpointResult,
  type DigestsView,
  type GroupView,
  type PeerAttachRequest,
  type PeerAttachView,
  type RecoverResult,
  type ReloadResult,
  type RemoveResult,
  type VolumeErrorView,
  type VolumeView,
} from './control.js';
import type { EventName } from './events.js';
import type { Metrics } from './metrics.js';
import { OperationOrder } from './ordering.js';
import {
  checkIdentity,
  createVolumeDir,
  discardVolume,
  finishCreation,
  moveAside,
  newVolumeRecord,
  planVolumes,
  readVolumeRecord,
  unmovable,
  volumeDir,
  volumeOptions,
  type Scan,
  type VolumeRecord,
} from './registry.js';

/**
 * The daemon's volumes while it runs: opening them at start, creating, deleting and recovering them at
 * run time, their NBD exports, and the control operations on them, ordered per volume (ordering.ts).
 *
 * A volume that cannot be opened, whatever the reason, is kept in state `error` with the reason (code,
 * message, since) in status, the API and /metrics, and its exports are not served; every other volume
 * is. A volume is never dropped from the set because it broke: only a delete removes it.
 */

/**
 * Volumes opened (or created) at once at start and on reload. Opening one waits mostly on fsyncs (its
 * state file, its metadata store), so several in flight overlap them: measured with 100 volumes of 1 GiB
 * on a virtio disk, start took 4.1 s one at a time. Bounded so that a thousand volumes do not all hold
 * their files half open at once.
 */
export const volumeOpenConcurrency = 16;
/** How long a deleted volume's NBD connections get to finish the requests in flight before they are cut. */
export const exportCloseGraceMs = 10_000;
/**
 * How long a delete without force waits for the volume's connections to go before it refuses. A client
 * that has just disconnected (its process exited) is noticed when the main thread reads its socket
 * again, which can come after the delete's call: `qemu-io ...; gannet volume delete` must not fail.
 */
export const clientDisconnectGraceMs = 1_000;
/**
 * How long a primary's attach lets the requests in flight of an earlier session of it finish before
 * their connections are cut: they are writes to memory, done in milliseconds unless the volume is stuck.
 */
export const peerFenceGraceMs = 5_000;
/** The ordering key of reloads; no volume can have it (volume names start with a letter or digit). */
const reloadKey = '*reload';

interface OpenEntry {
  readonly kind: 'open';
  readonly name: string;
  readonly dir: string;
  readonly record: VolumeRecord;
  /** What the config file asks of it (limits), as of the last start or reload that named it. */
  readonly wanted: VolumeConfig;
  readonly options: ResolvedVolumeOptions;
  readonly volume: Volume;
  /** What NAME/secondary serves: the secondary view, swapped for the primary's disk by a promotion. */
  readonly secondaryExport: SwappableDevice;
}

/** A volume that could not be opened or created; `record` and `options` when its volume.json is readable. */
interface BrokenEntry {
  readonly kind: 'error';
  readonly name: string;
  /** Absent for a creation that failed (it left nothing behind). */
  readonly dir: string | null;
  readonly record: VolumeRecord | null;
  readonly wanted: VolumeConfig;
  readonly options: ResolvedVolumeOptions | null;
  readonly error: VolumeErrorView;
  readonly cause: unknown;
}

type Entry = OpenEntry | BrokenEntry;

/** What a reload did to the volumes and groups (the daemon adds its own settings to the answer). */
export interface VolumeReload {
  readonly added: string[];
  readonly failed: ReloadResult['failed'];
  readonly notInConfig: string[];
  /** Limits of open volumes that changed: the engine takes them when it opens a volume. */
  readonly restartNeeded: string[];
  readonly groupsChanged: boolean;
}

export interface VolumeSetContext {
  readonly dataDir: string;
  readonly nbd: NbdServer;
  /** Where NBD listens (filled once the daemon listens): for the export URIs in views. */
  readonly nbdAddresses: readonly ListenAddress[];
  readonly metrics: Metrics;
  readonly logger: Logger;
  /** Shared by both roles' sets: a promotion moves a volume from one to the other in the order of its operations. */
  readonly order: OperationOrder;
  /** The other role's set holds the volume, or it is between the sets (its role changing). */
  heldElsewhere(name: string): boolean;
  publish(event: EventName, volume: string, data: Record<string, unknown>): void;
  /** Shutdown began: operations are refused from then on. */
  closing(): boolean;
  /** With TLS required, the URIs handed out are `nbds`: clients given them insist on TLS. */
  readonly tlsRequired: boolean;
}

const systemCode = /^E[A-Z0-9]+$/;

/**
 * A baseline volume (colo, passthrough) as a primary's peer, so that the benchmark harness can run a
 * baseline in the deployment's topology: it keeps no identity, so each open is a new instance and a new
 * disk to the primary (which syncs it whole), and it holds the inconsistent mark in memory without
 * acting on it (it fails over onto a half-synced disk). Only ReplicatedVolume refuses that.
 */
interface BaselineLink {
  readonly instance: string;
  inconsistent: boolean;
}
const baselineLinks = new WeakMap<Volume, BaselineLink>();

function baselineLink(volume: Volume): BaselineLink {
  let link = baselineLinks.get(volume);
  if (link === undefined) {
    link = { instance: randomUUID(), inconsistent: false };
    baselineLinks.set(volume, link);
  }
  return link;
}

/** Changes each time the daemon opens the volume: a primary tells a restarted peer from the one it fed by it. */
function instanceOf(volume: Volume): string {
  return volume instanceof ReplicatedVolume ? volume.instance : baselineLink(volume).instance;
}

/** A checkpoint's answer for one volume. */
function checkpointed(name: string, volume: Volume, epoch: number): CheckpointResult['volumes'][number] {
  return { name, epoch, durableEpoch: volume.stats().durableEpoch, instance: instanceOf(volume) };
}

/**
 * The code an operator acts on: the engine's (EMETA, ENOSPC, ...), or the system's where the engine wraps
 * it (a backing file it cannot create, EFBIG, comes as EMISMATCH with the system error as cause).
 */
export function errorCodeOf(error: unknown): string {
  const own = (error as { code?: unknown } | null)?.code;
  if (own === 'EMISMATCH') {
    let deepest: string | undefined;
    for (let at = (error as { cause?: unknown }).cause as { code?: unknown; cause?: unknown } | undefined; at != null; at = at.cause as typeof at) {
      if (typeof at.code === 'string' && systemCode.test(at.code)) deepest = at.code;
    }
    if (deepest !== undefined) return deepest;
  }
  if (typeof own === 'string' && systemCode.test(own)) return own;
  if (typeof own === 'string' && own.startsWith('LEVEL_')) return 'EMETA';
  return 'EIO';
}

/** Whether an open failed because another process holds the volume's metadata store. */
function lockedByAnotherProcess(error: unknown): boolean {
  for (let at = error as { code?: unknown; cause?: unknown } | undefined; at !== undefined && at !== null; at = at.cause as typeof at) {
    if (at.code === 'LEVEL_LOCKED') return true;
  }
  return false;
}

/** Runs `work` over `items`, at most `limit` at a time. */
export async function eachBounded<T>(items: readonly T[], limit: number, work: (item: T) => Promise<unknown>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await work(items[next++]);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

const createNameSchema = z.object({ name: volumeNameSchema }).passthrough();

export class VolumeSet {
  private readonly entries = new Map<string, Entry>();
  /** Names being created: a second creation of the same name is refused while the first runs. */
  private readonly creating = new Set<string>();
  private groupsValue = new Map<string, string[]>();
  /** The last attach per volume that named its primary's link (in memory: a restart forgets stale sessions too). */
  private readonly attached = new Map<string, PeerAttachRequest>();

  constructor(private readonly context: VolumeSetContext) {}

  private get order(): OperationOrder {
    return this.context.order;
  }

  /**
   * Opens the secondary volumes of the data directory (`scan`, leftovers already removed) and creates the
   * configured ones that are missing; `elsewhere` names the volumes of the other role, which groups may name.
   */
  async start(config: DaemonConfig, scan: Scan, elsewhere: ReadonlySet<string>): Promise<void> {
    const plan = planVolumes(config, scan, elsewhere);
    for (const { name, dir, problem } of plan.broken) {
      const wanted = config.volumes[name] ?? {};
      this.addBroken({ kind: 'error', name, dir, record: null, wanted, options: null, error: problemOf('ERECORD', problem), cause: undefined }, 'opened');
    }
    await eachBounded(plan.existing, volumeOpenConcurrency, ({ name, dir, record, wanted }) => this.openExisting(name, dir, record, wanted, 'opened'));
    await eachBounded(plan.create, volumeOpenConcurrency, async ({ name, wanted }) => {
      await this.createConfigured(name, wanted);
    });
    this.groupsValue = plan.groups;
  }

  get names(): string[] {
    return [...this.entries.keys()].sort();
  }

  has(name: string): boolean {
    return this.entries.has(name) || this.creating.has(name);
  }

  views(): VolumeView[] {
    return this.names.map((name) => this.view(this.entries.get(name)!));
  }

  viewOf(name: string): VolumeView {
    return this.view(this.lookup(name));
  }

  /** The engine volume of an open volume, for a caller that embeds the daemon. */
  volumeOf(name: string): Volume {
    const entry = this.lookup(name);
    if (entry.kind !== 'open') throw unavailable(entry);
    return entry.volume;
  }

  groups(): GroupView[] {
    return [...this.groupsValue].sort(([a], [b]) => a.localeCompare(b)).map(([name, volumes]) => ({ name, volumes: [...volumes] }));
  }

  /** Settles once every control operation requested so far has (shutdown waits for them). */
  idle(): Promise<void> {
    return this.order.idle();
  }

  /** Closes every open volume (the NBD server has already stopped); resolves with the first failure, if any. */
  closeAll(): Promise<unknown> {
    return closeOpenVolumes(this.entries, this.context.logger);
  }

  private lookup(name: string): Entry {
    const entry = this.entries.get(name);
    if (entry === undefined) throw new ApiError('not_found', `no such volume: ${name}`);
    return entry;
  }

  private refuseWhenClosing(): void {
    if (this.context.closing()) throw new ApiError('unavailable', 'the daemon is shutting down');
  }

  /** Runs a control operation in the order of `names` (see ordering.ts). */
  private ordered<T>(names: readonly string[], operation: () => Promise<T>): Promise<T> {
    try {
      this.refuseWhenClosing();
    } catch (error) {
      return Promise.reject(error);
    }
    return this.order.run(names, operation);
  }

  // Opening, creating and serving.

  private async openExisting(name: string, dir: string, record: VolumeRecord, wanted: VolumeConfig, how: 'opened' | 'recovered'): Promise<Entry> {
    let options: ResolvedVolumeOptions | null = null;
    try {
      options = volumeOptions(dir, record, wanted);
      const volume = await openVolume(options);
      return this.serve({ kind: 'open', name, dir, record, wanted, options, volume }, how);
    } catch (error) {
      const problem = problemOf(errorCodeOf(error), (error as Error).message);
      return this.addBroken({ kind: 'error', name, dir, record, wanted, options, error: problem, cause: error }, how);
    }
  }

  /**
   * Creates a volume: its directory appears whole (registry.ts), the engine makes its files there, and
   * any failure removes it again, so a failed creation leaves nothing behind.
   */
  private async createVolume(name: string, wanted: VolumeConfig, keepSettings: boolean): Promise<OpenEntry> {
    const { dataDir, logger } = this.context;
    const record = newVolumeRecord(name, wanted, keepSettings);
    const dir = await createVolumeDir(dataDir, record);
    let volume: Volume | undefined;
    try {
      const options = volumeOptions(dir, record, wanted);
      volume = await openVolume(options);
      await finishCreation(dir);
      return this.serve({ kind: 'open', name, dir, record, wanted, options, volume }, 'created');
    } catch (error) {
      await volume?.close().catch((closeError: unknown) => logger.error({ err: closeError, volume: name }, 'closing a volume whose creation failed'));
      await discardVolume(dataDir, dir, name).catch((discardError: unknown) =>
        logger.error({ err: discardError, volume: name, dir }, 'removing a volume whose creation failed'),
      );
      throw error;
    }
  }

  /** A configured volume that is missing: created, or shown in state `error` when that fails. */
  private async createConfigured(name: string, wanted: VolumeConfig): Promise<Entry> {
    try {
      return await this.createVolume(name, wanted, false);
    } catch (error) {
      let record: VolumeRecord | null = null;
      try {
        record = newVolumeRecord(name, wanted, false);
      } catch {
        // Options the engine refuses: the error says which.
      }
      const problem = problemOf(errorCodeOf(error), `creating volume ${name} failed: ${(error as Error).message}`);
      return this.addBroken({ kind: 'error', name, dir: null, record, wanted, options: null, error: problem, cause: error }, 'created');
    }
  }

  private serve(opened: Omit<OpenEntry, 'secondaryExport'>, how: 'opened' | 'created' | 'recovered'): OpenEntry {
    const { nbd, metrics, logger } = this.context;
    const { name, volume } = opened;
    const entry: OpenEntry = { ...opened, secondaryExport: new SwappableDevice(volume.secondary) };
    const log = logger.child({ volume: name });
    const forward = <E extends EventName>(event: E, level: 'debug' | 'info' | 'warn', message: string) => (data: object) => {
      log[level](data, message);
      this.context.publish(event, name, { ...data });
    };
    volume.on('checkpoint', forward('checkpoint', 'info', 'checkpoint'));
    volume.on('flushed', forward('flushed', 'debug', 'flushed'));
    volume.on('pressure', forward('pressure', 'warn', 'memory pressure: checkpoint soon'));
    volume.on('failover', forward('failover', 'warn', 'failed over'));
    volume.on('failover-durable', forward('failover-durable', 'info', 'failover durable'));
    volume.on('failover-applied', forward('failover-applied', 'info', 'failover applied to the backing file'));
    if (volume instanceof ReplicatedVolume) volume.on('split-brain', forward('split-brain', 'warn', 'split brain: a primary that wrote since it split from this volume was refused'));
    volume.on('error', (error) => {
      const code = errorCodeOf(error);
      log.error({ err: error, code }, 'volume error');
      metrics.onVolumeError(name, code);
      this.context.publish('error', name, { code, message: error.message });
    });
    metrics.addVolume(name, volume);
    nbd.addExport(`${name}/primary`, volume.primary, { description: `gannet volume ${name}: primary view (the PVM's forwarded writes)` });
    nbd.addExport(`${name}/secondary`, entry.secondaryExport, { description: `gannet volume ${name}: secondary view (the SVM's disk)` });
    this.entries.set(name, entry);
    const stats = volume.stats();
    log.info(
      { sizeBytes: stats.sizeBytes, strategy: stats.strategy, epoch: stats.epoch, state: stats.state, ...(stats.error && { error: stats.error }) },
      `${how} volume`,
    );
    this.context.publish('volume-added', name, { how, state: stats.state });
    return entry;
  }

  private addBroken(entry: BrokenEntry, how: 'opened' | 'created' | 'recovered'): BrokenEntry {
    const { metrics, logger } = this.context;
    this.entries.set(entry.name, entry);
    metrics.addBrokenVolume(entry.name);
    metrics.onVolumeError(entry.name, entry.error.code);
    logger.error({ volume: entry.name, code: entry.error.code, err: entry.cause ?? undefined, dir: entry.dir }, `volume not served: ${entry.error.message}`);
    this.context.publish('error', entry.name, { code: entry.error.code, message: entry.error.message, how });
    return entry;
  }

  private view(entry: Entry): VolumeView {
    const { name } = entry;
    const exports = { primary: `${name}/primary`, secondary: `${name}/secondary` };
    if (entry.kind === 'error') {
      return {
        name,
        role: 'secondary',
        exports,
        uris: { primary: [], secondary: [] },
        strategy: entry.record?.strategy ?? 'unknown',
        state: 'error',
        error: { ...entry.error },
        ...(entry.record !== null && { sizeBytes: entry.record.sizeBytes, blockBytes: entry.record.blockBytes }),
      };
    }
    const { nbd, nbdAddresses } = this.context;
    const stats = entry.volume.stats();
    return {
      name,
      role: 'secondary',
      exports,
      uris: {
        primary: nbdAddresses.map((address) => nbdUri(address, exports.primary, { tls: this.context.tlsRequired })),
        secondary: nbdAddresses.map((address) => nbdUri(address, exports.secondary, { tls: this.context.tlsRequired })),
      },
      strategy: stats.strategy,
      // A split brain holds whatever the volume was doing (failed over, most often) until it is resolved.
      state: stats.splitBrain !== undefined ? 'split-brain' : stats.state,
      ...(stats.volumeId !== undefined && { volumeId: stats.volumeId }),
      instance: instanceOf(entry.volume),
      ...(stats.error !== undefined && { error: { ...stats.error } }),
      ...(stats.failoverTarget !== undefined && { failoverTarget: stats.failoverTarget }),
      ...(stats.failover !== undefined && { failover: { ...stats.failover } }),
      ...(stats.lostFailover !== undefined && { lostFailover: { ...stats.lostFailover } }),
      sizeBytes: stats.sizeBytes,
      blockBytes: entry.options.blockBytes,
      epoch: stats.epoch,
      durableEpoch: stats.durableEpoch,
      bufferedBytes: { ...stats.bufferedBytes },
      spilledBytes: stats.spilledBytes,
      tornRanges: stats.tornRanges.map((range) => ({ offset: range.offset, length: range.length })),
      inconsistent: stats.inconsistent !== undefined,
      ...(stats.inconsistent !== undefined && { inconsistentSince: stats.inconsistent.since }),
      ...(stats.generation !== undefined && { generation: stats.generation }),
      ...(stats.splitBrain !== undefined && { splitBrain: stats.splitBrain }),
      clients: nbd.exportConnectionCount(exports.primary) + nbd.exportConnectionCount(exports.secondary),
    };
  }

  // Control operations.

  /**
   * Checkpoints the named volumes (and the members of named groups) atomically as one group. With no
   * names: every volume that can take one, as one group, and says which it left out and why.
   */
  checkpoint(names?: string[]): Promise<CheckpointResult> {
    if (names === undefined) {
      const all = this.names;
      return this.ordered(all, () => this.checkpointAll(all));
    }
    const chosen: string[] = [];
    for (const name of names) {
      const members = this.groupsValue.get(name) ?? [name];
      if (!this.entries.has(name) && !this.groupsValue.has(name)) {
        return Promise.reject(new ApiError('not_found', `no such volume or group: ${name}`));
      }
      chosen.push(...members);
    }
    const unique = [...new Set(chosen)];
    return this.ordered(unique, async () => {
      const volumes = unique.map((name) => {
        const entry = this.lookup(name);
        if (entry.kind !== 'open') throw unavailable(entry);
        const stats = entry.volume.stats();
        if (stats.state !== 'replicating') {
          const detail = stats.failoverTarget !== undefined ? ` (to ${stats.failoverTarget})` : '';
          throw new ApiError('conflict', `cannot checkpoint volume ${name}: it is ${stats.state}${detail}`);
        }
        return entry.volume;
      });
      const epochs = await this.checkpointVolumes(volumes);
      this.context.logger.info({ volumes: unique, epochs }, 'checkpoint requested');
      return { volumes: unique.map((name, index) => checkpointed(name, volumes[index], epochs[index])) };
    });
  }

  private async checkpointAll(names: readonly string[]): Promise<CheckpointResult> {
    const chosen: { name: string; volume: Volume }[] = [];
    const skipped: { name: string; reason: string }[] = [];
    for (const name of names) {
      const entry = this.entries.get(name);
      if (entry === undefined) continue;
      if (entry.kind !== 'open') {
        skipped.push({ name, reason: `error ${entry.error.code}: ${entry.error.message}` });
        continue;
      }
      const stats = entry.volume.stats();
      if (stats.state !== 'replicating') {
        skipped.push({ name, reason: stats.failoverTarget !== undefined ? `${stats.state} (to ${stats.failoverTarget})` : stats.state });
      } else if (stats.error !== undefined) {
        // Its checkpoint would be refused until the error heals, and would fail the whole group with it.
        skipped.push({ name, reason: `error ${stats.error.code}: ${stats.error.message}` });
      } else {
        chosen.push({ name, volume: entry.volume });
      }
    }
    // The baselines have no atomic group checkpoint; alone they are checkpointed as usual.
    const grouped = chosen.length > 1 ? chosen.filter(({ name, volume }) => {
      const strategy = volume.stats().strategy;
      if (strategy === 'gannet') return true;
      skipped.push({ name, reason: `strategy ${strategy} has no atomic group checkpoint (checkpoint it by name)` });
      return false;
    }) : chosen;
    const epochs = await this.checkpointVolumes(grouped.map(({ volume }) => volume));
    const volumes = grouped.map(({ name, volume }, index) => checkpointed(name, volume, epochs[index]));
    this.context.logger.info({ volumes, skipped }, 'checkpoint of every volume requested');
    return { volumes, skipped };
  }

  private async checkpointVolumes(volumes: readonly Volume[]): Promise<number[]> {
    if (volumes.length === 0) return [];
    if (volumes.length === 1) return [await volumes[0].checkpoint()];
    const epochs = await checkpointGroup(volumes);
    if (epochs.length !== volumes.length) throw new Error(`checkpointGroup returned ${epochs.length} epochs for ${volumes.length} volumes`);
    return epochs;
  }

  failover(name: string, to: FailoverTarget, force: boolean): Promise<VolumeView> {
    this.lookup(name);
    return this.ordered([name], async () => {
      const entry = this.lookup(name);
      if (entry.kind !== 'open') throw unavailable(entry);
      this.context.logger.warn({ volume: name, to, force }, 'failover requested');
      await entry.volume.failover({ to, force });
      return this.view(entry);
    });
  }

  /**
   * `POST /v1/volumes/:name/peer`: a primary attaches. Every NBD connection to NAME/primary is closed
   * first, its requests in flight finished (peerFenceGraceMs at most), so that nothing an earlier session
   * of a primary still sends reaches the volume after the state answered here was read. An attach of a
   * link older than the last one of that link is refused, and fences nothing.
   */
  attachPeer(name: string, from?: PeerAttachRequest, generation: Generation | null = null): Promise<PeerAttachView> {
    this.lookup(name);
    return this.ordered([name], async () => {
      const exportName = `${name}/primary`;
      // A failed-over gannet volume answers too: the primary compares generations and learns it is stale
      // (or split from it), then refuses the session itself.
      const target = this.attachTargetOf(name);
      // A split brain is refused before anything else, and fences no connection.
      if (target instanceof ReplicatedVolume) await target.acceptPrimary(generation);
      const last = this.attached.get(name);
      if (from !== undefined && last !== undefined && last.link === from.link && from.attempt <= last.attempt) {
        throw new ApiError('conflict', `volume ${name}: attempt ${from.attempt} of this primary's link is stale: attempt ${last.attempt} has attached since`);
      }
      if (from !== undefined) this.attached.set(name, { link: from.link, attempt: from.attempt });
      await this.context.nbd.closeExportConnections(exportName, { graceMs: peerFenceGraceMs });
      // Read after the fence: a failover or a halt meanwhile is seen.
      const volume = this.attachTargetOf(name);
      const stats = volume.stats();
      const instance = instanceOf(volume);
      this.context.logger.info({ volume: name, instance, epoch: stats.epoch, durableEpoch: stats.durableEpoch }, 'primary attached');
      return {
        volumeId: volume instanceof ReplicatedVolume ? volume.volumeId : instance,
        instance,
        sizeBytes: stats.sizeBytes,
        state: stats.state,
        epoch: stats.epoch,
        durableEpoch: stats.durableEpoch,
        tornRanges: stats.tornRanges.map((range) => ({ offset: range.offset, length: range.length })),
        inconsistent: volume instanceof ReplicatedVolume ? stats.inconsistent !== undefined : baselineLink(volume).inconsistent,
        generation: stats.generation ?? null,
        nbd: {
          export: exportName,
          addresses: this.context.nbdAddresses.map((address) => ('path' in address ? { path: address.path } : { host: address.host, port: address.port })),
          tls: this.context.tlsRequired,
        },
      };
    });
  }

  /** `PUT /v1/volumes/:name/inconsistent`: a primary's resync began (true) or its last checkpoint is durable (false). */
  setInconsistent(name: string, inconsistent: boolean, generation?: Generation): Promise<VolumeView> {
    this.lookup(name);
    return this.ordered([name], async () => {
      const volume = this.peerTargetOf(name, inconsistent ? 'be marked inconsistent' : 'be marked consistent');
      if (volume instanceof ReplicatedVolume) await volume.setInconsistent(inconsistent, generation);
      else baselineLink(volume).inconsistent = inconsistent;
      this.context.logger.info(
        { volume: name, inconsistent, ...(generation !== undefined && { generation }) },
        inconsistent ? 'marked inconsistent: a resync from the primary began' : 'marked consistent: the resync is durable',
      );
      return this.viewOf(name);
    });
  }

  /**
   * The open gannet volume `name`, for a promotion (run in the volume's order by the caller), or a
   * conflict saying why it cannot be promoted.
   */
  promotable(name: string): { dir: string; record: VolumeRecord; volume: ReplicatedVolume; secondaryExport: SwappableDevice; wanted: VolumeConfig } {
    const entry = this.lookup(name);
    if (entry.kind !== 'open') throw new ApiError('conflict', `volume ${name} cannot change role: it is in error (${entry.error.code}): ${entry.error.message}`);
    if (!(entry.volume instanceof ReplicatedVolume)) {
      throw new ApiError('conflict', `volume ${name} cannot change role: its strategy ${entry.volume.stats().strategy} is a baseline with no replication`);
    }
    return { dir: entry.dir, record: entry.record, volume: entry.volume, secondaryExport: entry.secondaryExport, wanted: entry.wanted };
  }

  /**
   * Takes a volume out of the set for a promotion (in its order): NAME/primary goes, its connections
   * closed (a primary forwarding to it is stale from now on), and NAME/secondary stays served, for the
   * primary role to take over. The caller closes the volume.
   */
  async release(name: string, options: { keepSecondary: boolean } = { keepSecondary: true }): Promise<void> {
    const { nbd, metrics } = this.context;
    this.lookup(name);
    this.entries.delete(name);
    this.attached.delete(name);
    metrics.removeVolume(name);
    await nbd.removeExport(`${name}/primary`, { graceMs: exportCloseGraceMs });
    if (!options.keepSecondary) await nbd.removeExport(`${name}/secondary`, { graceMs: 0 });
  }

  /** Serves again a volume whose promotion failed before its role changed (in its order). */
  async reopen(name: string, dir: string, record: VolumeRecord, wanted: VolumeConfig): Promise<void> {
    await this.openExisting(name, dir, record, wanted, 'opened');
  }

  /** `POST /v1/volumes/:name/digests`: digests of the primary view for a primary's full sync. */
  digests(name: string, offset: number, length: number): Promise<DigestsView> {
    this.lookup(name);
    return this.ordered([name], async () => {
      const volume = this.peerTargetOf(name, 'answer digests');
      const digests = volume instanceof ReplicatedVolume ? await volume.digests(offset, length) : await deviceDigests(volume.primary, offset, length);
      return { instance: instanceOf(volume), chunkBytes: digestChunkBytes, digestBytes, digests: Buffer.from(digests).toString('base64') };
    });
  }

  /** An open gannet volume, in any state, or a conflict saying why it cannot `what`. */
  private gannetOf(name: string, what: string): ReplicatedVolume {
    const entry = this.lookup(name);
    if (entry.kind !== 'open') throw new ApiError('conflict', `volume ${name} cannot ${what}: it is in error (${entry.error.code}): ${entry.error.message}`);
    if (!(entry.volume instanceof ReplicatedVolume)) {
      throw new ApiError('conflict', `volume ${name} cannot ${what}: its strategy ${entry.volume.stats().strategy} is a baseline with no replication link`);
    }
    return entry.volume;
  }

  /** What a primary attaches to: a gannet volume in any state (see attachPeer), or a replicating baseline (see BaselineLink). */
  private attachTargetOf(name: string): Volume {
    const entry = this.lookup(name);
    if (entry.kind === 'open' && entry.volume instanceof ReplicatedVolume) return entry.volume;
    return this.peerTargetOf(name, 'take a primary');
  }

  /** A replicating volume that takes a primary's calls: gannet, or a baseline (see BaselineLink); or a conflict saying why it cannot `what`. */
  private peerTargetOf(name: string, what: string): Volume {
    const entry = this.lookup(name);
    if (entry.kind !== 'open') throw new ApiError('conflict', `volume ${name} cannot ${what}: it is in error (${entry.error.code}): ${entry.error.message}`);
    if (entry.volume instanceof ReplicatedVolume) return this.replicatedOf(name, what);
    const { state } = entry.volume.stats();
    if (state !== 'replicating') throw new ApiError('conflict', `volume ${name} cannot ${what}: it is ${state}, not replicating, and takes no forwarded writes`);
    return entry.volume;
  }

  /** A gannet volume that is replicating, or a conflict saying why it cannot `what`. */
  private replicatedOf(name: string, what: string): ReplicatedVolume {
    const volume = this.gannetOf(name, what);
    const { state, failoverTarget } = volume.stats();
    if (state !== 'replicating') {
      const detail = failoverTarget !== undefined ? ` (to ${failoverTarget})` : '';
      throw new ApiError('conflict', `volume ${name} cannot ${what}: it is ${state}${detail}, not replicating, and takes no forwarded writes`);
    }
    return volume;
  }

  /** `POST /v1/volumes`: the body has the config file's fields for one volume, plus its name. */
  create(body: unknown): Promise<VolumeView> {
    let name: string;
    let wanted: VolumeConfig;
    try {
      this.refuseWhenClosing();
      if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new ApiError('bad_request', 'body: expected an object', 'body');
      name = validate(createNameSchema, body).name;
      const { name: _name, ...fields } = body as Record<string, unknown>;
      if (fields.sizeBytes === undefined) throw new ApiError('bad_request', 'sizeBytes: required (bytes, or e.g. 64M, 20G)', 'sizeBytes');
      wanted = validate(volumeConfigSchema, fields);
      if (this.entries.has(name) || this.creating.has(name)) throw new ApiError('conflict', `volume ${name} already exists`);
      if (this.groupsValue.has(name)) throw new ApiError('conflict', `${name} is the name of a group`);
    } catch (error) {
      return Promise.reject(error);
    }
    this.creating.add(name);
    return this.ordered([name], async () => {
      try {
        const entry = await this.createVolume(name, wanted, true);
        this.context.metrics.onVolumeAdded();
        return this.view(entry);
      } catch (error) {
        throw creationError(error);
      } finally {
        this.creating.delete(name);
      }
    });
  }

  /**
   * Deletes a volume: refused while an NBD client uses it or while it holds committed data not yet in
   * its backing file, unless `force`. Its exports go first (their connections are closed cleanly), then
   * the volume is closed, then its directory is moved aside, or deleted with `purge`.
   */
  remove(name: string, { force, purge }: { force: boolean; purge: boolean }): Promise<RemoveResult> {
    this.lookup(name);
    return this.ordered([name], async () => {
      const { nbd, dataDir, logger, metrics } = this.context;
      const entry = this.lookup(name);
      const stuck = entry.dir !== null && (await present(entry.dir)) ? await unmovable(dataDir, entry.dir) : undefined;
      if (stuck !== undefined) throw new ApiError('conflict', `volume ${name} cannot be deleted: ${stuck}`);
      let closeError: string | undefined;
      if (entry.kind === 'open') {
        const exports = [`${name}/primary`, `${name}/secondary`];
        const clients = force ? connectedClients(nbd, exports) : await clientsAfterGrace(nbd, exports);
        if (clients > 0 && !force) {
          throw new ApiError('conflict', `volume ${name} has ${clients} NBD client(s) connected: disconnect them first, or force (which closes them)`);
        }
        const stats = entry.volume.stats();
        if (stats.state === 'replicating' && stats.bufferedBytes.committed > 0 && !force) {
          throw new ApiError(
            'conflict',
            `volume ${name} has ${stats.bufferedBytes.committed} bytes of committed data not yet in its backing file: wait for the flush, or force`,
          );
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
      this.attached.delete(name);
      metrics.onVolumeRemoved(name);
      const movedTo = entry.dir !== null ? await retireDirectory(dataDir, entry.dir, name, purge, logger) : undefined;
      logger.warn({ volume: name, purged: purge, movedTo }, 'deleted volume');
      this.context.publish('volume-removed', name, { purged: purge, ...(movedTo !== undefined && { movedTo }) });
      return { name, purged: purge, ...(movedTo !== undefined && { movedTo }), ...(closeError !== undefined && { closeError }) };
    });
  }

  /**
   * Rebuilds the metadata store of a volume in error because of it (EMETA) from the volume's state file
   * (ReplicatedVolume.recover), then opens and serves it. README.md says when that is safe.
   */
  recover(name: string): Promise<RecoverResult> {
    this.lookup(name);
    return this.ordered([name], async () => {
      const entry = this.lookup(name);
      if (entry.kind === 'open') throw new ApiError('conflict', `volume ${name} is ${entry.volume.stats().state}: only a volume in error is recovered`);
      if (entry.error.code !== 'EMETA') {
        throw new ApiError('conflict', `volume ${name} is in error ${entry.error.code}: recover rebuilds a lost or damaged metadata store (EMETA) only`);
      }
      if (lockedByAnotherProcess(entry.cause)) {
        throw new ApiError('conflict', `the metadata store of volume ${name} is locked by another process: stop it (another gannet daemon?) instead`);
      }
      if (entry.options === null || entry.record === null || entry.dir === null || entry.record.strategy !== 'gannet') {
        throw new ApiError('conflict', `volume ${name} has no metadata store to recover (strategy ${entry.record?.strategy ?? 'unknown'})`);
      }
      const recovered = await ReplicatedVolume.recover(entry.options);
      this.context.logger.warn({ volume: name, ...recovered }, 'rebuilt the volume metadata from its state file');
      this.context.metrics.removeVolume(name);
      const reopened = await this.openExisting(name, entry.dir, entry.record, entry.wanted, 'recovered');
      if (reopened.kind !== 'open') throw unavailable(reopened);
      return { volume: this.view(reopened), recovered };
    });
  }

  /**
   * Applies a reread config file: adds the volumes it names that are not served, takes its groups, and
   * reports the rest (volumes it no longer names are kept; limits of open volumes apply when they are
   * next opened, since the engine takes them only then). A contradiction is refused before anything changes.
   */
  reload(config: DaemonConfig, elsewhere: ReadonlySet<string>): Promise<VolumeReload> {
    return this.ordered([reloadKey], async () => {
      const configured = Object.entries(config.volumes);
      const known = new Set([...this.entries.keys(), ...configured.map(([name]) => name), ...elsewhere]);
      /** `found`: the volume's directory exists (put back by an operator), with its record or what is wrong with it. */
      const add: { name: string; wanted: VolumeConfig; found: VolumeRecord | string | null }[] = [];
      const restartNeeded: string[] = [];
      for (const [name, wanted] of configured) {
        const entry = this.entries.get(name);
        if (entry === undefined || (entry.kind === 'error' && entry.dir === null)) {
          if (this.creating.has(name)) continue;
          const dir = volumeDir(this.context.dataDir, name);
          let found: VolumeRecord | string | null = null;
          if (await present(dir)) found = await readVolumeRecord(dir, name).catch((error: Error) => error.message);
          if (typeof found === 'object' && found !== null) checkIdentity(name, dir, found, wanted);
          add.push({ name, wanted, found });
          continue;
        }
        if (entry.record !== null && entry.dir !== null) checkIdentity(name, entry.dir, entry.record, wanted);
        if (entry.kind === 'open') {
          const next = volumeOptions(entry.dir, entry.record, wanted);
          for (const field of volumeLimitFields) {
            if (next[field] !== entry.options[field]) restartNeeded.push(`volumes.${name}.${field}`);
          }
        }
      }
      const groups = new Map<string, string[]>();
      for (const [group, members] of Object.entries(config.groups)) {
        if (known.has(group)) throw new ApiError('bad_request', `groups.${group}: "${group}" is also a volume's name`, `groups.${group}`);
        members.forEach((member, index) => {
          if (!known.has(member)) throw new ApiError('bad_request', `groups.${group}.${index}: no volume "${member}"`, `groups.${group}.${index}`);
        });
        groups.set(group, [...members]);
      }
      const groupsChanged = JSON.stringify([...groups].sort()) !== JSON.stringify([...this.groupsValue].sort());
      this.groupsValue = groups;
      const added: string[] = [];
      const failed: ReloadResult['failed'] = [];
      await eachBounded(add, volumeOpenConcurrency, async ({ name, wanted, found }) => {
        this.creating.add(name);
        const dir = volumeDir(this.context.dataDir, name);
        try {
          const entry = await this.order.run([name], async () => {
            // A role change that ran meanwhile put the volume in the other set: it is served there.
            if (this.context.heldElsewhere(name)) return null;
            if (found === null) return this.createConfigured(name, wanted);
            if (typeof found === 'string') {
              const problem = problemOf('ERECORD', found);
              return this.addBroken({ kind: 'error', name, dir, record: null, wanted, options: null, error: problem, cause: undefined }, 'opened');
            }
            return this.openExisting(name, dir, found, wanted, 'opened');
          });
          if (entry === null) return;
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
      return { added: added.sort(), failed, notInConfig, restartNeeded, groupsChanged };
    });
  }
}

/** A creation through the API that failed: a size the file system cannot hold is the request's fault. */
function creationError(error: unknown): unknown {
  const code = errorCodeOf(error);
  const message = (error as Error)?.message ?? String(error);
  if (code === 'EFBIG') return new ApiError('bad_request', `sizeBytes: the file system cannot hold a file this large: ${message}`, 'sizeBytes');
  if ((error as { code?: unknown }).code === 'EMISMATCH') return new ApiError('unavailable', message, undefined, code);
  return error;
}

export function problemOf(code: string, message: string): VolumeErrorView {
  return { code, message, since: new Date().toISOString() };
}

/** A volume in error cannot take the operation: 503, with its error as the reason. */
function unavailable(entry: BrokenEntry): ApiError {
  return new ApiError('unavailable', `volume ${entry.name} is in error (${entry.error.code}): ${entry.error.message}`, undefined, entry.error.code);
}

export async function present(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * A deleted volume's directory, purged or moved aside with a timestamp (returned). A failure is a 503: the
 * volume is no longer served, and its directory stays where it was for the next start to serve again.
 */
export async function retireDirectory(dataDir: string, dir: string, name: string, purge: boolean, logger: Logger): Promise<string | undefined> {
  try {
    if (!(await present(dir))) return undefined;
    if (purge) {
      await discardVolume(dataDir, dir, name);
      return undefined;
    }
    return await moveAside(dataDir, dir, name);
  } catch (error) {
    logger.error({ err: error, volume: name, dir }, 'moving a deleted volume aside failed');
    throw new ApiError(
      'unavailable',
      `volume ${name} is closed and no longer served, but its directory ${dir} could not be ${purge ? 'purged' : 'moved aside'}: ${(error as Error).message}`,
      undefined,
      errorCodeOf(error),
    );
  }
}

/** NBD connections on `exports` now. */
export function connectedClients(nbd: NbdServer, exports: readonly string[]): number {
  return exports.reduce((n, exportName) => n + nbd.exportConnectionCount(exportName), 0);
}

/**
 * NBD connections on `exports`, once those going have gone: a client that has just disconnected is
 * noticed when the main thread reads its socket again, so with clients connected this waits for them
 * to close, clientDisconnectGraceMs at most, before it counts.
 */
export async function clientsAfterGrace(nbd: NbdServer, exports: readonly string[]): Promise<number> {
  if (connectedClients(nbd, exports) === 0) return 0;
  let timer: NodeJS.Timeout | undefined;
  const grace = new Promise<void>((resolve) => {
    timer = setTimeout(resolve, clientDisconnectGraceMs);
  });
  await Promise.race([Promise.all(exports.map((exportName) => nbd.exportConnectionsClosed(exportName))), grace]);
  clearTimeout(timer);
  return connectedClients(nbd, exports);
}

/** Closes the open volumes of a set, in name order; resolves with the first failure, if any. */
export async function closeOpenVolumes(
  entries: ReadonlyMap<string, { readonly kind: 'open'; readonly volume: { close(): Promise<void> } } | { readonly kind: 'error' }>,
  logger: Logger,
): Promise<unknown> {
  let failure: unknown;
  for (const name of [...entries.keys()].sort()) {
    const entry = entries.get(name)!;
    if (entry.kind !== 'open') continue;
    try {
      await entry.volume.close();
      logger.info({ volume: name }, 'closed volume');
    } catch (error) {
      logger.error({ err: error, volume: name }, 'closing volume failed');
      failure ??= error;
    }
  }
  return failure;
}
