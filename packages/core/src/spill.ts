import { mkdir, rm, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { FileDevice, MiB, TiB, type BlockDevice } from '@gannet/block-device';
import { spillIndex, type BlockBuffers, type Layer } from './buffer.js';

/** Bytes moved to a spill file per batch. */
export const spillBatchBytesMax = 4 * MiB;
/**
 * The virtual size of a spill file: append-only, sparse, so it only takes the space of what was spilled;
 * a layer can spill this much in one epoch (ext4 files stop at 16 TiB).
 */
export const spillFileBytesMax = 8 * TiB;

interface SpillFile {
  readonly device: Promise<BlockDevice>;
  /** The next free block index: indexes are never reused, so a spill tag names one copy for good. */
  next: number;
  /** A file the layer was given (a failover journal): closed with the layer, deleted by its owner. */
  readonly adopted: boolean;
}

/**
 * At the memory limit the coldest blocks of the live buffers P and S (BlockBuffers.spillVictims: an LRU
 * of slots with a second chance for slots used again) move to a spill file of their layer and are served
 * from there. Committed data is never spilled: the flusher writes it to the backing file, and a write
 * that needs its memory waits for that. A spill file is append-only, written in batches with one vectored
 * write, read back block by block (from the page cache, usually synchronously), and deleted with its
 * layer. A slot is freed only after its batch is written and only if nothing changed the slot meanwhile
 * (BlockBuffers.spilled); otherwise the copy is garbage that the layer's drop deletes. One spill runs at
 * a time. Spill files are scratch: never synced, and removed when the volume opens.
 */
export class Spiller {
  private running: Promise<number> | null = null;
  private readonly files = new Map<Layer, SpillFile>();
  private dirMade: Promise<void> | null = null;

  constructor(
    private readonly buffers: BlockBuffers,
    private readonly dir: string,
    private readonly liveLayers: () => Iterable<Layer>,
  ) {}

  /** Removes what a previous run of the volume left (spilled blocks never outlive a process). */
  static async clear(dir: string): Promise<void> {
    await rm(dir, { recursive: true, force: true });
  }

  /** Waits for a spill in flight (close must not close the files under it). */
  async idle(): Promise<void> {
    if (this.running !== null) await this.running.catch(() => undefined);
  }

  /**
   * Spills up to `bytes` (at most one batch). Resolves with the bytes freed, or -1 when nothing is
   * spillable now; 0 means the victims changed meanwhile.
   */
  async spill(bytes: number): Promise<number> {
    if (this.running !== null) {
      await this.running.catch(() => undefined);
      return 0;
    }
    this.running = this.spillBatch(Math.min(Math.max(bytes, this.buffers.blockBytes), spillBatchBytesMax));
    try {
      return await this.running;
    } finally {
      this.running = null;
    }
  }

  /** A spilled block's bytes (`entry` is its spill tag), or undefined when its layer was dropped meanwhile. */
  async read(layer: Layer, entry: number): Promise<Uint8Array | undefined> {
    const data = Buffer.allocUnsafe(this.buffers.blockBytes);
    return (await this.readInto(layer, entry, data, 0)) ? data : undefined;
  }

  /**
   * Bytes [inBlock, inBlock + dst.length) of a spilled block, straight into `dst` (a client's read buffer:
   * no block-sized buffer per read, which under a read of spilled data is garbage the GC lags behind).
   * False when the layer's file is gone (dropped or flushed meanwhile): the caller looks again.
   */
  async readInto(layer: Layer, entry: number, dst: Uint8Array, inBlock: number): Promise<boolean> {
    const file = this.files.get(layer);
    if (file === undefined) return false;
    const device = await file.device;
    try {
      await device.read(dst, spillIndex(entry) * this.buffers.blockBytes + inBlock);
    } catch (err) {
      if ((err as { code?: string }).code === 'ESHUTDOWN') return false;
      throw err;
    }
    return true;
  }

  /** Serves `layer`'s spilled entries from `device`, a file it did not write (a reopened failover journal). */
  adopt(layer: Layer, device: BlockDevice): void {
    this.files.set(layer, { device: Promise.resolve(device), next: Infinity, adopted: true });
  }

  /** Deletes a dropped layer's spill file (an adopted one is only closed), after any batch in flight. */
  async forget(layer: Layer): Promise<void> {
    const file = this.files.get(layer);
    if (file === undefined) return;
    await this.idle();
    this.files.delete(layer);
    const device = await file.device;
    await device.close();
    if (!file.adopted) await unlink((device as FileDevice).path);
  }

  private async spillBatch(bytes: number): Promise<number> {
    const victims = this.buffers.spillVictims(Math.ceil(bytes / this.buffers.blockBytes), this.liveLayers());
    if (victims.length === 0) return -1;
    const byLayer = new Map<Layer, typeof victims>();
    for (const v of victims) {
      const list = byLayer.get(v.layer);
      if (list === undefined) byLayer.set(v.layer, [v]);
      else list.push(v);
    }
    let freed = 0;
    for (const [layer, list] of byLayer) {
      if (layer.dropped) continue;
      const file = this.fileOf(layer);
      const first = file.next;
      file.next += list.length;
      const device = await file.device;
      await device.writev(
        list.map((v) => this.buffers.slotBytes(v.slot)),
        first * this.buffers.blockBytes,
      );
      list.forEach((v, i) => {
        if (this.buffers.spilled(v, first + i)) freed += this.buffers.blockBytes;
      });
    }
    return freed;
  }

  private fileOf(layer: Layer): SpillFile {
    let file = this.files.get(layer);
    if (file === undefined) {
      this.dirMade ??= mkdir(this.dir, { recursive: true }).then(() => undefined);
      const path = join(this.dir, `layer-${layer.id}`);
      const device = this.dirMade.then(() => FileDevice.open(path, { create: spillFileBytesMax, truncate: true, sync: 'none', atEnd: 'zero-fill' }));
      // A file that cannot be created is tried again by the next spill.
      device.catch(() => this.files.delete(layer));
      file = { device, next: 0, adopted: false };
      this.files.set(layer, file);
    }
    return file;
  }
}
