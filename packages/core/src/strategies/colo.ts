import { EventEmitter } from 'node:events';
import { join } from 'node:path';
import { BlockDeviceError, type FileDevice, MiB } from '@gannet/block-device';
import { GannetError } from '../errors.js';
import type { VolumeOptions } from '../options.js';
import { parseVolumeOptions } from '../parse.js';
import type { FailoverTarget, Volume, VolumeEvents, VolumeState, VolumeStats } from '../types.js';
import { ClusterBitmap } from './cluster-bitmap.js';
import { readStrategyMeta, writeStrategyMeta, type StrategyMeta } from './strategy-meta.js';
import { RangeLock, type Release } from './range-lock.js';
import { diskView, openBackingFile, openScratchFile } from './disk.js';
import type { VolumeView } from '../view.js';

/**
 * The COLO baseline: QEMU's block replication (docs/block-replication.txt, block/replication.c) done
 * with files, so the benchmark can compare GANNET with the disk-buffer design it replaces.
 *
 * - Primary (forwarded PVM) write: copy-before-write. Every cluster it touches that has not been copied
 *   this epoch is read from the backing file and written to the sparse *hidden* file (QEMU's backup job
 *   with sync=none), then the write goes to the backing file. So backing = primary view, and hidden over
 *   backing = the last checkpoint.
 * - Secondary (SVM) write: to the sparse *active* file, cluster-granular (QEMU's active qcow2 disk); a
 *   partial write to a cluster not yet in active first fills the cluster from below (hidden, else
 *   backing). Secondary read: active, else hidden, else backing.
 * - Flush: fdatasync of the files the view wrote (primary: hidden and backing; secondary: active).
 * - Checkpoint: empty active and hidden (truncate to 0 and back: bdrv_make_empty); the backing file
 *   already holds the primary's writes, so it becomes the checkpoint.
 * - Failover: 'secondary' copies hidden then active into backing (active over hidden over backing
 *   becomes the disk, QEMU's active commit); 'checkpoint' copies hidden into backing (undoes the
 *   primary's writes); 'primary' keeps backing as it is. Then fdatasync, and both views are the backing
 *   file; the primary view refuses writes with EPERM.
 *
 * Cluster size is the volume's `blockBytes` (default 4 KiB). QEMU copies 64 KiB backup clusters into a
 * 64 KiB-cluster qcow2, so this baseline copies and fills less per small write than QEMU does: it is a
 * generous COLO, and speedups measured against it understate those against QEMU's.
 *
 * Metadata is the epoch and two in-memory bitmaps (one bit per cluster for hidden and for active), plus
 * a small file (strategy.json) written at failover and at close. An orderly close rolls the backing file
 * back to the last checkpoint (hidden copied into it), so a restart is at the checkpoint, as with every
 * strategy: the primary's and secondary's writes of an unfinished epoch are protected by replication,
 * not by this host. There is NO crash safety: the bitmaps are not persisted and the scratch files are
 * emptied on open, so after a crash mid-epoch the backing file holds the primary's writes of an
 * unfinished epoch and the checkpoint's content is lost. Enough for a benchmark baseline, no more.
 *
 * stats().bufferedBytes reports the bytes held in hidden (under `primary`: the copies that the
 * primary's writes forced) and in active (under `secondary`); they are on disk, not in memory.
 *
 * Concurrency: a range lock over clusters. Writes take their clusters exclusively (a copy-before-write
 * must not interleave with another write or a secondary read of the same cluster); reads take them
 * shared. Flushes take a slot past the last cluster, shared, so they never hold up requests. Checkpoint,
 * failover and close take the whole volume exclusively, after the requests already in flight, which is
 * the checkpoint's foreground pause.
 */

/** Copies during failover and copy-before-write go through buffers of at most this size. */
export const coloCopyChunkBytes = 4 * MiB;

const hiddenFileName = 'colo-hidden.img';
const activeFileName = 'colo-active.img';

type Payload = { readonly data: Uint8Array } | { readonly zeroes: true };
const zeroPayload: Payload = Object.freeze({ zeroes: true as const });

class ColoVolume extends EventEmitter<VolumeEvents> implements Volume {
  readonly sizeBytes: number;
  readonly clusterBytes: number;
  readonly primary: VolumeView;
  readonly secondary: VolumeView;
  private readonly backing: FileDevice;
  private readonly hidden: FileDevice;
  private readonly active: FileDevice;
  private readonly inHidden: ClusterBitmap;
  private readonly inActive: ClusterBitmap;
  private readonly lock = new RangeLock();
  private readonly dataDir: string;
  private state: VolumeState;
  private epoch: number;
  private failoverTarget: FailoverTarget | undefined;

  constructor(backing: FileDevice, hidden: FileDevice, active: FileDevice, clusterBytes: number, dataDir: string, meta: StrategyMeta) {
    super();
    this.dataDir = dataDir;
    this.epoch = meta.epoch;
    this.failoverTarget = meta.failoverTarget;
    this.state = meta.failoverTarget === undefined ? 'replicating' : 'failed-over';
    if (hidden.size !== backing.size || active.size !== backing.size) {
      throw new Error('colo: active, hidden and backing files must have the same size');
    }
    this.backing = backing;
    this.hidden = hidden;
    this.active = active;
    this.sizeBytes = backing.size;
    this.clusterBytes = clusterBytes;
    const clusters = Math.ceil(this.sizeBytes / clusterBytes);
    this.inHidden = new ClusterBitmap(clusters);
    this.inActive = new ClusterBitmap(clusters);
    const failedOver = () => this.state === 'failed-over';
    const never = () => false;
    this.primary = diskView('primary', this.sizeBytes, clusterBytes, {
      read: (buf, offset) => this.primaryRead(buf, offset),
      write: (data, offset, length, fua) => this.primaryWrite(data === null ? zeroPayload : { data }, offset, length, fua),
      flush: () => this.primaryFlush(),
    }, failedOver);
    this.secondary = diskView('secondary', this.sizeBytes, clusterBytes, {
      read: (buf, offset) => this.secondaryRead(buf, offset),
      write: (data, offset, length, fua) => this.secondaryWrite(data === null ? zeroPayload : { data }, offset, length, fua),
      flush: () => this.secondaryFlush(),
    }, never);
  }

  /** The flushes' lock slot: past every cluster, so only whole-volume claims conflict with it. */
  private get flushSlot(): number {
    return this.inHidden.clusters;
  }

  private clusterStart(cluster: number): number {
    return cluster * this.clusterBytes;
  }

  private clusterEnd(cluster: number): number {
    return Math.min((cluster + 1) * this.clusterBytes, this.sizeBytes);
  }

  /** Locks the clusters of [offset, offset + length) and fails with ESHUTDOWN if the volume closed meanwhile. */
  private async lockRange(offset: number, length: number, exclusive: boolean): Promise<Release> {
    const release = await this.lock.acquire(
      Math.floor(offset / this.clusterBytes),
      Math.floor((offset + length - 1) / this.clusterBytes) + 1,
      exclusive,
    );
    if (this.state === 'closed') {
      release();
      throw new BlockDeviceError('ESHUTDOWN', 'colo: volume closed');
    }
    return release;
  }

  private async writePayload(file: FileDevice, payload: Payload, payloadOffset: number, from: number, to: number): Promise<void> {
    if ('data' in payload) await file.write(payload.data.subarray(from - payloadOffset, to - payloadOffset), from);
    else await file.writeZeroes(from, to - from);
  }

  private async primaryRead(buf: Uint8Array, offset: number): Promise<void> {
    const release = await this.lockRange(offset, buf.length, false);
    try {
      await this.backing.read(buf, offset);
    } finally {
      release();
    }
  }

  private async primaryWrite(payload: Payload, offset: number, length: number, fua: boolean): Promise<void> {
    if (this.state !== 'replicating') {
      throw new BlockDeviceError('EPERM', `colo: the primary view is read-only once ${this.state}`);
    }
    const release = await this.lockRange(offset, length, true);
    try {
      // Requests queued before a failover still belong to the epoch it ends; later ones are refused.
      if (this.stateNow() === 'failed-over') throw new BlockDeviceError('EPERM', 'colo: the primary view is read-only after failover');
      await this.copyBeforeWrite(offset, length);
      await this.writePayload(this.backing, payload, offset, offset, offset + length);
      if (fua) await this.syncPrimaryFiles();
    } finally {
      release();
    }
  }

  /** Saves into hidden the checkpoint content of every cluster of the range not saved yet this epoch. */
  private async copyBeforeWrite(offset: number, length: number): Promise<void> {
    const first = Math.floor(offset / this.clusterBytes);
    const end = Math.floor((offset + length - 1) / this.clusterBytes) + 1;
    const runClustersMax = Math.max(1, Math.floor(coloCopyChunkBytes / this.clusterBytes));
    let cluster = first;
    while (cluster < end) {
      if (this.inHidden.has(cluster)) {
        cluster++;
        continue;
      }
      let runEnd = cluster + 1;
      while (runEnd < end && runEnd - cluster < runClustersMax && !this.inHidden.has(runEnd)) runEnd++;
      const from = this.clusterStart(cluster);
      const copy = Buffer.allocUnsafe(this.clusterEnd(runEnd - 1) - from);
      await this.backing.read(copy, from);
      await this.hidden.write(copy, from);
      for (let c = cluster; c < runEnd; c++) this.inHidden.add(c);
      cluster = runEnd;
    }
  }

  private async syncPrimaryFiles(): Promise<void> {
    // Both at once: with no crash safety to keep (see above), the order of the two fdatasyncs buys nothing.
    await Promise.all([this.hidden.flush(), this.backing.flush()]);
  }

  private async primaryFlush(): Promise<void> {
    const release = await this.lock.acquire(this.flushSlot, this.flushSlot + 1, false);
    try {
      if (this.state === 'closed') throw new BlockDeviceError('ESHUTDOWN', 'colo: volume closed');
      await this.syncPrimaryFiles();
    } finally {
      release();
    }
  }

  private async secondaryRead(buf: Uint8Array, offset: number): Promise<void> {
    const release = await this.lockRange(offset, buf.length, false);
    try {
      if (this.state === 'failed-over') {
        await this.backing.read(buf, offset);
        return;
      }
      const end = offset + buf.length;
      let cluster = Math.floor(offset / this.clusterBytes);
      while (this.clusterStart(cluster) < end) {
        const source = this.sourceOf(cluster);
        let runEnd = cluster + 1;
        while (this.clusterStart(runEnd) < end && this.sourceOf(runEnd) === source) runEnd++;
        const from = Math.max(offset, this.clusterStart(cluster));
        const to = Math.min(end, this.clusterEnd(runEnd - 1));
        await source.read(buf.subarray(from - offset, to - offset), from);
        cluster = runEnd;
      }
    } finally {
      release();
    }
  }

  /** Where the secondary view's bytes of a cluster live: active over hidden over backing. */
  private sourceOf(cluster: number): FileDevice {
    if (this.inActive.has(cluster)) return this.active;
    return this.belowActive(cluster);
  }

  private belowActive(cluster: number): FileDevice {
    return this.inHidden.has(cluster) ? this.hidden : this.backing;
  }

  private async secondaryWrite(payload: Payload, offset: number, length: number, fua: boolean): Promise<void> {
    const release = await this.lockRange(offset, length, true);
    try {
      if (this.state === 'failed-over') {
        await this.writePayload(this.backing, payload, offset, offset, offset + length);
        if (fua) await this.backing.flush();
        return;
      }
      await this.writeActive(payload, offset, length);
      if (fua) await this.active.flush();
    } finally {
      release();
    }
  }

  /**
   * Active is cluster-granular: a cluster is either wholly in active or not at all, so a partial write
   * to a cluster not yet there first brings the rest of the cluster up from below.
   */
  private async writeActive(payload: Payload, offset: number, length: number): Promise<void> {
    const end = offset + length;
    const first = Math.floor(offset / this.clusterBytes);
    const last = Math.floor((end - 1) / this.clusterBytes);
    let from = offset;
    let to = end;
    if (!this.inActive.has(first) && (offset > this.clusterStart(first) || end < this.clusterEnd(first))) {
      await this.fillActiveCluster(first, payload, offset, end);
      from = Math.min(end, this.clusterEnd(first));
    }
    if (last !== first && !this.inActive.has(last) && end < this.clusterEnd(last)) {
      await this.fillActiveCluster(last, payload, offset, end);
      to = this.clusterStart(last);
    }
    if (from < to) await this.writePayload(this.active, payload, offset, from, to);
    for (let c = first; c <= last; c++) this.inActive.add(c);
  }

  /** Writes one whole cluster into active: its content from below, overlaid with the payload's part of it. */
  private async fillActiveCluster(cluster: number, payload: Payload, offset: number, end: number): Promise<void> {
    const start = this.clusterStart(cluster);
    const buf = Buffer.allocUnsafe(this.clusterEnd(cluster) - start);
    await this.belowActive(cluster).read(buf, start);
    const from = Math.max(offset, start);
    const to = Math.min(end, start + buf.length);
    if ('data' in payload) buf.set(payload.data.subarray(from - offset, to - offset), from - start);
    else buf.fill(0, from - start, to - start);
    await this.active.write(buf, start);
  }

  private async secondaryFlush(): Promise<void> {
    const release = await this.lock.acquire(this.flushSlot, this.flushSlot + 1, false);
    try {
      if (this.state === 'closed') throw new BlockDeviceError('ESHUTDOWN', 'colo: volume closed');
      await (this.state === 'failed-over' ? this.backing.flush() : this.active.flush());
    } finally {
      release();
    }
  }

  /** The state as of now: it may change while a request waits for the lock. */
  private stateNow(): VolumeState {
    return this.state;
  }

  async checkpoint(): Promise<number> {
    if (this.state !== 'replicating') throw new GannetError('ESTATE', `colo: cannot checkpoint a volume that is ${this.state}`);
    const started = performance.now();
    const release = await this.lock.acquire(0, Infinity, true);
    try {
      if (this.state !== 'replicating') throw new GannetError('ESTATE', `colo: cannot checkpoint a volume that is ${this.state}`);
      await Promise.all([this.active.empty(), this.hidden.empty()]);
      this.inActive.clear();
      this.inHidden.clear();
      this.epoch++;
    } finally {
      release();
    }
    this.emit('checkpoint', { epoch: this.epoch, pauseMs: performance.now() - started });
    return this.epoch;
  }

  async failover(options?: { to?: FailoverTarget }): Promise<void> {
    const to = options?.to ?? 'secondary';
    if (this.state !== 'replicating') throw new GannetError('ESTATE', `colo: cannot fail over a volume that is ${this.state}`);
    const started = performance.now();
    this.state = 'failing-over';
    const release = await this.lock.acquire(0, Infinity, true);
    try {
      if (to === 'secondary' || to === 'checkpoint') await this.copyInto(this.hidden, this.inHidden);
      if (to === 'secondary') await this.copyInto(this.active, this.inActive);
      await this.backing.flush();
      await writeStrategyMeta(this.dataDir, { strategy: 'colo', epoch: this.epoch, failoverTarget: to });
      this.state = 'failed-over';
      this.failoverTarget = to;
      await this.active.empty();
      await this.hidden.empty();
      this.inActive.clear();
      this.inHidden.clear();
    } catch (error) {
      // The copies are idempotent (same bytes to the same places), so a failed failover can be retried.
      if (this.state === 'failing-over') this.state = 'replicating';
      throw error;
    } finally {
      release();
    }
    this.emit('failover', { to, durationMs: performance.now() - started });
  }

  /** Copies every cluster a scratch file holds into the backing file, in offset order and in chunks. */
  private async copyInto(source: FileDevice, map: ClusterBitmap): Promise<void> {
    const runClustersMax = Math.max(1, Math.floor(coloCopyChunkBytes / this.clusterBytes));
    for (const run of map.runs()) {
      for (let cluster = run.first; cluster < run.end; cluster += runClustersMax) {
        const from = this.clusterStart(cluster);
        const to = this.clusterEnd(Math.min(run.end, cluster + runClustersMax) - 1);
        const buf = Buffer.allocUnsafe(to - from);
        await source.read(buf, from);
        await this.backing.write(buf, from);
      }
    }
  }

  stats(): VolumeStats {
    return {
      strategy: 'colo',
      state: this.state,
      sizeBytes: this.sizeBytes,
      epoch: this.epoch,
      // The backing file holds each checkpoint as soon as it is taken: there is no commit pipeline.
      durableEpoch: this.epoch,
      ...(this.failoverTarget !== undefined && { failoverTarget: this.failoverTarget }),
      bufferedBytes: {
        primary: this.inHidden.count * this.clusterBytes,
        secondary: this.inActive.count * this.clusterBytes,
        committed: 0,
      },
      spilledBytes: 0,
      tornRanges: [],
    };
  }

  async close(): Promise<void> {
    if (this.state === 'closed') return;
    const release = await this.lock.acquire(0, Infinity, true);
    try {
      const state = this.stateNow();
      if (state === 'closed') return;
      this.state = 'closed';
      try {
        // The unfinished epoch is dropped: the backing file goes back to the checkpoint (see above).
        if (state !== 'failed-over') await this.copyInto(this.hidden, this.inHidden);
        await this.backing.flush();
        await writeStrategyMeta(this.dataDir, {
          strategy: 'colo',
          epoch: this.epoch,
          ...(this.failoverTarget !== undefined && { failoverTarget: this.failoverTarget }),
        });
      } finally {
        await Promise.all([this.backing.close(), this.hidden.close(), this.active.close()]);
      }
    } finally {
      release();
    }
  }
}

/**
 * Opens the COLO baseline: backing file at `options.path`; hidden and active scratch files and
 * strategy.json in `options.dataDir` (the scratch files are emptied on every open: see "NO crash safety").
 */
export async function openColoVolume(options: VolumeOptions): Promise<Volume> {
  const resolved = parseVolumeOptions({ ...options, strategy: options.strategy ?? 'colo' });
  if (resolved.strategy !== 'colo') throw new GannetError('EOPTIONS', `openColoVolume: strategy is ${resolved.strategy}`);
  const meta = await readStrategyMeta(resolved.dataDir, 'colo');
  const backing = await openBackingFile(resolved.path, resolved.sizeBytes);
  const opened: FileDevice[] = [backing];
  try {
    const hidden = await openScratchFile(join(resolved.dataDir, hiddenFileName), resolved.sizeBytes);
    opened.push(hidden);
    const active = await openScratchFile(join(resolved.dataDir, activeFileName), resolved.sizeBytes);
    opened.push(active);
    return new ColoVolume(backing, hidden, active, resolved.blockBytes, resolved.dataDir, meta);
  } catch (error) {
    await Promise.all(opened.map((file) => file.close()));
    throw error;
  }
}
