import { KiB, type BlockDevice } from '@gannet/block-device';
import { assert } from './assert.js';
import { isSlot, isSpilled, type BlockBuffers, type Layer } from './buffer.js';
import type { Spiller } from './spill.js';
import type { RangePairs } from './ranges.js';
import type { ByteRange } from './types.js';

/**
 * Planning what a flush pass (or a failover's journal) writes: the blocks, newest layer winning, and the
 * zeroed ranges, with the byte ranges they cover; and the helpers that write zero runs and read a block
 * from the layers.
 */

/** Work done between yields to the event loop while preparing a flush (keys gathered, sorted, merged). */
export const prepareStepEntries = 8 * KiB;

const yieldToEventLoop = () => new Promise<void>((resolve) => setImmediate(resolve));

/**
 * Every block held by `layers`, in offset order, without duplicates. A GiB of 4 KiB blocks is a quarter
 * million keys: gathering and sorting them in one go would stall the event loop (and every NBD request)
 * for tens of milliseconds, so the keys are sorted in chunks and merged bottom-up, yielding in between.
 */
export async function sortedBlocks(layers: readonly Layer[]): Promise<Float64Array> {
  let total = 0;
  for (const layer of layers) total += layer.dataBlockCount;
  let keys = new Float64Array(total);
  let n = 0;
  for (const layer of layers) {
    for (const b of layer.dataBlocks()) {
      keys[n++] = b;
      if (n % prepareStepEntries === 0) await yieldToEventLoop();
    }
  }
  assert(n === total, 'layers do not change while their flush is prepared');
  for (let start = 0; start < n; start += prepareStepEntries) {
    keys.subarray(start, Math.min(n, start + prepareStepEntries)).sort();
    if (start + prepareStepEntries < n) await yieldToEventLoop();
  }
  let spare = new Float64Array(n);
  for (let width = prepareStepEntries; width < n; width *= 2) {
    let done = 0;
    for (let left = 0; left < n; left += 2 * width) {
      const mid = Math.min(n, left + width);
      const right = Math.min(n, left + 2 * width);
      let i = left;
      let j = mid;
      let k = left;
      while (i < mid && j < right) spare[k++] = keys[i] <= keys[j] ? keys[i++] : keys[j++];
      while (i < mid) spare[k++] = keys[i++];
      while (j < right) spare[k++] = keys[j++];
      done += right - left;
      if (done >= 4 * prepareStepEntries) {
        done = 0;
        await yieldToEventLoop();
      }
    }
    [keys, spare] = [spare, keys];
  }
  if (layers.length === 1) return keys;
  let unique = 0;
  for (let i = 0; i < n; i++) if (unique === 0 || keys[unique - 1] !== keys[i]) keys[unique++] = keys[i];
  return keys.subarray(0, unique);
}

/**
 * What a flush (or failover) of `layers` (oldest first) writes: `blocks`, sorted, each with data from the
 * newest layer holding it; `holeRuns`, zero runs the file may deallocate; and `zeroRuns`, zero runs that
 * must stay allocated. The three are sorted and disjoint, each run applied as one range however long. The
 * newest layer that holds a block (map entry, hole or zero range) decides which of the three it is in.
 */
export interface FlushPlan {
  readonly blocks: Float64Array;
  readonly holeRuns: Run[];
  readonly zeroRuns: Run[];
}

export async function planFlush(layers: readonly Layer[]): Promise<FlushPlan> {
  const keys = await sortedBlocks(layers);
  if (layers.every((layer) => !layer.hasRanges())) {
    return { blocks: keys, holeRuns: [], zeroRuns: [] };
  }
  let blocks = keys;
  if (layers.length > 1) {
    // A newer layer's hole or zero range hides an older layer's data for the blocks it covers.
    let kept = 0;
    for (let i = 0; i < keys.length; i++) {
      const b = keys[i];
      let j = layers.length - 1;
      while (!layers[j].holds(b)) j--;
      if (layers[j].hasData(b)) keys[kept++] = b;
      if ((i + 1) % prepareStepEntries === 0) await yieldToEventLoop();
    }
    blocks = keys.subarray(0, kept);
  }
  const { holes, zeros } = await newestRanges(layers);
  return { blocks, holeRuns: await cutRuns(holes, blocks), zeroRuns: await cutRuns(zeros, blocks) };
}

/** One layer's ranges of one kind, read in order; `rank` orders layers (higher is newer). */
interface RangeCursor {
  readonly starts: readonly number[];
  readonly ends: readonly number[];
  readonly rank: number;
  readonly hole: boolean;
  next: number;
}

/** A range covering the sweep position: the newest one decides the blocks until it ends. */
interface ActiveRange {
  readonly end: number;
  readonly rank: number;
  readonly hole: boolean;
}

/**
 * Every layer's hole and zero ranges, the newest layer deciding each block, as sorted disjoint runs
 * with touching runs of one kind merged. One sweep over the layers' already sorted ranges: a heap picks
 * the next range to start, another the newest range covering the sweep position, so the cost is
 * O(ranges x log layers), yielding to the event loop as it goes (inserting ranges one by one into a
 * sorted array would be quadratic).
 */
async function newestRanges(layers: readonly Layer[]): Promise<{ holes: Run[]; zeros: Run[] }> {
  const pending = new Heap<RangeCursor>((a, b) => a.starts[a.next] < b.starts[b.next]);
  layers.forEach((layer, rank) => {
    const views = layer.rangeViews();
    for (const [view, hole] of [[views.holes, true], [views.zeros, false]] as const) {
      const { starts, ends } = view;
      if (starts.length > 0) pending.push({ starts, ends, rank, hole, next: 0 });
    }
  });
  const active = new Heap<ActiveRange>((a, b) => a.rank > b.rank);
  const holes: { first: number; count: number }[] = [];
  const zeros: { first: number; count: number }[] = [];
  let lastHole: { first: number; count: number } | undefined;
  let lastZero: { first: number; count: number } | undefined;
  let steps = 0;
  let pos = 0;
  while (pending.size > 0 || active.size > 0) {
    while (active.size > 0 && active.peek()!.end <= pos) active.pop();
    if (active.size === 0) {
      if (pending.size === 0) break;
      const c = pending.peek()!;
      pos = Math.max(pos, c.starts[c.next]);
    }
    while (pending.size > 0) {
      const c = pending.peek()!;
      if (c.starts[c.next] > pos) break;
      pending.pop();
      if (c.ends[c.next] > pos) active.push({ end: c.ends[c.next], rank: c.rank, hole: c.hole });
      c.next += 1;
      if (c.next < c.starts.length) pending.push(c);
    }
    while (active.size > 0 && active.peek()!.end <= pos) active.pop();
    if (active.size === 0) continue;
    const top = active.peek()!;
    const nextStart = pending.size > 0 ? pending.peek()!.starts[pending.peek()!.next] : Infinity;
    const until = Math.min(top.end, nextStart);
    if (top.hole) {
      if (lastHole !== undefined && lastHole.first + lastHole.count === pos) lastHole.count += until - pos;
      else holes.push((lastHole = { first: pos, count: until - pos }));
    } else if (lastZero !== undefined && lastZero.first + lastZero.count === pos) {
      lastZero.count += until - pos;
    } else {
      zeros.push((lastZero = { first: pos, count: until - pos }));
    }
    pos = until;
    if (++steps % prepareStepEntries === 0) await yieldToEventLoop();
  }
  return { holes, zeros };
}

/** A binary heap; `before(a, b)` is true when a comes out first. */
class Heap<T> {
  private readonly items: T[] = [];
  constructor(private readonly before: (a: T, b: T) => boolean) {}

  get size(): number {
    return this.items.length;
  }

  peek(): T | undefined {
    return this.items[0];
  }

  push(item: T): void {
    const items = this.items;
    let i = items.push(item) - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!this.before(items[i], items[parent])) break;
      [items[i], items[parent]] = [items[parent], items[i]];
      i = parent;
    }
  }

  pop(): T | undefined {
    const items = this.items;
    const top = items[0];
    const last = items.pop();
    if (items.length > 0 && last !== undefined) {
      items[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let best = i;
        if (l < items.length && this.before(items[l], items[best])) best = l;
        if (r < items.length && this.before(items[r], items[best])) best = r;
        if (best === i) break;
        [items[i], items[best]] = [items[best], items[i]];
        i = best;
      }
    }
    return top;
  }
}

/** `runs` minus the sorted `blocks`, yielding to the event loop as it goes. */
async function cutRuns(runs: readonly Run[], blocks: ArrayLike<number>): Promise<Run[]> {
  const out: Run[] = [];
  let i = 0;
  let steps = 0;
  for (const run of runs) {
    const end = run.first + run.count;
    let start = run.first;
    while (i < blocks.length && blocks[i] < start) i++;
    while (i < blocks.length && blocks[i] < end) {
      if (blocks[i] > start) out.push({ first: start, count: blocks[i] - start });
      start = blocks[i] + 1;
      i++;
      if (++steps % prepareStepEntries === 0) await yieldToEventLoop();
    }
    if (start < end) out.push({ first: start, count: end - start });
    if (++steps % prepareStepEntries === 0) await yieldToEventLoop();
  }
  return out;
}

/** The layer whose entry for a block wins: the newest of `layers` (oldest first) that holds it. */
export function newestHolder(layers: readonly Layer[]): (block: number) => Layer | undefined {
  if (layers.length === 1) {
    const only = layers[0];
    return (b) => (only.hasData(b) ? only : undefined);
  }
  return (b) => {
    for (let i = layers.length - 1; i >= 0; i--) if (layers[i].hasData(b)) return layers[i];
    return undefined;
  };
}

export interface Run {
  readonly first: number;
  readonly count: number;
}

/** A block's content: bytes (at least the block's length), null for zeroes; may need a LevelDB read. */
export type BlockSource = (block: number) => Uint8Array | null | Promise<Uint8Array | null>;

/** Byte ranges of zero runs, clipped to the volume. */
export function zeroRunRanges(runs: readonly Run[], blockBytes: number, sizeBytes: number): ByteRange[] {
  return runs.map((run) => {
    const offset = run.first * blockBytes;
    return { offset, length: Math.min((run.first + run.count) * blockBytes, sizeBytes) - offset };
  });
}

/** Volume geometry, as the writers below need it. */
export interface Geometry {
  readonly blockBytes: number;
  readonly sizeBytes: number;
}

/**
 * Applies each zero run as one backing call (`noHole`: the range must stay allocated; otherwise the
 * file may deallocate it), one run after the other. Returns the bytes zeroed. The caller's flush makes
 * them durable.
 */
export async function writeZeroRuns(backing: BlockDevice, runs: readonly Run[], noHole: boolean, geometry: Geometry): Promise<number> {
  let bytes = 0;
  for (const range of zeroRunRanges(runs, geometry.blockBytes, geometry.sizeBytes)) {
    await backing.writeZeroes(range.offset, range.length, { noHole });
    bytes += range.length;
  }
  return bytes;
}

/**
 * The byte ranges a plan writes, as merged pairs: the sorted `blocks` (runs of consecutive blocks) and
 * the hole and zero runs, swept together in one pass with no object per range.
 */
export function coveredPairs(blocks: Float64Array, holeRuns: readonly Run[], zeroRuns: readonly Run[], geometry: Geometry): RangePairs {
  const { blockBytes, sizeBytes } = geometry;
  const out: number[] = [];
  let i = 0;
  let h = 0;
  let z = 0;
  for (;;) {
    const nextBlock = i < blocks.length ? blocks[i] : Infinity;
    const nextHole = h < holeRuns.length ? holeRuns[h].first : Infinity;
    const nextZero = z < zeroRuns.length ? zeroRuns[z].first : Infinity;
    const first = Math.min(nextBlock, nextHole, nextZero);
    if (first === Infinity) break;
    let end: number;
    if (first === nextBlock) {
      end = blocks[i] + 1;
      i++;
      while (i < blocks.length && blocks[i] === end) {
        end++;
        i++;
      }
    } else if (first === nextHole) {
      end = holeRuns[h].first + holeRuns[h].count;
      h++;
    } else {
      end = zeroRuns[z].first + zeroRuns[z].count;
      z++;
    }
    const offset = first * blockBytes;
    const stop = Math.min(end * blockBytes, sizeBytes);
    const last = out.length - 2;
    if (last >= 0 && out[last] + out[last + 1] >= offset) out[last + 1] = Math.max(out[last + 1], stop - out[last]);
    else out.push(offset, stop - offset);
  }
  return Float64Array.from(out);
}

/**
 * The content of a block of committed `layers` (the newest holding it): committed layers never change
 * under a reader, their slots stay put and their spilled blocks stay in their file until they are dropped.
 */
export function layerSource(buffers: BlockBuffers, spiller: Spiller, layers: readonly Layer[]): BlockSource {
  const holder = newestHolder(layers);
  return (b) => {
    const layer = holder(b);
    assert(layer !== undefined && !layer.dropped, `block ${b} comes from a committed layer`);
    const entry = layer.dataEntry(b);
    assert(entry !== undefined, `block ${b} is in layer ${layer.id}`);
    if (isSlot(entry)) return buffers.slotBytes(entry);
    assert(isSpilled(entry), `block ${b} entry ${entry} is a spill tag`);
    return spiller.read(layer, entry).then((data) => {
      assert(data !== undefined, `spilled block ${b} of committed layer ${layer.id} is in its spill file`);
      return data;
    });
  };
}
