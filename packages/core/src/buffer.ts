import { LRUCache } from 'lru-cache';
import { assert } from './assert.js';
import { BlockRanges } from './block-ranges.js';
import { SlabPool, type Slab } from './slab.js';

/**
 * Block maps and memory accounting. A layer is one buffer (P, S, or one committed epoch): a compact index
 * Map<block index, entry> where the entry is a slot number (>= 0, data in a slab) or a spill tag (<= -2,
 * data in LevelDB under the layer id and block index), plus the ranges of whole blocks zeroed or trimmed,
 * which read as zeroes with no data allocated: `holes` (trim, or WRITE_ZEROES without NO_HOLE: the backing
 * file may deallocate them) and `zeros` (WRITE_ZEROES with NO_HOLE: they must stay allocated). The two are
 * disjoint, the newer operation taking its blocks from the other. A map entry wins over a range of its own
 * layer: zeroing a range deletes the map entries inside it, so an entry there was written afterwards.
 * `entry()` folds all three into one answer, ZERO for a zeroed block. Every spill tag is unique, so "the
 * entry is unchanged" after an await is a plain number comparison.
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
  readonly holes = new BlockRanges();
  readonly zeros = new BlockRanges();
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

  /** What this layer holds for block `b`: its map entry, ZERO inside a hole or zero range, else undefined. */
  entry(b: number): number | undefined {
    const e = this.map.get(b);
    if (e !== undefined) return e;
    return this.inRange(b) ? ZERO : undefined;
  }

  /** Whether this layer decides the content of block `b` (views below it do not matter). */
  holds(b: number): boolean {
    return this.map.has(b) || this.inRange(b);
  }

  private inRange(b: number): boolean {
    return (this.holes.size > 0 && this.holes.has(b)) || (this.zeros.size > 0 && this.zeros.has(b));
  }
}

/**
 * Index entries (map entries, hole and zero ranges) across all layers; a V8 Map holds at most 2^24
 * entries, and index memory must be bounded.
 */
export const indexEntriesMaxDefault = 8 * 1024 * 1024;
/** Index entries one zeroRange may add: its own range, and a range of the other kind it cuts in two. */
export const zeroRangeEntriesMax = 2;
/** Recency is tracked per slot; past this many slots the LRU forgets the coldest (a scan finds them). */
const lruSlotsMax = 4 * 1024 * 1024;

export class BlockBuffers {
  readonly blockBytes: number;
  readonly sizeBytes: number;
  readonly blockCount: number;
  readonly pool: SlabPool<Layer>;
  /** Slots in order of allocation or last second chance, coldest first: the spill victims. */
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

  /**
   * Marks a slot used again. Moving it in the LRU on every 4 KiB write or read cost about a tenth of the
   * daemon's CPU under random I/O, so a reuse only sets the slot's referenced bit; the spiller gives a
   * referenced slot a second chance (moves it to the LRU's warm end) when it reaches the cold end.
   */
  touch(slot: number): void {
    this.pool.slabOf(slot)!.referenced[this.pool.slotIndex(slot)] = 1;
  }

  /**
   * Bytes [inBlock, inBlock + length) of block `b` in `layer` become `src[srcAt, srcAt + length)`
   * (zeroes when `src` is null). A block without a slot gets one, first filled with `fill` (the block's
   * old content; zeroes when null) unless the write covers it; an existing slot is overwritten in place.
   * Synchronous: every await is done. Copies go slab to slab by offset: a Buffer view per block (two per
   * block of a 1 MiB write) cost a fifth of the daemon's CPU on large writes.
   */
  writeBlock(
    layer: Layer,
    b: number,
    inBlock: number,
    length: number,
    src: Uint8Array | null,
    srcAt: number,
    fill: Uint8Array | null,
  ): void {
    assert(!layer.dropped && !layer.pinned && layer.role !== 'committed', 'writes go to a live buffer');
    const entry = layer.map.get(b);
    const reused = entry !== undefined && isSlot(entry);
    const slot = reused ? entry : this.allocSlot(layer, b);
    const slab = this.pool.slabOf(slot)!;
    const index = this.pool.slotIndex(slot);
    const base = index * this.blockBytes;
    if (!reused) {
      if (!(inBlock === 0 && length >= this.blockLength(b))) {
        if (fill !== null) slab.bytes.set(fill.subarray(0, this.blockBytes), base);
        else slab.bytes.fill(0, base, base + this.blockBytes);
      }
      this.replaceEntry(layer, b, entry, slot);
    }
    if (src !== null) slab.bytes.set(new Uint8Array(src.buffer, src.byteOffset + srcAt, length), base + inBlock);
    else slab.bytes.fill(0, base + inBlock, base + inBlock + length);
    slab.versions[index]++;
    if (reused) {
      slab.referenced[index] = 1;
    } else {
      slab.referenced[index] = 0;
      this.lru.set(slot, true);
    }
  }

  /** Copies bytes [inBlock, inBlock + length) of a slot into `dst` at `at`, without a view of the slot. */
  copyOut(slot: number, inBlock: number, length: number, dst: Uint8Array, at: number): void {
    const slab = this.pool.slabOf(slot)!;
    const from = this.pool.slotIndex(slot) * this.blockBytes + inBlock;
    slab.bytes.copy(dst, at, from, from + length);
  }

  /**
   * Blocks [first, end) of `layer` read as zeroes from now on: one range, whatever its length, in `holes`
   * unless `noHole` (then in `zeros`), taken out of the other set. The layer's own entries inside it are
   * deleted (their slots freed), visiting whichever is smaller, the map or the range, so the work is
   * bounded by the index size, not by the length of the range. Adds at most zeroRangeEntriesMax entries.
   */
  zeroRange(layer: Layer, first: number, end: number, noHole: boolean): void {
    assert(!layer.dropped && !layer.pinned && layer.role !== 'committed', 'zeroes go to a live buffer');
    assert(first >= 0 && first < end && end <= this.blockCount, `zero range ${first}..${end} inside the volume`);
    if (layer.map.size <= end - first) {
      for (const [b, entry] of layer.map) if (b >= first && b < end) this.removeEntry(layer, b, entry);
    } else {
      for (let b = first; b < end; b++) {
        const entry = layer.map.get(b);
        if (entry !== undefined) this.removeEntry(layer, b, entry);
      }
    }
    const [into, from] = noHole ? [layer.zeros, layer.holes] : [layer.holes, layer.zeros];
    this.indexEntries += into.add(first, end) + from.remove(first, end);
    assert(this.indexEntries >= 0, 'accounting never negative');
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
    this.indexEntries -= layer.map.size + layer.holes.size + layer.zeros.size;
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

  private removeEntry(layer: Layer, b: number, old: number): void {
    this.releaseEntry(layer, old);
    layer.map.delete(b);
    this.indexEntries--;
  }

  private releaseEntry(layer: Layer, old: number): void {
    if (isSlot(old)) {
      layer.freeSlots.push(old);
      layer.memBlocks--;
      this.memBytes -= this.blockBytes;
    } else {
      assert(isSpilled(old), `map entry ${old} is a slot or a spill tag`);
      layer.spilledBlocks--;
      this.spilledBytes -= this.blockBytes;
    }
  }

  private replaceEntry(layer: Layer, b: number, old: number | undefined, next: number): void {
    assert(next !== ZERO, 'zeroes are ranges, not map entries');
    if (old === undefined) this.indexEntries++;
    else this.releaseEntry(layer, old);
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
