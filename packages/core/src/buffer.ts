import { LRUCache } from 'lru-cache';
import { assert } from './assert.js';
import { RangeSet } from './ranges.js';
import { SlabPool, type Slab } from './slab.js';
import { MiB } from '@gannet/block-device';

/**
 * Block maps and memory accounting. A layer is one buffer (P, S, or one committed epoch): a compact index
 * Map<block index, entry> where the entry is a slot number (>= 0, data in a slab) or a spill tag (<= -2,
 * data in the layer's spill file at the index the tag encodes), plus the ranges of whole blocks zeroed or
 * trimmed, which read as zeroes with no data allocated: `holes` (trim, or WRITE_ZEROES without NO_HOLE:
 * the backing file may deallocate them) and `zeros` (WRITE_ZEROES with NO_HOLE: they must stay
 * allocated). The two are disjoint, the newer operation taking its blocks from the other. A map entry
 * wins over a range of its own layer: zeroing a range deletes the map entries inside it, so an entry
 * there was written afterwards. `entry()` folds all three into one answer, ZERO for a zeroed block. A
 * layer's spill file is append-only, so a spill tag is never reused within a layer: "the entry is
 * unchanged" after an await is a plain number comparison.
 *
 * A layer's state is private to this module (kept under a symbol only it holds): the rest of the engine
 * reads a layer through its methods and changes it only through BlockBuffers, which keeps the
 * accounting.
 */
export const ZERO = -1;
const spillTagFirst = -2;

export const isSlot = (entry: number): boolean => entry >= 0;
export const isSpilled = (entry: number): boolean => entry <= spillTagFirst;
/** Where in its layer's spill file a spilled block is, in blocks. */
export const spillIndex = (entry: number): number => spillTagFirst - entry;

export type LayerRole = 'primary' | 'secondary' | 'committed';

interface LayerState {
  role: LayerRole;
  sealedEpoch: number;
  readonly map: Map<number, number>;
  readonly holes: RangeSet;
  readonly zeros: RangeSet;
  memBlocks: number;
  spilledBlocks: number;
  dropped: boolean;
  /** The spill store may hold copies for this layer (cleared when it is dropped). */
  hasSpillKeys: boolean;
  readonly slabs: Slab<Layer>[];
  readonly freeSlots: number[];
  bump: Slab<Layer> | null;
  bumpNext: number;
}

const state = Symbol('layer state');

export class Layer {
  readonly id: number;
  /** The epoch whose writes this layer holds. */
  readonly epoch: number;
  readonly [state]: LayerState;

  constructor(id: number, role: LayerRole, epoch: number) {
    this.id = id;
    this.epoch = epoch;
    this[state] = {
      role,
      sealedEpoch: -1,
      map: new Map(),
      holes: new RangeSet(),
      zeros: new RangeSet(),
      memBlocks: 0,
      spilledBlocks: 0,
      dropped: false,
      hasSpillKeys: false,
      slabs: [],
      freeSlots: [],
      bump: null,
      bumpNext: 0,
    };
  }

  get role(): LayerRole {
    return this[state].role;
  }

  /** For a committed layer: the epoch the sealing checkpoint returned (durable once flushed). */
  get sealedEpoch(): number {
    return this[state].sealedEpoch;
  }

  get memBlocks(): number {
    return this[state].memBlocks;
  }

  get spilledBlocks(): number {
    return this[state].spilledBlocks;
  }

  get dropped(): boolean {
    return this[state].dropped;
  }

  get hasSpillKeys(): boolean {
    return this[state].hasSpillKeys;
  }

  /** Blocks with data (in memory or spilled); zeroed ranges are not counted. */
  get dataBlockCount(): number {
    return this[state].map.size;
  }

  /** What this layer holds for block `b`: its map entry, ZERO inside a hole or zero range, else undefined. */
  entry(b: number): number | undefined {
    const s = this[state];
    const e = s.map.get(b);
    if (e !== undefined) return e;
    return inRange(s, b) ? ZERO : undefined;
  }

  /** The slot or spill tag holding block `b`'s data, if the layer has data for it. */
  dataEntry(b: number): number | undefined {
    return this[state].map.get(b);
  }

  hasData(b: number): boolean {
    return this[state].map.has(b);
  }

  /** Whether this layer decides the content of block `b` (views below it do not matter). */
  holds(b: number): boolean {
    const s = this[state];
    return s.map.has(b) || inRange(s, b);
  }

  /** Whether this layer decides the content of any block of [first, end), looking at whichever is smaller. */
  touches(first: number, end: number): boolean {
    const s = this[state];
    if (s.holes.intersects(first, end) || s.zeros.intersects(first, end)) return true;
    if (s.map.size <= end - first) {
      for (const b of s.map.keys()) if (b >= first && b < end) return true;
      return false;
    }
    for (let b = first; b < end; b++) if (s.map.has(b)) return true;
    return false;
  }

  /** Whether the layer holds nothing at all. */
  get empty(): boolean {
    const s = this[state];
    return s.map.size === 0 && s.holes.size === 0 && s.zeros.size === 0;
  }

  /** The blocks with data, in no particular order. */
  dataBlocks(): IterableIterator<number> {
    return this[state].map.keys();
  }

  hasRanges(): boolean {
    const s = this[state];
    return s.holes.size > 0 || s.zeros.size > 0;
  }

  /** The hole and zero ranges, read-only and valid until the layer changes. */
  rangeViews(): { holes: ReturnType<RangeSet['view']>; zeros: ReturnType<RangeSet['view']> } {
    const s = this[state];
    return { holes: s.holes.view(), zeros: s.zeros.view() };
  }
}

function inRange(s: LayerState, b: number): boolean {
  return (s.holes.size > 0 && s.holes.has(b)) || (s.zeros.size > 0 && s.zeros.has(b));
}

/** A block the spiller may move out of memory: where it is, and the slot's write version when picked. */
export interface SpillVictim {
  readonly layer: Layer;
  readonly block: number;
  readonly slot: number;
  readonly version: number;
}

/**
 * Index entries (map entries, hole and zero ranges) across all layers; a V8 Map holds at most 2^24
 * entries, and index memory must be bounded.
 */
export const indexEntriesMaxDefault = 8 * MiB;
/** Index entries one zeroRange may add: its own range, and a range of the other kind it cuts in two. */
export const zeroRangeEntriesMax = 2;
/** Recency is tracked per slot; past this many slots the LRU forgets the coldest (a scan finds them). */
const lruSlotsMax = 4 * MiB;

export class BlockBuffers {
  readonly blockBytes: number;
  readonly sizeBytes: number;
  readonly blockCount: number;
  private readonly pool: SlabPool<Layer>;
  /** Slots in order of allocation or last second chance, coldest first: the spill victims. */
  /**
   * Made on first use: lru-cache allocates its arrays for `max` entries up front (about 4.5 MiB at the
   * default memoryBytesMax), which an idle volume must not pay.
   */
  private lruValue: LRUCache<number, true> | null = null;
  private readonly lruSlots: number;
  readonly indexEntriesMax: number;
  /** Block bytes held in slabs, over all layers (the quantity memoryBytesMax bounds). */
  private memBytesValue = 0;
  private spilledBytesValue = 0;
  private indexEntriesValue = 0;
  private nextLayerId = 1;

  constructor(options: { blockBytes: number; sizeBytes: number; memoryBytesMax: number; indexEntriesMax?: number }) {
    this.blockBytes = options.blockBytes;
    this.sizeBytes = options.sizeBytes;
    this.blockCount = Math.ceil(options.sizeBytes / options.blockBytes);
    this.pool = new SlabPool<Layer>(options.blockBytes, options.memoryBytesMax);
    this.indexEntriesMax = options.indexEntriesMax ?? indexEntriesMaxDefault;
    const slots = Math.ceil(options.memoryBytesMax / options.blockBytes) + 64 * this.pool.slotsPerSlab;
    this.lruSlots = Math.min(slots, lruSlotsMax);
  }

  private get lru(): LRUCache<number, true> {
    return (this.lruValue ??= new LRUCache<number, true>({ max: this.lruSlots }));
  }

  get memBytes(): number {
    return this.memBytesValue;
  }

  get spilledBytes(): number {
    return this.spilledBytesValue;
  }

  get indexEntries(): number {
    return this.indexEntriesValue;
  }

  newLayer(role: 'primary' | 'secondary', epoch: number): Layer {
    return new Layer(this.nextLayerId++, role, epoch);
  }

  /**
   * `layer` joins the committed set as epoch `sealedEpoch`: P at a checkpoint, the kept side at a
   * failover, the write buffer at a FLUSH after failover.
   */
  seal(layer: Layer, sealedEpoch: number): void {
    const s = layer[state];
    assert(s.role !== 'committed' && !s.dropped, 'only a live buffer is sealed');
    s.role = 'committed';
    s.sealedEpoch = sealedEpoch;
  }

  /**
   * A committed layer over a failover journal reopened after a crash: its blocks are in the journal file
   * (spilled entries at `firstIndex + i` for the i-th journal block), its zeroed ranges as recorded.
   */
  journalLayer(sealedEpoch: number, blocks: Float64Array, firstIndex: number, holeRuns: readonly { first: number; count: number }[], zeroRuns: readonly { first: number; count: number }[]): Layer {
    const layer = new Layer(this.nextLayerId++, 'committed', sealedEpoch);
    const s = layer[state];
    s.sealedEpoch = sealedEpoch;
    s.hasSpillKeys = true;
    blocks.forEach((b, i) => this.replaceEntry(layer, b, undefined, spillTagFirst - (firstIndex + i)));
    for (const run of holeRuns) this.indexEntriesValue += s.holes.add(run.first, run.first + run.count);
    for (const run of zeroRuns) this.indexEntriesValue += s.zeros.add(run.first, run.first + run.count);
    return layer;
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
    const s = layer[state];
    assert(!s.dropped && s.role !== 'committed', 'writes go to a live buffer');
    const entry = s.map.get(b);
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
    const s = layer[state];
    assert(!s.dropped && s.role !== 'committed', 'zeroes go to a live buffer');
    assert(first >= 0 && first < end && end <= this.blockCount, `zero range ${first}..${end} inside the volume`);
    if (s.map.size <= end - first) {
      for (const [b, entry] of s.map) if (b >= first && b < end) this.removeEntry(layer, b, entry);
    } else {
      for (let b = first; b < end; b++) {
        const entry = s.map.get(b);
        if (entry !== undefined) this.removeEntry(layer, b, entry);
      }
    }
    const [into, from] = noHole ? [s.zeros, s.holes] : [s.holes, s.zeros];
    this.indexEntriesValue += into.add(first, end) + from.remove(first, end);
    assert(this.indexEntriesValue >= 0, 'accounting never negative');
  }

  /**
   * Up to `count` of the coldest slots of the live buffers (P and S), from the LRU's cold end. A slot used again since it was
   * (re)placed there has its referenced bit set: it gets a second chance, moving to the warm end with the
   * bit cleared, so a pass where every slot was used again still ends with victims on the second pass.
   * Slots the LRU forgot (it tracks a bounded number) are found by a scan of `layers`, rare and slow.
   */
  spillVictims(count: number, layers: Iterable<Layer>): SpillVictim[] {
    const { pool, lru } = this;
    const victims: SpillVictim[] = [];
    for (let pass = 0; pass < 2 && victims.length < count; pass++) {
      const stale: number[] = [];
      const secondChance: number[] = [];
      for (const slot of lru.rkeys()) {
        if (victims.length >= count) break;
        const slab = pool.slabOf(slot);
        const layer = slab?.owner ?? null;
        if (slab === null || layer === null) {
          stale.push(slot);
          continue;
        }
        const s = layer[state];
        const index = pool.slotIndex(slot);
        const block = slab.blocks[index];
        // Committed data is never spilled (the flusher writes it to the backing file instead).
        if (s.role === 'committed' || s.map.get(block) !== slot) {
          stale.push(slot);
          continue;
        }
        if (slab.referenced[index] === 1) {
          slab.referenced[index] = 0;
          secondChance.push(slot);
          continue;
        }
        victims.push({ layer, block, slot, version: slab.versions[index] });
      }
      for (const slot of stale) lru.delete(slot);
      for (const slot of secondChance) lru.set(slot, true);
    }
    if (victims.length > 0) return victims;
    for (const layer of layers) {
      const s = layer[state];
      if (s.dropped || s.role === 'committed') continue;
      for (const [block, entry] of s.map) {
        if (victims.length >= count) return victims;
        if (!isSlot(entry)) continue;
        const slab = pool.slabOf(entry);
        assert(slab !== null && slab.owner === layer, 'a live slot belongs to its layer');
        victims.push({ layer, block, slot: entry, version: slab.versions[pool.slotIndex(entry)] });
      }
    }
    return victims;
  }

  /** The spill store is about to hold copies of these victims' blocks (cleared when the layer drops). */
  spilling(victims: readonly SpillVictim[]): void {
    for (const v of victims) v.layer[state].hasSpillKeys = true;
  }

  /**
   * The victim's block is in its layer's spill file now, at block `index`: free its slot, unless the slot
   * changed since it was picked (another block, another write, the layer dropped or sealed).
   * Returns whether it was freed.
   */
  spilled(victim: SpillVictim, index: number): boolean {
    const { layer, block, slot } = victim;
    const s = layer[state];
    if (s.dropped || s.role === 'committed' || s.map.get(block) !== slot) return false;
    const slab = this.pool.slabOf(slot);
    if (slab === null || slab.versions[this.pool.slotIndex(slot)] !== victim.version) return false;
    this.replaceEntry(layer, block, slot, spillTagFirst - index);
    this.lru.delete(slot);
    return true;
  }

  /**
   * The blocks a committed layer's slab holds now, each with its slot, sorted by block: what the flusher
   * writes from that slab.
   */
  slabContents(layer: Layer, slab: Slab<Layer>): { blocks: Float64Array; slots: Float64Array } {
    const s = layer[state];
    const first = slab.id * this.pool.slotsPerSlab;
    const order = new Uint32Array(slab.live);
    let n = 0;
    for (let i = 0; i < this.pool.slotsPerSlab && n < order.length; i++) {
      if (s.map.get(slab.blocks[i]) === first + i) order[n++] = i;
    }
    const live = order.subarray(0, n).sort((a, b) => slab.blocks[a] - slab.blocks[b]);
    const blocks = new Float64Array(n);
    const slots = new Float64Array(n);
    for (let k = 0; k < n; k++) {
      blocks[k] = slab.blocks[live[k]];
      slots[k] = first + live[k];
    }
    return { blocks, slots };
  }

  /** The slabs a committed layer still holds (they leave as their blocks are flushed). */
  slabsOf(layer: Layer): readonly Slab<Layer>[] {
    return layer[state].slabs.slice();
  }

  /**
   * A committed layer's block is in the backing file now (or a newer layer of the same flush hides it):
   * its entry goes, and with the last one in a slab, the slab.
   */
  removeFlushed(layer: Layer, b: number): void {
    const s = layer[state];
    assert(s.role === 'committed' && !s.dropped, 'only committed layers are flushed');
    const entry = s.map.get(b);
    if (entry !== undefined) this.removeEntry(layer, b, entry);
  }

  /** A committed layer's zeroed ranges are in the backing file now: reads of them go there. */
  clearRanges(layer: Layer): void {
    const s = layer[state];
    assert(s.role === 'committed' && !s.dropped, 'only committed layers are flushed');
    this.indexEntriesValue -= s.holes.size + s.zeros.size;
    s.holes.clear();
    s.zeros.clear();
    assert(this.indexEntriesValue >= 0, 'accounting never negative');
  }

  /** Gives idle slabs back once the volume is quiet (see SlabPool.trim); the engine calls it every second. */
  trimIdle(): void {
    this.pool.trim();
  }

  /** Whether `entries` more index entries fit. */
  indexRoom(entries: number): boolean {
    return this.indexEntriesValue + entries <= this.indexEntriesMax;
  }

  /** Returns every slab of a dropped layer to the pool: one step per slab, none per block. */
  dropLayer(layer: Layer): void {
    const s = layer[state];
    assert(!s.dropped, `layer ${layer.id} dropped once`);
    s.dropped = true;
    for (const slab of s.slabs) {
      slab.live = 0;
      this.pool.release(slab);
    }
    s.slabs.length = 0;
    s.freeSlots.length = 0;
    s.bump = null;
    this.memBytesValue -= s.memBlocks * this.blockBytes;
    this.spilledBytesValue -= s.spilledBlocks * this.blockBytes;
    this.indexEntriesValue -= s.map.size + s.holes.size + s.zeros.size;
    s.memBlocks = 0;
    s.spilledBlocks = 0;
    assert(
      this.memBytesValue >= 0 && this.spilledBytesValue >= 0 && this.indexEntriesValue >= 0,
      'accounting never negative',
    );
  }

  private allocSlot(layer: Layer, b: number): number {
    const s = layer[state];
    let slot = s.freeSlots.pop();
    if (slot === undefined) {
      if (s.bump === null || s.bumpNext === this.pool.slotsPerSlab) {
        s.bump = this.pool.acquire(layer);
        s.slabs.push(s.bump);
        s.bumpNext = 0;
      }
      slot = s.bump.id * this.pool.slotsPerSlab + s.bumpNext++;
    }
    const slab = this.pool.slabOf(slot)!;
    assert(slab.owner === layer, 'a layer allocates from its own slabs');
    slab.blocks[this.pool.slotIndex(slot)] = b;
    return slot;
  }

  private removeEntry(layer: Layer, b: number, old: number): void {
    this.releaseEntry(layer, old);
    layer[state].map.delete(b);
    this.indexEntriesValue--;
  }

  private releaseEntry(layer: Layer, old: number): void {
    const s = layer[state];
    if (isSlot(old)) {
      s.memBlocks--;
      this.memBytesValue -= this.blockBytes;
      const slab = this.pool.slabOf(old)!;
      slab.live--;
      if (s.role !== 'committed') {
        s.freeSlots.push(old);
      } else if (slab.live === 0) {
        // A sealed layer never allocates again: its slab goes back to the pool once nothing lives in it.
        s.slabs.splice(s.slabs.indexOf(slab), 1);
        this.pool.release(slab);
      }
    } else {
      assert(isSpilled(old), `map entry ${old} is a slot or a spill tag`);
      s.spilledBlocks--;
      this.spilledBytesValue -= this.blockBytes;
    }
  }

  private replaceEntry(layer: Layer, b: number, old: number | undefined, next: number): void {
    assert(next !== ZERO, 'zeroes are ranges, not map entries');
    const s = layer[state];
    if (old === undefined) this.indexEntriesValue++;
    else this.releaseEntry(layer, old);
    if (isSlot(next)) {
      s.memBlocks++;
      this.memBytesValue += this.blockBytes;
      this.pool.slabOf(next)!.live++;
    } else if (isSpilled(next)) {
      s.spilledBlocks++;
      this.spilledBytesValue += this.blockBytes;
    }
    s.map.set(b, next);
    assert(s.memBlocks >= 0 && s.spilledBlocks >= 0 && this.memBytesValue >= 0, 'accounting never negative');
  }
}
