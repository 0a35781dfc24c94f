import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import {
  AbstractBlockDevice,
  BlockDeviceError,
  MiB,
  toBlockDeviceError,
  zeroes,
  type BlockDevice,
  type Capabilities,
  type Extent,
  type ZeroRequest,
} from '@gannet/block-device';
import { z } from 'zod';
import { ActivityLog } from './activity-log.js';
import { InvariantError } from './assert.js';
import { chunkDigest } from './digest.js';
import { BlockBitmap } from './dirty.js';
import { GannetError, PeerIsPrimaryError, SplitBrainError } from './errors.js';
import {
  compareGenerations,
  copyGeneration,
  generationSchema,
  newGeneration,
  nextGeneration,
  sameGeneration,
  unknownGeneration,
  type Generation,
} from './generation.js';
import { Order, Tally, type Turn } from './inflight.js';
import type { KvStore } from './kv.js';
import { digestBytes, digestChunkBytes, type Peer, type PeerSession } from './link.js';
import { checkRole } from './role-file.js';
import { activityExtentBytes, dirtyBlockBytes, type PrimaryOptions, type ResolvedPrimaryOptions } from './options.js';
import { parsePrimaryOptions } from './parse.js';
import { fileStorage, type Storage } from './storage.js';
import type { VolumeError } from './types.js';

/**
 * The primary role: the PVM's disk on its own host, every change forwarded to the peer's NAME/primary.
 *
 * Data path. A write marks its blocks dirty, makes their extents hot in the activity log (activity-log.ts:
 * durable before the local disk is touched, so a crash never forgets a block that may differ), then goes
 * to the local disk and to the peer at once. In `peer` ack mode the VM hears back once both answered; in
 * `local` mode once the local disk did, the forward following from a copy, bounded by forwardBytesMax.
 * Overlapping requests keep their order on both disks (inflight.ts). A forward that fails or times out
 * drops the link: the block joins `unsent`, and the VM never sees the peer's trouble.
 *
 * Dirty map. A block stays dirty until the peer has made it durable: the blocks forwarded between two of
 * our checkpoints form an interval; a checkpoint seals the interval, waits for every forward started
 * before it, and checkpoints the peer, which answers the epoch N it began; once the peer's durable epoch
 * reaches N the interval is clean. So the dirty set is `unsent` + the open interval + the sealed ones not
 * yet durable + what a resync is sending, and the activity log persists it by extent.
 *
 * Link. A loop connects to the peer (backoff on failure), compares generations (generation.ts: a newer
 * peer fences this side, a split brain is refused and stored), checks it (size, state), resyncs, and
 * waits for the session to break. A peer that answers nothing for peerTimeoutMs is hung, and is dropped
 * too. Resync sends what may differ: `unsent`, the peer's torn ranges, and, if the peer lost its buffers
 * (a new instance), every interval it had not made durable; a different peer volume, or one whose
 * generation is unknown, gets a full sync that compares digests and sends only the chunks that differ.
 * The peer is marked inconsistent first (it refuses to fail over onto a half-synced disk); the blocks go
 * in order with the VM's own writes, rate-limited, with a checkpoint every resyncCheckpointBytes and one
 * at the end; once that one is durable on the peer, the mark is cleared, the peer adopts this side's
 * generation, and the volume is replicating again.
 */

/**
 * `fenced`: the peer failed over (its volume is the disk now) and this side did not write since they
 * split, so it is stale: it refuses writes from then on, across restarts, rather than diverge from the
 * survivor. `split-brain`: both sides wrote since they split (generation.ts): the link is refused and
 * nothing is sent until the peer's data is discarded (its generation becomes unknown); writes still go
 * to the local disk, as while degraded. Both persist across restarts.
 */
export type PrimaryState = 'replicating' | 'degraded' | 'resyncing' | 'fenced' | 'split-brain' | 'closed' | 'halted';
export type LinkState = 'connecting' | 'up' | 'down' | 'refused';

export interface ResyncStatus {
  readonly full: boolean;
  /**
   * A full sync compares digests (csums-alg style): `comparedBytes` went over by digest, of those
   * `sameBytes` were equal on both sides and not sent.
   */
  readonly comparedBytes: number;
  readonly sameBytes: number;
  /** Bytes to go over, bytes gone over (as data or as zero requests), and of those, sent as data. */
  readonly bytesTotal: number;
  readonly bytesDone: number;
  readonly dataBytes: number;
  /** Data sent per second so far. */
  readonly bytesPerSecond: number;
  readonly startedAt: string;
}

export interface PrimaryStats {
  readonly role: 'primary';
  readonly state: PrimaryState;
  readonly volumeId: string;
  readonly sizeBytes: number;
  readonly ackMode: 'peer' | 'local';
  readonly link: { readonly state: LinkState; readonly peer: string; readonly since: string; readonly error?: string };
  /** Bytes forwarded and not yet acknowledged by the peer. */
  readonly inflightBytes: number;
  /** Bytes that may differ from the peer's durable disk (whole dirty blocks). */
  readonly dirtyBytes: number;
  /** Of those, bytes written while the peer was away, waiting for a resync. */
  readonly unsentBytes: number;
  readonly resync?: ResyncStatus;
  /** The last resync that finished. */
  readonly lastResync?: {
    readonly full: boolean;
    readonly bytesDone: number;
    readonly dataBytes: number;
    readonly comparedBytes: number;
    readonly sameBytes: number;
    readonly durationMs: number;
    readonly endedAt: string;
  };
  /** Bytes every resync since the volume opened went over, and of those, sent as data (the rest as zero requests). */
  readonly resyncBytesTotal: number;
  readonly resyncDataBytesTotal: number;
  /** The epoch the peer began at our last checkpoint, and the highest it reported durable. */
  readonly peerEpoch: number | null;
  readonly peerDurableEpoch: number | null;
  readonly activityExtents: number;
  /** This volume's lineage (generation.ts). */
  readonly generation: Generation;
  /** Both histories of a split brain with the peer, and since when (state `split-brain`). */
  readonly splitBrain?: { readonly local: Generation; readonly peer: Generation; readonly since: string };
  readonly error?: VolumeError;
}

export interface PrimaryEvents {
  link: [{ state: LinkState; peer: string; error?: string }];
  state: [{ state: PrimaryState }];
  checkpoint: [{ epoch: number; pauseMs: number }];
  durable: [{ epoch: number }];
  'resync-start': [{ full: boolean; bytes: number }];
  'resync-done': [{ full: boolean; bytes: number; dataBytes: number; comparedBytes: number; sameBytes: number; durationMs: number }];
  'split-brain': [{ local: Generation; peer: Generation }];
  error: [Error];
}

/** What the primary's metadata store holds besides the activity log (prefix p/). */
const key = { identity: 'p/identity', peer: 'p/peer', fenced: 'p/fenced', generation: 'p/generation', splitBrain: 'p/split-brain' } as const;
const fencedSchema = z.object({ since: z.string(), reason: z.string() }).strict();
/**
 * The primary's generation, and whether it moved on since the peer last adopted it (`diverged`: the
 * next write while not replicating needs no new id).
 */
const primaryGenerationSchema = z
  .object({ current: z.string().regex(/^[0-9a-f]{16}$/), history: generationSchema.shape.history, diverged: z.boolean() })
  .strict();
const splitBrainSchema = z.object({ since: z.string(), peer: generationSchema }).strict();
export type PrimaryGenerationRecord = z.output<typeof primaryGenerationSchema>;
/** The primary role's metadata directory inside dataDir. */
export const primaryMetaDirName = 'primary-meta';
const metaDirName = primaryMetaDirName;
const identitySchema = z.object({ uuid: z.uuid(), sizeBytes: z.number().int().positive(), createdAt: z.string() }).strict();
const syncedPeerSchema = z.object({ volumeId: z.string().min(1) }).strict();

/** Chunks of the disk that order overlapping requests (inflight.ts): a 4K write takes one. */
const orderChunkBytes = 64 * 1024;
const resyncChunkBytes = 1 * MiB;
const resyncChunksInFlight = 4;
const durablePollMs = 200;
/** Sealed intervals kept apart; beyond it the oldest two merge (the later epoch clears both). */
const intervalsMax = 32;

/** What one resync chunk sent as data, compared by digest, and found equal on the peer. */
interface ChunkSent {
  readonly dataBytes: number;
  readonly comparedBytes: number;
  readonly sameBytes: number;
}

interface Interval {
  readonly bits: BlockBitmap;
  /** The epoch the peer began at the checkpoint that sealed it; null while open or if that failed. */
  epoch: number | null;
}

export interface PrimaryOpenContext {
  readonly storage?: Storage;
}

export class PrimaryVolume extends EventEmitter<PrimaryEvents> {
  /** The PVM's disk: export it as NAME. */
  readonly device: BlockDevice;
  readonly sizeBytes: number;
  readonly volumeId: string;
  readonly options: ResolvedPrimaryOptions;

  private readonly blocksPerExtent = activityExtentBytes / dirtyBlockBytes;
  private readonly al: ActivityLog;
  private readonly localOrder = new Order(orderChunkBytes);
  private readonly peerOrder = new Order(orderChunkBytes);
  /** Writes (both halves) and resync chunks in flight: a checkpoint waits for those before it. */
  private readonly inflight = new Tally();
  private current: Interval;
  private readonly intervals: Interval[] = [];
  private readonly unsent: BlockBitmap;
  private resyncing: BlockBitmap | null = null;

  private state: PrimaryState = 'degraded';
  private link: { state: LinkState; since: string; error?: string } = { state: 'connecting', since: new Date().toISOString() };
  private session: PeerSession | null = null;
  private sessionEnded: (() => void) | null = null;
  /** The peer volume this disk was last fully synced to (persisted), and the peer instance last seen. */
  private syncedPeer: string | null;
  private peerInstance: string | null = null;
  private peerEpoch: number | null = null;
  private peerDurable: number | null = null;
  private resync: {
    full: boolean;
    bytesTotal: number;
    bytesDone: number;
    dataBytes: number;
    comparedBytes: number;
    sameBytes: number;
    startedMs: number;
    startedAt: string;
  } | null = null;
  private resyncBytesTotal = 0;
  private resyncDataBytesTotal = 0;
  private lastResync: NonNullable<PrimaryStats['lastResync']> | null = null;

  /** Local ack mode: bytes copied for forwards not yet acknowledged, and writes waiting for room. */
  private forwardBytes = 0;
  private roomWaiters: (() => void)[] = [];
  /** The hung-peer watchdog of the session: calls in flight, and when the peer last answered. */
  /** Calls in flight on the session by id, with when each began (oldest first), and when the last settled. */
  private watched: { readonly session: PeerSession; readonly pending: Map<number, number>; nextId: number; quietSince: number; readonly timer: NodeJS.Timeout } | null = null;
  private durablePoll: NodeJS.Timeout | null = null;

  private checkpoints: Promise<unknown> = Promise.resolve();
  private error: VolumeError | null = null;
  private closing: Promise<void> | null = null;
  private wakeLoop: (() => void) | null = null;
  private readonly loop: Promise<void>;
  /** Storing the fenced mark; close waits for it. */
  private fencing: Promise<void> = Promise.resolve();
  private generation: PrimaryGenerationRecord;
  /** A new generation being made durable: every write that needs one waits for the same. */
  private bumping: Promise<void> | null = null;
  private generationOps: Promise<unknown> = Promise.resolve();
  private splitBrain: { readonly peer: Generation; readonly since: string } | null;

  private constructor(
    options: ResolvedPrimaryOptions,
    volumeId: string,
    private readonly local: BlockDevice,
    private readonly kv: KvStore,
    private readonly peer: Peer,
    syncedPeer: string | null,
    logged: Awaited<ReturnType<typeof ActivityLog.load>>,
    fenced: z.output<typeof fencedSchema> | null,
    generation: PrimaryGenerationRecord,
    splitBrain: z.output<typeof splitBrainSchema> | null,
  ) {
    super();
    this.generation = generation;
    this.splitBrain = splitBrain;
    this.options = options;
    this.sizeBytes = options.sizeBytes;
    this.volumeId = volumeId;
    this.syncedPeer = syncedPeer;
    this.current = this.newInterval();
    this.unsent = new BlockBitmap(this.blocksPerExtent);
    // After a crash every block of a logged extent may differ; the persisted bits say which others do.
    for (const e of logged.hot) this.unsent.add(e * this.blocksPerExtent, (e + 1) * this.blocksPerExtent);
    for (const [e, bits] of logged.bitmaps) this.unsent.orExtent(e, bits);
    this.trimToDisk(this.unsent);
    this.al = new ActivityLog(kv, 'p/', options.activityExtentsMax, (e) => this.dirtyBits(e), () => local.flush(), logged);
    this.device = new PrimaryDevice(this.sizeBytes, local, {
      write: (src, offset, length, fua, noHole) => this.write(src, offset, length, fua, noHole).catch((err: unknown) => this.guard(err)),
      flush: () => this.flush(),
    });
    if (fenced !== null) {
      this.state = 'fenced';
      this.error = { code: 'EFENCED', message: fenced.reason, since: fenced.since };
    } else if (splitBrain !== null) {
      this.state = 'split-brain';
      this.error = { code: 'ESPLITBRAIN', message: splitBrainMessage(generation, splitBrain.peer), since: splitBrain.since };
    }
    this.loop = this.run();
  }

  /**
   * Opens the primary volume: its backing file (created sparse when new) and its metadata store in
   * dataDir. A backing file that exists without metadata is refused unless `adoptBacking` is set (then
   * the peer gets a full sync); metadata without its backing file is refused. The link starts at once.
   */
  static async open(input: PrimaryOptions, peer: Peer, context: PrimaryOpenContext = {}): Promise<PrimaryVolume> {
    const options = parsePrimaryOptions(input);
    const storage = context.storage ?? fileStorage;
    await checkRole(storage, options.dataDir, 'primary');
    const metaPath = join(options.dataDir, metaDirName);
    const [backingExists, metaExists] = await Promise.all([storage.exists(options.path), storage.exists(metaPath)]);
    if (metaExists && !backingExists) {
      throw new GannetError('EMETA', `the backing file ${options.path} is missing, but ${metaPath} describes a volume that had one: refusing to start it empty`);
    }
    if (backingExists && !metaExists && !options.adoptBacking) {
      throw new GannetError(
        'EMETA',
        `${options.path} exists but has no primary metadata in ${metaPath}: set adoptBacking to take it as this volume's disk (the peer then gets a full sync)`,
      );
    }
    await mkdir(options.dataDir, { recursive: true });
    const local = await storage.openBacking(options.path, options.sizeBytes, { create: true });
    let kv: KvStore | null = null;
    try {
      kv = await storage.openMeta(metaPath, { create: true });
      const [identityBytes, peerBytes, fencedBytes, generationBytes, splitBrainBytes] = await kv.getMany([key.identity, key.peer, key.fenced, key.generation, key.splitBrain]);
      let identity = identityBytes === undefined ? null : readJson(identitySchema, identityBytes, key.identity);
      if (identity === null) {
        identity = { uuid: randomUUID(), sizeBytes: options.sizeBytes, createdAt: new Date().toISOString() };
        await kv.batch([{ type: 'put', key: key.identity, value: Buffer.from(JSON.stringify(identity)) }], { sync: true });
      } else if (identity.sizeBytes !== options.sizeBytes) {
        throw new GannetError('EMISMATCH', `the primary volume in ${metaPath} is ${identity.sizeBytes} bytes, the options say ${options.sizeBytes}`);
      }
      const synced = peerBytes === undefined ? null : readJson(syncedPeerSchema, peerBytes, key.peer).volumeId;
      const fenced = fencedBytes === undefined ? null : readJson(fencedSchema, fencedBytes, key.fenced);
      let generation = generationBytes === undefined ? null : readJson(primaryGenerationSchema, generationBytes, key.generation);
      if (generation === null) {
        // A new volume, or one stored before generations: a lineage of its own, not yet on any peer.
        generation = { ...newGeneration(), diverged: true } as PrimaryGenerationRecord;
        await kv.batch([{ type: 'put', key: key.generation, value: Buffer.from(JSON.stringify(generation)) }], { sync: true });
      }
      const splitBrain = splitBrainBytes === undefined ? null : readJson(splitBrainSchema, splitBrainBytes, key.splitBrain);
      const logged = await ActivityLog.load(kv, 'p/', activityExtentBytes / dirtyBlockBytes / 32);
      return new PrimaryVolume(options, identity.uuid, local, kv, peer, synced, logged, fenced, generation, splitBrain);
    } catch (err) {
      await kv?.close().catch(() => undefined);
      await local.close().catch(() => undefined);
      throw err;
    }
  }

  stats(): PrimaryStats {
    const dirty = this.dirtyUnion();
    const r = this.resync;
    return {
      role: 'primary',
      state: this.state,
      volumeId: this.volumeId,
      sizeBytes: this.sizeBytes,
      ackMode: this.options.ackMode,
      link: { state: this.link.state, peer: this.peer.address, since: this.link.since, ...(this.link.error !== undefined ? { error: this.link.error } : {}) },
      inflightBytes: this.forwardBytes,
      dirtyBytes: this.clip(dirty),
      unsentBytes: this.clip(this.unsent),
      ...(r !== null
        ? {
            resync: {
              full: r.full,
              comparedBytes: r.comparedBytes,
              sameBytes: r.sameBytes,
              bytesTotal: r.bytesTotal,
              bytesDone: r.bytesDone,
              dataBytes: r.dataBytes,
              bytesPerSecond: Math.round(r.dataBytes / Math.max(0.001, (performance.now() - r.startedMs) / 1000)),
              startedAt: r.startedAt,
            },
          }
        : {}),
      ...(this.lastResync !== null ? { lastResync: { ...this.lastResync } } : {}),
      resyncBytesTotal: this.resyncBytesTotal,
      resyncDataBytesTotal: this.resyncDataBytesTotal,
      peerEpoch: this.peerEpoch,
      peerDurableEpoch: this.peerDurable,
      activityExtents: this.al.hotExtents,
      generation: publicGeneration(this.generation),
      ...(this.splitBrain !== null ? { splitBrain: { local: publicGeneration(this.generation), peer: copyGeneration(this.splitBrain.peer), since: this.splitBrain.since } } : {}),
      ...(this.error !== null ? { error: { ...this.error } } : {}),
    };
  }

  /**
   * Checkpoints the peer and returns the epoch it began: every write acknowledged before the call is in
   * the peer's committed state when it returns, the point a Remus-style replicator releases its output
   * on. Refused (EPEER) while the peer is away, and (ESTATE) while a resync has the peer's disk half-way.
   */
  checkpoint(): Promise<number> {
    const run = this.checkpoints.then(() => this.checkpointNow(false));
    this.checkpoints = run.catch(() => undefined);
    return run;
  }

  /** Stops the link, waits for requests in flight, persists the exact dirty map, closes disk and store. */
  close(): Promise<void> {
    this.closing ??= this.closeNow();
    return this.closing;
  }

  // ---- data path (PrimaryDevice calls these; the base class has checked the request) ----

  /** `src` null writes zeroes (write-zeroes and trim). */
  private async write(src: Uint8Array | null, offset: number, length: number, fua: boolean, noHole: boolean): Promise<void> {
    if (this.state === 'halted') throw new BlockDeviceError('EIO', `the volume is halted: ${this.error?.message}`);
    if (this.state === 'fenced') throw new BlockDeviceError('EIO', `the volume is fenced: ${this.error?.message}`);
    const first = Math.floor(offset / dirtyBlockBytes);
    const end = Math.ceil((offset + length) / dirtyBlockBytes);
    const marked = this.current;
    marked.bits.add(first, end);
    const admitted = this.al.admit(Math.floor(first / this.blocksPerExtent), Math.floor((end - 1) / this.blocksPerExtent) + 1);
    if (admitted !== null) {
      try {
        await admitted;
      } catch (err) {
        throw toBlockDeviceError(err, 'recording the write in the activity log');
      }
    }
    // The first write since the peer was last in sync that it may not get: a new generation, durable
    // before this write is acknowledged, so that a peer that fails over meanwhile finds a split brain.
    if (this.state !== 'replicating' && !this.generation.diverged) {
      try {
        await this.bumpGeneration();
      } catch (err) {
        throw toBlockDeviceError(err, 'recording a new generation');
      }
    }
    const awaitPeer = this.options.ackMode === 'peer';
    let data = src;
    if (!awaitPeer && src !== null && this.session !== null) {
      await this.roomFor(length);
      data = src.slice();
    }
    const localTurn = this.localOrder.enter(offset, length);
    const peerTurn = this.peerOrder.enter(offset, length);
    const generation = this.inflight.enter();
    const local = this.writeLocal(localTurn, src, offset, length, fua, noHole);
    const remote = this.forward(peerTurn, marked, data, offset, length, first, end, noHole, !awaitPeer && data !== null ? length : 0);
    void Promise.allSettled([local, remote]).then(() => this.inflight.leave(generation));
    if (!awaitPeer) return local;
    const [done, sent] = await Promise.allSettled([local, remote]);
    if (done.status === 'rejected') throw done.reason;
    // The peer refused this very write because it failed over: the VM must not go on as if it landed.
    if ((this.state as PrimaryState) === 'fenced') throw new BlockDeviceError('EIO', `the volume is fenced: ${this.error?.message}`);
    // The link broke under this write: it is acknowledged from the local disk alone, a write while
    // degraded like those after it, so it moves the generation first (a peer that fails over meanwhile
    // must find a split brain, not a stale primary whose acknowledged write a resync would undo).
    if (sent.status === 'fulfilled' && !sent.value) {
      try {
        await this.bumpGeneration();
      } catch (err) {
        throw toBlockDeviceError(err, 'recording a new generation');
      }
    }
  }

  private bumpGeneration(): Promise<void> {
    this.bumping ??= this.storeGeneration(() =>
      this.generation.diverged ? null : { ...(nextGeneration(this.generation) as { current: string; history: string[] }), diverged: true },
    ).finally(() => {
      this.bumping = null;
    });
    return this.bumping;
  }

  /** Generation changes one at a time, so the store and memory see them in the same order. */
  private storeGeneration(next: () => PrimaryGenerationRecord | null): Promise<void> {
    const run = this.generationOps.then(async () => {
      const record = next();
      if (record === null) return;
      await this.kv.batch([{ type: 'put', key: key.generation, value: Buffer.from(JSON.stringify(record)) }], { sync: true });
      this.generation = record;
    });
    this.generationOps = run.catch(() => undefined);
    return run;
  }

  /**
   * The peer is about to adopt our generation (a resync settles): from here a write while not
   * replicating needs a new id again. Stored before the peer adopts, so a crash between the two only
   * costs an id more, never one less.
   */
  private async convergeGeneration(): Promise<Generation> {
    let converged: Generation | null = null;
    await this.storeGeneration(() => {
      converged = publicGeneration(this.generation);
      return this.generation.diverged ? { ...this.generation, diverged: false } : null;
    });
    return converged!;
  }

  /** Local fdatasync, and in local ack mode the peer's acknowledgement of every forward before it. */
  private async flush(): Promise<void> {
    if (this.state === 'fenced') throw new BlockDeviceError('EIO', `the volume is fenced: ${this.error?.message}`);
    const forwarded = this.options.ackMode === 'local' ? this.inflight.barrier() : null;
    await this.local.flush();
    if (forwarded !== null) await forwarded;
  }

  private async writeLocal(turn: Turn, src: Uint8Array | null, offset: number, length: number, fua: boolean, noHole: boolean): Promise<void> {
    try {
      if (turn.before !== null) await turn.before;
      // Trim becomes a zero: the local disk and the peer must read the same afterwards.
      if (src === null) await this.local.writeZeroes(offset, length, { fua, noHole });
      else await this.local.write(src, offset, fua ? { fua } : undefined);
    } finally {
      turn.leave();
    }
  }

  /**
   * Sends one write to the peer; never rejects: a failure drops the link and leaves the blocks unsent.
   * Resolves whether the peer took it.
   */
  private async forward(
    turn: Turn,
    marked: Interval,
    data: Uint8Array | null,
    offset: number,
    length: number,
    first: number,
    end: number,
    noHole: boolean,
    copiedBytes: number,
  ): Promise<boolean> {
    const session = this.session;
    if (session === null) {
      turn.leave();
      this.unsent.add(first, end);
      return false;
    }
    this.forwardBytes += copiedBytes;
    try {
      if (turn.before !== null) await turn.before;
      if (this.session !== session) throw new GannetError('EPEER', 'the link dropped');
      // Sent after a checkpoint sealed the interval it was marked in: it may be in the peer's next epoch.
      if (this.current !== marked) this.current.bits.add(first, end);
      await this.call(session, data === null ? session.device.writeZeroes(offset, length, noHole ? { noHole } : undefined) : session.device.write(data, offset));
      return true;
    } catch (err) {
      this.unsent.add(first, end);
      // Before failover the peer's NAME/primary takes every write into memory; only a failed-over (or
      // read-only) export refuses one with EPERM.
      if ((err as { code?: unknown }).code === 'EPERM') this.peerFailedOver(session, 'the peer refused a forwarded write (EPERM): it failed over');
      else this.linkFailed(session, err);
      this.unsentAfterResync(session);
      return false;
    } finally {
      turn.leave();
      if (copiedBytes > 0) this.releaseRoom(copiedBytes);
    }
  }

  private roomFor(bytes: number): Promise<void> | void {
    if (this.forwardBytes + bytes <= this.options.forwardBytesMax || this.forwardBytes === 0) return;
    return new Promise<void>((resolve) => this.roomWaiters.push(resolve)).then(() => this.roomFor(bytes));
  }

  private releaseRoom(bytes: number): void {
    this.forwardBytes -= bytes;
    if (this.forwardBytes < 0) this.halt(new InvariantError(`forwarded bytes went negative (${this.forwardBytes})`));
    const waiters = this.roomWaiters;
    this.roomWaiters = [];
    for (const w of waiters) w();
  }

  // ---- the peer: calls with a watchdog, the link loop, checkpoints, durability ----

  /**
   * A call on the session, watched: a peer that leaves any one call unanswered for peerTimeoutMs is
   * dropped, even while it answers others (one lost request would otherwise hold every later checkpoint).
   */
  private call<T>(session: PeerSession, work: Promise<T>): Promise<T> {
    const watched = this.watch(session);
    const id = watched.nextId++;
    watched.pending.set(id, performance.now());
    const settled = (): void => {
      watched.pending.delete(id);
      watched.quietSince = performance.now();
    };
    return work.then(
      (v) => {
        settled();
        return v;
      },
      (err: unknown) => {
        settled();
        throw err;
      },
    );
  }

  private watch(session: PeerSession): NonNullable<PrimaryVolume['watched']> {
    if (this.watched?.session === session) return this.watched;
    this.stopWatch();
    const period = Math.max(10, Math.floor(this.options.peerTimeoutMs / 4));
    const timer = setInterval(() => {
      const w = this.watched;
      if (w === null || this.session !== w.session) return this.stopWatch();
      const now = performance.now();
      const oldest = w.pending.values().next();
      if (!oldest.done && now - oldest.value > this.options.peerTimeoutMs) {
        this.linkFailed(w.session, new GannetError('EPEER', `the peer ${this.peer.address} left a request unanswered for ${Math.round(now - oldest.value)} ms`));
      } else if (w.pending.size === 0 && now - w.quietSince > this.options.peerTimeoutMs) {
        // An idle link is probed, so that a peer that died or restarted while nothing was sent shows as
        // degraded at once, not at the VM's next write.
        const { session } = w;
        this.call(session, session.durableEpoch()).then(
          (durableEpoch) => {
            if (this.session === session) this.noteDurable(durableEpoch);
          },
          (err: unknown) => this.linkFailed(session, err),
        );
      }
    }, period);
    timer.unref();
    this.watched = { session, pending: new Map(), nextId: 0, quietSince: performance.now(), timer };
    return this.watched;
  }

  private stopWatch(): void {
    if (this.watched === null) return;
    clearInterval(this.watched.timer);
    this.watched = null;
  }

  /**
   * A write of an earlier session failed after a newer session began its resync, which took its copy of
   * the unsent blocks before this one joined them: the newer session is dropped too, so that the next one
   * sends it.
   */
  private unsentAfterResync(failed: PeerSession): void {
    const current = this.session;
    if (current !== null && current !== failed) {
      this.linkFailed(current, new GannetError('EPEER', 'a write of an earlier session to the peer failed after this session began: resyncing again'));
    }
  }

  private linkFailed(session: PeerSession, err: unknown): void {
    if (this.session !== session) return;
    this.session = null;
    session.abort();
    this.stopWatch();
    this.setLink('down', err);
    if (this.state !== 'halted' && this.state !== 'closed' && this.state !== 'fenced' && this.state !== 'split-brain') this.setState('degraded');
    this.sessionEnded?.();
  }

  private async run(): Promise<void> {
    let delay = this.options.peerReconnectMs;
    while (this.closing === null && this.state !== 'halted' && this.state !== 'fenced') {
      this.setLink('connecting');
      let session: PeerSession;
      try {
        session = await this.connect();
      } catch (err) {
        // The peer compared generations first and refused: it moved on as we did.
        if (err instanceof SplitBrainError) await this.enterSplitBrain(err.secondary);
        if (err instanceof PeerIsPrimaryError) {
          const relation = compareGenerations(this.generation, err.peer);
          if (relation === 'peer-newer') {
            this.fence(null, `the peer's volume became a primary (generation ${err.peer.current}) and this one did not write since they split: it is stale`);
            break;
          }
          if (relation === 'split-brain') await this.enterSplitBrain(err.peer);
        }
        this.setLink(err instanceof SplitBrainError || err instanceof PeerIsPrimaryError ? 'refused' : 'down', err);
        await this.sleep(delay);
        delay = Math.min(delay * 2, this.options.peerReconnectMsMax);
        continue;
      }
      // Halted or fenced while connecting: the session must not bring the volume back.
      const now = this.state as PrimaryState;
      if (now === 'halted' || now === 'fenced') {
        session.abort();
        break;
      }
      const relation = compareGenerations(this.generation, session.info.generation);
      // A split brain is left only for a peer whose data was discarded (its generation unknown).
      if (relation === 'split-brain' || (this.state === 'split-brain' && relation !== 'unknown')) {
        session.abort();
        await this.enterSplitBrain(session.info.generation ?? unknownGeneration);
        this.setLink('refused', new GannetError('ESPLITBRAIN', this.error?.message ?? 'split brain'));
        await this.sleep(delay);
        delay = Math.min(delay * 2, this.options.peerReconnectMsMax);
        continue;
      }
      if (relation === 'peer-newer') {
        const how = session.info.state === 'failed-over' ? 'failed over' : 'moved on';
        this.fence(session, `the peer's volume ${how} (generation ${session.info.generation?.current}) and this one did not write since they split: it is stale`);
        break;
      }
      const refusal = this.refusal(session);
      if (refusal !== null || this.closing !== null) {
        session.abort();
        if (refusal !== null) this.setLink('refused', new GannetError('EPEER', refusal));
        await this.sleep(delay);
        delay = Math.min(delay * 2, this.options.peerReconnectMsMax);
        continue;
      }
      delay = this.options.peerReconnectMs;
      const ended = new Promise<void>((resolve) => {
        this.sessionEnded = resolve;
      });
      this.session = session;
      this.watch(session);
      this.setLink('up');
      try {
        // The peer discarded its data: the split brain is resolved, and its disk gets a full digest sync.
        if (this.state === 'split-brain') await this.leaveSplitBrain();
        await this.resyncAll(session, relation === 'unknown');
      } catch (err) {
        if (err instanceof InvariantError) this.halt(err);
        this.linkFailed(session, err);
      }
      await ended;
      this.sessionEnded = null;
    }
  }

  /** Both sides wrote since they split: stored (a restart stays split), shown, emitted once per peer generation. */
  private async enterSplitBrain(peer: Generation): Promise<void> {
    if (this.state === 'halted' || this.state === 'fenced' || this.closing !== null) return;
    if (this.splitBrain !== null && sameGeneration(this.splitBrain.peer, peer)) return;
    const record = { since: this.splitBrain?.since ?? new Date().toISOString(), peer: copyGeneration(peer) };
    try {
      await this.kv.batch([{ type: 'put', key: key.splitBrain, value: Buffer.from(JSON.stringify(record)) }], { sync: true });
    } catch (err) {
      this.halt(err instanceof Error ? err : new Error(String(err)));
      return;
    }
    this.splitBrain = record;
    this.error = { code: 'ESPLITBRAIN', message: splitBrainMessage(this.generation, peer), since: record.since };
    this.setState('split-brain');
    this.emit('split-brain', { local: publicGeneration(this.generation), peer: copyGeneration(peer) });
  }

  private async leaveSplitBrain(): Promise<void> {
    await this.kv.batch([{ type: 'del', key: key.splitBrain }], { sync: true });
    this.splitBrain = null;
    this.error = null;
    this.setState('degraded');
  }

  private async connect(): Promise<PeerSession> {
    let timer: NodeJS.Timeout | undefined;
    const connecting = this.peer.connect(publicGeneration(this.generation));
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new GannetError('EPEER', `no answer from ${this.peer.address} within ${this.options.peerTimeoutMs} ms`)), this.options.peerTimeoutMs);
    });
    try {
      return await Promise.race([connecting, timeout]);
    } catch (err) {
      // A session that opens after the deadline is dropped at once.
      connecting.then((s) => s.abort(), () => undefined);
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  private refusal(session: PeerSession): string | null {
    const { info } = session;
    if (info.sizeBytes !== this.sizeBytes) return `the peer's volume is ${info.sizeBytes} bytes, this one is ${this.sizeBytes}`;
    if (info.state !== 'replicating') return `the peer's volume is ${info.state}, not replicating: it takes no forwarded writes`;
    return null;
  }

  private sleep(ms: number): Promise<void> {
    return new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.wakeLoop = null;
        resolve();
      }, ms);
      this.wakeLoop = () => {
        clearTimeout(timer);
        this.wakeLoop = null;
        resolve();
      };
    });
  }

  private async checkpointNow(internal: boolean): Promise<number> {
    if (this.closing !== null) throw new GannetError('ESTATE', 'checkpoint: the volume is closed');
    if (this.state === 'halted') throw new GannetError('EHALTED', `checkpoint: the volume is halted: ${this.error?.message}`);
    if (this.state === 'fenced') throw new GannetError('EFENCED', `checkpoint: the volume is fenced: ${this.error?.message}`);
    if (this.state === 'split-brain') throw new GannetError('ESPLITBRAIN', `checkpoint: ${this.error?.message}`);
    const session = this.session;
    if (session === null) {
      throw new GannetError('EPEER', `checkpoint: the peer ${this.peer.address} is not connected (link ${this.link.state}${this.link.error ? `: ${this.link.error}` : ''}); the volume is degraded`);
    }
    if (!internal && this.state === 'resyncing') {
      // A resync that has just failed is over (resync null) before the link loop marks the volume degraded.
      const r = this.resync;
      const progress = r !== null ? `has gone over ${r.bytesDone} of ${r.bytesTotal} bytes` : 'is ending';
      throw new GannetError('ESTATE', `checkpoint: a resync ${progress}; the peer's disk is not whole until it ends`);
    }
    const start = performance.now();
    const sealed = this.current;
    this.current = this.newInterval();
    this.intervals.push(sealed);
    if (this.intervals.length > intervalsMax) {
      const [oldest, next] = this.intervals.splice(0, 2);
      next.bits.addAll(oldest.bits);
      this.intervals.unshift(next);
    }
    await this.inflight.barrier();
    if (this.session !== session) throw new GannetError('EPEER', `checkpoint: the link to ${this.peer.address} dropped`);
    let answer: { epoch: number; durableEpoch: number };
    try {
      answer = await this.call(session, session.checkpoint());
    } catch (err) {
      this.linkFailed(session, err);
      throw new GannetError('EPEER', `checkpoint: the peer ${this.peer.address} failed it: ${(err as Error).message}`, { cause: err });
    }
    sealed.epoch = answer.epoch;
    this.peerEpoch = answer.epoch;
    this.noteDurable(answer.durableEpoch);
    this.pollDurable(session);
    this.emit('checkpoint', { epoch: answer.epoch, pauseMs: performance.now() - start });
    return answer.epoch;
  }

  /** Intervals whose checkpoint the peer has made durable are clean. */
  private noteDurable(durableEpoch: number): void {
    if (this.peerDurable !== null && durableEpoch <= this.peerDurable) return;
    this.peerDurable = durableEpoch;
    const clean = this.intervals.filter((i) => i.epoch !== null && i.epoch <= durableEpoch);
    if (clean.length === 0) return;
    this.intervals.splice(0, this.intervals.length, ...this.intervals.filter((i) => !clean.includes(i)));
    const extents = new Set<number>();
    for (const i of clean) for (const e of i.bits.extentNumbers()) extents.add(e);
    this.al.trimCold(extents);
    this.emit('durable', { epoch: durableEpoch });
  }

  private pollDurable(session: PeerSession): void {
    if (this.durablePoll !== null) return;
    const tick = async (): Promise<void> => {
      this.durablePoll = null;
      if (this.session !== session || !this.intervals.some((i) => i.epoch !== null && i.epoch > (this.peerDurable ?? -1))) return;
      try {
        this.noteDurable(await this.call(session, session.durableEpoch()));
      } catch (err) {
        this.linkFailed(session, err);
        return;
      }
      this.pollDurable(session);
    };
    this.durablePoll = setTimeout(() => void tick(), durablePollMs);
  }

  // ---- resync ----

  private async resyncAll(session: PeerSession, unknown: boolean): Promise<void> {
    const { info } = session;
    const restarted = this.peerInstance !== info.instance;
    this.peerInstance = info.instance;
    if (unknown || this.syncedPeer !== info.volumeId) {
      await this.fullSync(session);
      return;
    }
    this.noteDurable(info.durableEpoch);
    const send = new BlockBitmap(this.blocksPerExtent);
    send.addAll(this.unsent);
    this.unsent.clear();
    // A new instance of the peer lost its buffers: whatever it had not made durable goes again, as does
    // an interval whose checkpoint failed (it is in no epoch we know of).
    for (const i of [...this.intervals]) {
      if (!restarted && i.epoch !== null) continue;
      send.addAll(i.bits);
      this.intervals.splice(this.intervals.indexOf(i), 1);
    }
    if (restarted) send.addAll(this.current.bits);
    for (const r of info.tornRanges) send.add(Math.floor(r.offset / dirtyBlockBytes), Math.ceil((r.offset + r.length) / dirtyBlockBytes));
    this.trimToDisk(send);
    if (send.isEmpty) {
      // An earlier resync sent everything but its last checkpoint was not durable when the link broke:
      // settle it now, so that the peer does not stay marked inconsistent (refusing failover) for good;
      // a peer behind our generation adopts it so.
      if (info.inconsistent || !sameGeneration(info.generation, publicGeneration(this.generation))) await this.settleResync(session);
      if (this.session === session) this.setState('replicating');
      return;
    }
    this.resyncing = send;
    try {
      this.beginResync(false, this.clip(send));
      await this.call(session, session.setInconsistent(true));
      await this.sendRuns(session, send.runs(), send);
      this.resyncing = null;
      await this.settleResync(session);
      this.endResync();
    } finally {
      if (this.resyncing === send) {
        this.unsent.addAll(send);
        this.resyncing = null;
      }
      this.resync = null;
    }
    if (this.session === session) this.setState('replicating');
  }

  /** The resync's last checkpoint, then, once it is durable on the peer, the peer is consistent again. */
  private async settleResync(session: PeerSession): Promise<void> {
    const epoch = await this.checkpointNow(true);
    while ((this.peerDurable ?? -1) < epoch) {
      if (this.session !== session) throw new GannetError('EPEER', 'the link dropped before the resync was durable on the peer');
      this.noteDurable(await this.call(session, session.durableEpoch()));
      if ((this.peerDurable ?? -1) < epoch) await this.sleep(durablePollMs);
    }
    const generation = await this.convergeGeneration();
    await this.call(session, session.setInconsistent(false, generation));
  }

  /**
   * Every byte of the disk, compared by digest (csums-alg style): the peer answers a digest per
   * digestChunkBytes chunk of its primary view, and only the chunks that differ are sent (as data, or as
   * zero requests when they read as zeroes here). A disk the peer already holds, stale or whole, costs
   * reads on both sides and only its differences on the link.
   */
  private async fullSync(session: PeerSession): Promise<void> {
    // All of the disk goes: what was dirty against an earlier peer means nothing to this one.
    this.unsent.clear();
    this.intervals.length = 0;
    this.peerEpoch = null;
    this.peerDurable = session.info.durableEpoch;
    this.beginResync(true, this.sizeBytes);
    try {
      await this.call(session, session.setInconsistent(true));
      await this.sendRuns(session, [[0, this.sizeBytes]], null);
      // The peer is ours only once the synced state is durable there: a crash before that syncs again.
      await this.settleResync(session);
      await this.kv.batch([{ type: 'put', key: key.peer, value: Buffer.from(JSON.stringify({ volumeId: session.info.volumeId })) }], { sync: true });
      this.syncedPeer = session.info.volumeId;
      this.endResync();
    } finally {
      this.resync = null;
    }
    if (this.session === session) this.setState('replicating');
  }

  private beginResync(full: boolean, bytes: number): void {
    this.resync = {
      full,
      bytesTotal: bytes,
      bytesDone: 0,
      dataBytes: 0,
      comparedBytes: 0,
      sameBytes: 0,
      startedMs: performance.now(),
      startedAt: new Date().toISOString(),
    };
    this.setState('resyncing');
    this.emit('resync-start', { full, bytes });
  }

  private endResync(): void {
    const r = this.resync!;
    const durationMs = performance.now() - r.startedMs;
    this.lastResync = {
      full: r.full,
      bytesDone: r.bytesDone,
      dataBytes: r.dataBytes,
      comparedBytes: r.comparedBytes,
      sameBytes: r.sameBytes,
      durationMs,
      endedAt: new Date().toISOString(),
    };
    this.emit('resync-done', { full: r.full, bytes: r.bytesDone, dataBytes: r.dataBytes, comparedBytes: r.comparedBytes, sameBytes: r.sameBytes, durationMs });
  }

  /**
   * Sends runs (block runs of `set`, or byte runs of the disk compared by digest when `set` is null) in
   * chunks, a few in flight; chunks that read as zeroes go as zero requests. Data is paced to
   * resyncBytesPerSecondMax, and the peer is checkpointed every resyncCheckpointBytes.
   */
  private async sendRuns(session: PeerSession, runs: Iterable<[number, number]>, set: BlockBitmap | null): Promise<void> {
    const inFlight = new Set<Promise<void>>();
    let failure: unknown = null;
    let sinceCheckpoint = 0;
    const progress = this.resync!;
    const launch = async (offset: number, length: number): Promise<void> => {
      while (inFlight.size >= resyncChunksInFlight) await Promise.race(inFlight);
      if (failure !== null) throw failure;
      if (this.session !== session) throw new GannetError('EPEER', 'the link dropped during the resync');
      const waitMs = progress.startedMs + (progress.dataBytes / this.options.resyncBytesPerSecondMax) * 1000 - performance.now();
      if (waitMs > 1) await this.sleep(waitMs);
      const chunk = (set === null ? this.compareChunk(session, offset, length) : this.sendChunk(session, offset, length, set)).then(
        (sent) => {
          progress.bytesDone += length;
          this.resyncBytesTotal += length;
          progress.dataBytes += sent.dataBytes;
          this.resyncDataBytesTotal += sent.dataBytes;
          progress.comparedBytes += sent.comparedBytes;
          progress.sameBytes += sent.sameBytes;
          sinceCheckpoint += sent.dataBytes;
        },
        (err: unknown) => {
          failure ??= err;
        },
      );
      inFlight.add(chunk);
      void chunk.finally(() => inFlight.delete(chunk));
      if (sinceCheckpoint >= this.options.resyncCheckpointBytes) {
        await Promise.all(inFlight);
        if (failure !== null) throw failure;
        sinceCheckpoint = 0;
        await this.checkpointNow(true);
      }
    };
    try {
      for (const run of runs) {
        const start = set === null ? run[0] : run[0] * dirtyBlockBytes;
        const end = Math.min(this.sizeBytes, set === null ? run[1] : run[1] * dirtyBlockBytes);
        for (let at = start; at < end; at += resyncChunkBytes) await launch(at, Math.min(resyncChunkBytes, end - at));
      }
    } finally {
      // A failed resync ends only once its chunks have: none of them outlives it into the next session.
      await Promise.all(inFlight);
    }
    if (failure !== null) throw failure;
  }

  /** One chunk of `set`, in order with the VM's writes. */
  private async sendChunk(session: PeerSession, offset: number, length: number, set: BlockBitmap): Promise<ChunkSent> {
    const first = Math.floor(offset / dirtyBlockBytes);
    const end = Math.ceil((offset + length) / dirtyBlockBytes);
    const localTurn = this.localOrder.enter(offset, length);
    const peerTurn = this.peerOrder.enter(offset, length);
    let data: Buffer | null = null;
    const generation = this.inflight.enter();
    try {
      try {
        if (localTurn.before !== null) await localTurn.before;
        data = Buffer.allocUnsafe(length);
        await this.local.read(data, offset);
        if (isZero(data)) data = null;
      } finally {
        localTurn.leave();
      }
      if (peerTurn.before !== null) await peerTurn.before;
      if (this.session !== session) throw new GannetError('EPEER', 'the link dropped during the resync');
      this.current.bits.add(first, end);
      await this.call(session, data === null ? session.device.writeZeroes(offset, length) : session.device.write(data, offset));
      set.remove(first, end);
      return { dataBytes: data === null ? 0 : length, comparedBytes: 0, sameBytes: 0 };
    } finally {
      peerTurn.leave();
      this.inflight.leave(generation);
    }
  }

  /**
   * One chunk of a full sync (digestChunkBytes-aligned), in order with the VM's writes: read here under
   * its local turn, the peer's digests asked under its peer turn (every earlier write has reached the
   * peer, no later one has), and only the sub-chunks whose digests differ are sent.
   */
  private async compareChunk(session: PeerSession, offset: number, length: number): Promise<ChunkSent> {
    const localTurn = this.localOrder.enter(offset, length);
    const peerTurn = this.peerOrder.enter(offset, length);
    const generation = this.inflight.enter();
    try {
      const data = Buffer.allocUnsafe(length);
      try {
        if (localTurn.before !== null) await localTurn.before;
        await this.local.read(data, offset);
      } finally {
        localTurn.leave();
      }
      if (peerTurn.before !== null) await peerTurn.before;
      if (this.session !== session) throw new GannetError('EPEER', 'the link dropped during the resync');
      const digests = await this.call(session, session.digests(offset, length));
      const chunks = Math.ceil(length / digestChunkBytes);
      if (digests.byteLength !== chunks * digestBytes) {
        throw new GannetError('EPEER', `the peer answered ${digests.byteLength} bytes of digests for ${chunks} chunks at ${offset}`);
      }
      const theirs = Buffer.from(digests.buffer, digests.byteOffset, digests.byteLength);
      let dataBytes = 0;
      let sameBytes = 0;
      for (let i = 0; i < chunks; i++) {
        const piece = data.subarray(i * digestChunkBytes, Math.min(length, (i + 1) * digestChunkBytes));
        if (chunkDigest(piece).equals(theirs.subarray(i * digestBytes, (i + 1) * digestBytes))) {
          sameBytes += piece.length;
          continue;
        }
        const at = offset + i * digestChunkBytes;
        this.current.bits.add(Math.floor(at / dirtyBlockBytes), Math.ceil((at + piece.length) / dirtyBlockBytes));
        if (isZero(piece)) {
          await this.call(session, session.device.writeZeroes(at, piece.length));
        } else {
          await this.call(session, session.device.write(piece, at));
          dataBytes += piece.length;
        }
      }
      return { dataBytes, comparedBytes: length, sameBytes };
    } finally {
      peerTurn.leave();
      this.inflight.leave(generation);
    }
  }

  // ---- state ----

  /** Drops blocks past the end of the disk (a logged extent may run past it). */
  private trimToDisk(set: BlockBitmap): void {
    const lastBlock = Math.ceil(this.sizeBytes / dirtyBlockBytes);
    let top = -1;
    for (const e of set.extentNumbers()) top = Math.max(top, e);
    const end = (top + 1) * this.blocksPerExtent;
    if (end > lastBlock) set.remove(lastBlock, end);
  }

  private newInterval(): Interval {
    return { bits: new BlockBitmap(this.blocksPerExtent), epoch: null };
  }

  /** One extent of the dirty set (a fresh array), for the activity log. */
  private dirtyBits(extent: number): Uint32Array | undefined {
    let out: Uint32Array | undefined;
    const or = (bits: Uint32Array | undefined): void => {
      if (bits === undefined) return;
      out ??= new Uint32Array(bits.length);
      for (let i = 0; i < bits.length; i++) out[i] |= bits[i];
    };
    or(this.unsent.extentBits(extent));
    or(this.current.bits.extentBits(extent));
    for (const i of this.intervals) or(i.bits.extentBits(extent));
    if (this.resyncing !== null) or(this.resyncing.extentBits(extent));
    return out;
  }

  private dirtyUnion(): BlockBitmap {
    const all = new BlockBitmap(this.blocksPerExtent);
    all.addAll(this.unsent);
    all.addAll(this.current.bits);
    for (const i of this.intervals) all.addAll(i.bits);
    if (this.resyncing !== null) all.addAll(this.resyncing);
    return all;
  }

  /** Bytes of a block set, the last block cut at the end of the disk. */
  private clip(set: BlockBitmap): number {
    const lastBlock = Math.ceil(this.sizeBytes / dirtyBlockBytes) - 1;
    const tail = this.sizeBytes - lastBlock * dirtyBlockBytes;
    return set.count * dirtyBlockBytes - (set.has(lastBlock) ? dirtyBlockBytes - tail : 0);
  }

  private setState(state: PrimaryState): void {
    // Halted and fenced are left only by closing (a reopen decides again).
    if (this.state === state || ((this.state === 'halted' || this.state === 'fenced') && state !== 'closed' && state !== 'halted')) return;
    this.state = state;
    this.emit('state', { state });
  }

  private setLink(state: LinkState, err?: unknown): void {
    const error = err === undefined ? undefined : err instanceof Error ? err.message : String(err);
    this.link = { state, since: new Date().toISOString(), ...(error !== undefined ? { error } : {}) };
    this.emit('link', { state, peer: this.peer.address, ...(error !== undefined ? { error } : {}) });
  }

  /**
   * The peer refused a forwarded write: it failed over. In ack mode `peer` this side is fenced at once.
   * In ack mode `local` writes were acknowledged before the peer had them and the next ones are written
   * here while degraded: the link drops, and the next connect compares generations to tell a stale side
   * (fenced) from a split brain.
   */
  private peerFailedOver(session: PeerSession, reason: string): void {
    if (this.options.ackMode === 'local') {
      this.linkFailed(session, new GannetError('EPEER', reason));
      return;
    }
    this.fence(session, reason);
  }

  /**
   * This side is stale: the session ends, writes and FLUSH fail with EIO from now on, and the mark is
   * stored, so a restart does not start writing again.
   */
  private fence(session: PeerSession | null, reason: string): void {
    if (this.state === 'fenced' || this.state === 'halted' || this.state === 'closed') return;
    const since = new Date().toISOString();
    this.error = { code: 'EFENCED', message: reason, since };
    this.setState('fenced');
    if (session !== null && this.session === session) {
      this.session = null;
      this.stopWatch();
      this.sessionEnded?.();
    }
    session?.abort();
    this.setLink('refused', new GannetError('EFENCED', reason));
    this.fencing = this.kv
      .batch([{ type: 'put', key: key.fenced, value: Buffer.from(JSON.stringify({ since, reason })) }], { sync: true })
      .catch((err: unknown) => this.halt(err instanceof Error ? err : new Error(String(err))));
  }

  private halt(err: Error): void {
    if (this.state === 'halted') return;
    this.error = { code: 'EHALTED', message: err.message, since: new Date().toISOString() };
    this.setState('halted');
    const session = this.session;
    if (session !== null) this.linkFailed(session, err);
    // As ReplicatedVolume: an 'error' nobody listens for would throw here, inside the link loop.
    if (this.listenerCount('error') > 0) this.emit('error', err);
  }

  private async closeNow(): Promise<void> {
    this.wakeLoop?.();
    await this.device.close();
    await this.inflight.barrier();
    const session = this.session;
    if (session !== null) {
      this.session = null;
      session.abort();
    }
    this.sessionEnded?.();
    await this.loop;
    this.stopWatch();
    if (this.durablePoll !== null) clearTimeout(this.durablePoll);
    let failure: unknown = null;
    await this.local.flush().catch((err: unknown) => (failure ??= err));
    if (this.state !== 'halted' && failure === null) await this.al.closeClean().catch((err: unknown) => (failure ??= err));
    this.state = 'closed';
    await this.local.close().catch((err: unknown) => (failure ??= err));
    await this.fencing;
    await this.kv.close().catch((err: unknown) => (failure ??= err));
    if (failure !== null) throw failure;
  }

  /** A broken invariant halts the volume: nothing more is written, locally or to the peer. */
  private guard(err: unknown): never {
    if (err instanceof InvariantError) this.halt(err);
    throw err;
  }
}

/** What a role change needs to know of a primary's metadata (role-change.ts). */
export interface PrimaryMetaSummary {
  readonly uuid: string;
  readonly sizeBytes: number;
  readonly generation: Generation;
}

/** Reads a closed primary volume's identity and generation; EMETA when its metadata is missing or damaged. */
export async function readPrimaryMeta(storage: Storage, dataDir: string): Promise<PrimaryMetaSummary> {
  const metaPath = join(dataDir, metaDirName);
  if (!(await storage.exists(metaPath))) throw new GannetError('EMETA', `${dataDir} has no primary metadata (${metaPath})`);
  const kv = await storage.openMeta(metaPath, { create: false });
  try {
    const [identityBytes, generationBytes] = await kv.getMany([key.identity, key.generation]);
    if (identityBytes === undefined) throw new GannetError('EMETA', `the primary's metadata ${metaPath} records no volume (key ${key.identity})`);
    const identity = readJson(identitySchema, identityBytes, key.identity);
    const generation = generationBytes === undefined ? null : readJson(primaryGenerationSchema, generationBytes, key.generation);
    return { uuid: identity.uuid, sizeBytes: identity.sizeBytes, generation: generation === null ? { current: null, history: [] } : publicGeneration(generation) };
  } finally {
    await kv.close();
  }
}

/**
 * Creates the metadata of a primary volume for an existing disk (a promotion, role-change.ts): its
 * identity and its generation, which has moved on from any peer's (no peer was synced to it yet).
 */
export async function createPrimaryMeta(storage: Storage, dataDir: string, init: { uuid: string; sizeBytes: number; generation: Generation }): Promise<void> {
  if (init.generation.current === null) throw new GannetError('ESTATE', 'a primary volume needs a known generation');
  const identity = { uuid: init.uuid, sizeBytes: init.sizeBytes, createdAt: new Date().toISOString() };
  const generation: PrimaryGenerationRecord = { current: init.generation.current, history: [...init.generation.history], diverged: true };
  const kv = await storage.openMeta(join(dataDir, metaDirName), { create: true });
  try {
    await kv.batch(
      [
        { type: 'put', key: key.identity, value: Buffer.from(JSON.stringify(identity)) },
        { type: 'put', key: key.generation, value: Buffer.from(JSON.stringify(generation)) },
      ],
      { sync: true },
    );
  } finally {
    await kv.close();
  }
}

const zeroCompareBytes = 1 * MiB;

function isZero(data: Buffer): boolean {
  const zero = zeroes(Math.min(zeroCompareBytes, data.length));
  for (let at = 0; at < data.length; at += zero.length) {
    const piece = data.subarray(at, Math.min(data.length, at + zero.length));
    if (piece.compare(zero, 0, piece.length) !== 0) return false;
  }
  return true;
}

/** The public part of the stored generation. */
function publicGeneration(g: PrimaryGenerationRecord): Generation {
  return { current: g.current, history: [...g.history] };
}

function splitBrainMessage(local: Generation, peer: Generation): string {
  return (
    `split brain: this volume (generation ${local.current}) and its peer (generation ${peer.current ?? 'unknown'}) both wrote since they split; ` +
    'nothing is resynced until the changes of one side are discarded'
  );
}

function readJson<T extends z.ZodType>(schema: T, bytes: Uint8Array, name: string): z.output<T> {
  let value: unknown;
  try {
    value = JSON.parse(Buffer.from(bytes).toString('utf8'));
  } catch {
    throw new GannetError('EMETA', `the primary's metadata is damaged: key ${name} is not JSON`);
  }
  const parsed = schema.safeParse(value);
  if (!parsed.success) throw new GannetError('EMETA', `the primary's metadata is damaged: key ${name}: ${parsed.error.issues[0].message}`);
  return parsed.data;
}

interface PrimaryHost {
  /** `src` null writes zeroes (write-zeroes and trim). */
  write(src: Uint8Array | null, offset: number, length: number, fua: boolean, noHole: boolean): Promise<void>;
  flush(): Promise<void>;
}

/** The PVM's disk as a BlockDevice: reads from the local disk, every change through the volume. */
class PrimaryDevice extends AbstractBlockDevice {
  constructor(
    size: number,
    private readonly local: BlockDevice,
    private readonly host: PrimaryHost,
  ) {
    super(size, local.blockSizes);
  }

  get capabilities(): Capabilities {
    const c = this.local.capabilities;
    return { ...c, readOnly: false, flush: true, fua: c.fua, trim: true, zero: true, fastZero: false, multiConn: true };
  }

  protected _read(buf: Uint8Array, offset: number): Promise<void> {
    return this.local.read(buf, offset);
  }

  protected _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    return this.host.write(data, offset, data.length, fua, false);
  }

  protected override _zero(offset: number, length: number, request: ZeroRequest): Promise<void> {
    return this.host.write(null, offset, length, request.fua, request.noHole);
  }

  protected override _trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.host.write(null, offset, length, fua, false);
  }

  protected override _flush(): Promise<void> {
    return this.host.flush();
  }

  protected override _extents(offset: number, length: number): Promise<Extent[]> {
    return this.local.extents(offset, length);
  }

  protected override _cache(offset: number, length: number): Promise<void> {
    return this.local.cache(offset, length);
  }
}
