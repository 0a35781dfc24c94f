import { LRUCache } from 'lru-cache';
import { assert } from './assert.js';
import { SlabPool, type Slab } from './slab.js';

/**
 * Block maps and memory accounting. A layer is one buffer (P, S, or one committed epoch): a compact index
 * Map<block index, entry> where the entry is a slot number (>= 0, data in a slab), ZERO (the block reads as
 * zeroes, no data allocated) or a spill tag (<= -2, data in LevelDB under the layer id and block index).
 * Every spill tag is unique, so "the entry is unchanged" after an await is a plain number comparison.
 */
export const ZERO = -1;
const spillTagFirst = -2;

export const isSlot = (entry: number): boolean => entry >= 0;
export const isSpilled = (entry: number): boolean => entry <= spillTagFirst;

export type LayerRole = 'primary' | 'secondary' | 'committed';

export class Layer {
  readonly id: number;
  role: LayerRole;
  /** The epoch whose writes this layer holds. */
  readonly epoch: number;
  /** For a committed layer: the epoch the sealing checkpoint returned (durable once flushed). */
  sealedEpoch = -1;
  readonly map = new Map<number, number>();
  memBlocks = 0;
  spilledBlocks = 0;
  /** Pinned layers (being flushed or failed over) have slots in use by I/O: never spilled, never freed. */
  pinned = false;
  dropped = false;
  /** LevelDB may hold spilled copies for this layer (cleared when it is dropped). */
  hasSpillKeys = false;
  readonly slabs: Slab<Layer>[] = [];
  readonly freeSlots: number[] = [];
  bump: Slab<Layer> | null = null;
  bumpNext = 0;

  constructor(id: number, role: LayerRole, epoch: number) {
    this.id = id;
    this.role = role;
    this.epoch = epoch;
  }
}

/** Map entries across all layers; a V8 Map holds at most 2^24 entries, and index memory must be bounded. */
export const indexEntriesMaxDefault = 8 * 1024 * 1024;
/** Recency is tracked per slot; past this many slots the LRU forgets the coldest (a scan finds them). */
const lruSlotsMax = 4 * 1024 * 1024;

export class BlockBuffers {
  readonly blockBytes: number;
  readonly sizeBytes: number;
  readonly blockCount: number;
  readonly pool: SlabPool<Layer>;
  /** Least recently used slots first: the spill victims. */
  readonly lru: LRUCache<number, true>;
  readonly indexEntriesMax: number;
  /** Block bytes held in slabs, over all layers (the quantity memoryBytesMax bounds). */
  memBytes = 0;
  spilledBytes = 0;
  indexEntries = 0;
  private nextLayerId = 1;
  private nextSpillTag = spillTagFirst;

  constructor(options: { blockBytes: number; sizeBytes: number; memoryBytesMax: number; indexEntriesMax?: number }) {
    this.blockBytes = options.blockBytes;
    this.sizeBytes = options.sizeBytes;
    this.blockCount = Math.ceil(options.sizeBytes / options.blockBytes);
    this.pool = new SlabPool<Layer>(options.blockBytes);
    this.indexEntriesMax = options.indexEntriesMax ?? indexEntriesMaxDefault;
    const slots = Math.ceil(options.memoryBytesMax / options.blockBytes) + 64 * this.pool.slotsPerSlab;
    this.lru = new LRUCache<number, true>({ max: Math.min(slots, lruSlotsMax) });
  }

  newLayer(role: LayerRole, epoch: number): Layer {
    return new Layer(this.nextLayerId++, role, epoch);
  }

  /** Bytes of block `b` inside the volume (the last block may be short). */
  blockLength(b: number): number {
    return Math.min(this.blockBytes, this.sizeBytes - b * this.blockBytes);
  }

  slotBytes(slot: number): Buffer {
    return this.pool.slotBytes(slot);
  }

  touch(slot: number): void {
    this.lru.set(slot, true);
  }

  /**
   * Bytes [inBlock, inBlock + length) of block `b` in `layer` become `src` (zeroes when null). A block
   * without a slot gets one, first filled with `fill` (the block's old content; zeroes when null) unless
   * the write covers it; an existing slot is overwritten in place. Synchronous: every await is done.
   */
  writeBlock(
    layer: Layer,
    b: number,
    inBlock: number,
    length: number,
    src: Uint8Array | null,
    fill: Uint8Array | null,
  ): void {
    assert(!layer.dropped && !layer.pinned && layer.role !== 'committed', 'writes go to a live buffer');
    const entry = layer.map.get(b);
    let slot: number;
    if (entry !== undefined && isSlot(entry)) {
      slot = entry;
    } else {
      slot = this.allocSlot(layer, b);
      const bytes = this.slotBytes(slot);
      const full = inBlock === 0 && length >= this.blockLength(b);
      if (!full) {
        if (fill !== null) bytes.set(fill.subarray(0, this.blockBytes));
        else bytes.fill(0);
      }
      this.replaceEntry(layer, b, entry, slot);
    }
    const bytes = this.slotBytes(slot);
    if (src !== null) bytes.set(src, inBlock);
    else bytes.fill(0, inBlock, inBlock + length);
    const slab = this.pool.slabOf(slot)!;
    slab.versions[this.pool.slotIndex(slot)]++;
    this.touch(slot);
  }

  /** Whole block `b` of `layer` reads as zeroes from now on; its data slot (if any) is freed. */
  zeroBlock(layer: Layer, b: number): void {
    assert(!layer.dropped && !layer.pinned && layer.role !== 'committed', 'zeroes go to a live buffer');
    const entry = layer.map.get(b);
    if (entry === ZERO) return;
    this.replaceEntry(layer, b, entry, ZERO);
  }

  /** Marks a slot's block as spilled (the data is in LevelDB now) and frees the slot. */
  markSpilled(layer: Layer, b: number, slot: number): number {
    const tag = this.nextSpillTag--;
    this.replaceEntry(layer, b, slot, tag);
    return tag;
  }

  /** Whether `entries` more index entries fit. */
  indexRoom(entries: number): boolean {
    return this.indexEntries + entries <= this.indexEntriesMax;
  }

  /** Returns every slab of a dropped layer to the pool: one step per slab, none per block. */
  dropLayer(layer: Layer): void {
    assert(!layer.dropped, `layer ${layer.id} dropped once`);
    layer.dropped = true;
    for (const slab of layer.slabs) this.pool.release(slab);
    layer.slabs.length = 0;
    layer.freeSlots.length = 0;
    layer.bump = null;
    this.memBytes -= layer.memBlocks * this.blockBytes;
    this.spilledBytes -= layer.spilledBlocks * this.blockBytes;
    this.indexEntries -= layer.map.size;
    layer.memBlocks = 0;
    layer.spilledBlocks = 0;
    assert(this.memBytes >= 0 && this.spilledBytes >= 0 && this.indexEntries >= 0, 'accounting never negative');
  }

  private allocSlot(layer: Layer, b: number): number {
    let slot = layer.freeSlots.pop();
    if (slot === undefined) {
      if (layer.bump === null || layer.bumpNext === this.pool.slotsPerSlab) {
        layer.bump = this.pool.acquire(layer);
        layer.slabs.push(layer.bump);
        layer.bumpNext = 0;
      }
      slot = layer.bump.id * this.pool.slotsPerSlab + layer.bumpNext++;
    }
    const slab = this.pool.slabOf(slot)!;
    assert(slab.owner === layer, 'a layer allocates from its own slabs');
    slab.blocks[this.pool.slotIndex(slot)] = b;
    return slot;
  }

  private replaceEntry(layer: Layer, b: number, old: number | undefined, next: number): void {
    if (old === undefined) {
      this.indexEntries++;
    } else if (isSlot(old)) {
      layer.freeSlots.push(old);
      layer.memBlocks--;
      this.memBytes -= this.blockBytes;
    } else if (isSpilled(old)) {
      layer.spilledBlocks--;
      this.spilledBytes -= this.blockBytes;
    }
    if (isSlot(next)) {
      layer.memBlocks++;
      this.memBytes += this.blockBytes;
    } else if (isSpilled(next)) {
      layer.spilledBlocks++;
      this.spilledBytes += this.blockBytes;
    }
    layer.map.set(b, next);
    assert(layer.memBlocks >= 0 && layer.spilledBlocks >= 0 && this.memBytes >= 0, 'accounting never negative');
  }
}
