import { assert } from './assert.js';
import type { ByteRange } from './types.js';

/**
 * Intervals, one implementation for the engine: `RangeSet` holds a set of integers (blocks of a zero or
 * trim, byte offsets of torn ranges) as sorted, disjoint, non-adjacent [start, end) ranges, so a range of
 * any length costs one entry. Lookups are binary searches; `add` merges every range it overlaps or
 * touches with one splice; `remove` keeps the pieces of the two ranges it cuts at its ends, one splice.
 * The list functions below work on ByteRange arrays in one linear sweep.
 */
export class RangeSet {
  private readonly starts: number[] = [];
  private readonly ends: number[] = [];

  static of(ranges: readonly ByteRange[]): RangeSet {
    const set = new RangeSet();
    for (const r of ranges) if (r.length > 0) set.add(r.offset, r.offset + r.length);
    return set;
  }

  get size(): number {
    return this.starts.length;
  }

  /** The ranges as two parallel sorted arrays, read-only and valid until the next change. */
  view(): { readonly starts: readonly number[]; readonly ends: readonly number[] } {
    return { starts: this.starts, ends: this.ends };
  }

  has(x: number): boolean {
    const i = firstAbove(this.ends, x);
    return i < this.starts.length && this.starts[i] <= x;
  }

  /** Whether any of [start, end) is in the set. */
  intersects(start: number, end: number): boolean {
    const i = firstAbove(this.ends, start);
    return i < this.starts.length && this.starts[i] < end;
  }

  /** Adds [start, end); returns the change in the number of ranges (1 at most, negative when it merges). */
  add(start: number, end: number): number {
    assert(Number.isSafeInteger(start) && Number.isSafeInteger(end) && start >= 0 && start < end, `range ${start}..${end}`);
    const i = firstAtLeast(this.ends, start);
    const j = firstAbove(this.starts, end);
    const mergedStart = i < j ? Math.min(start, this.starts[i]) : start;
    const mergedEnd = i < j ? Math.max(end, this.ends[j - 1]) : end;
    this.starts.splice(i, j - i, mergedStart);
    this.ends.splice(i, j - i, mergedEnd);
    return 1 - (j - i);
  }

  /**
   * Removes [start, end); returns the change in the number of ranges (1 at most, when it cuts one range
   * in two; negative when it swallows ranges whole).
   */
  remove(start: number, end: number): number {
    assert(Number.isSafeInteger(start) && Number.isSafeInteger(end) && start >= 0 && start < end, `range ${start}..${end}`);
    const i = firstAbove(this.ends, start);
    const j = firstAtLeast(this.starts, end);
    if (i >= j) return 0;
    const starts: number[] = [];
    const ends: number[] = [];
    if (this.starts[i] < start) {
      starts.push(this.starts[i]);
      ends.push(start);
    }
    if (this.ends[j - 1] > end) {
      starts.push(end);
      ends.push(this.ends[j - 1]);
    }
    this.starts.splice(i, j - i, ...starts);
    this.ends.splice(i, j - i, ...ends);
    return starts.length - (j - i);
  }

  clear(): void {
    this.starts.length = 0;
    this.ends.length = 0;
  }

  /** The ranges in order, as [start, end) pairs. */
  *[Symbol.iterator](): IterableIterator<[number, number]> {
    for (let i = 0; i < this.starts.length; i++) yield [this.starts[i], this.ends[i]];
  }
}

/** First index whose value is >= x, in an ascending array. */
function firstAtLeast(values: readonly number[], x: number): number {
  let lo = 0;
  let hi = values.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (values[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** First index whose value is > x, in an ascending array. */
function firstAbove(values: readonly number[], x: number): number {
  return firstAtLeast(values, x + 1);
}

/** Sorted, merged copy of `ranges` (touching ranges merge, empty ones go). */
export function mergeRanges(ranges: readonly ByteRange[]): ByteRange[] {
  const sorted = ranges.filter((r) => r.length > 0).sort((a, b) => a.offset - b.offset);
  const out: { offset: number; length: number }[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last !== undefined && r.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, r.offset + r.length - last.offset);
    } else {
      out.push({ offset: r.offset, length: r.length });
    }
  }
  return out;
}

/**
 * `ranges` minus `cut`: the parts of `ranges` no range of `cut` covers. Both may be unsorted; after the
 * sorts, one sweep with a cursor into each list, so the cost is O(n log n) however they overlap.
 */
export function subtractRanges(ranges: readonly ByteRange[], cut: readonly ByteRange[]): ByteRange[] {
  const cuts = mergeRanges(cut);
  const out: ByteRange[] = [];
  let c = 0;
  for (const r of mergeRanges(ranges)) {
    let start = r.offset;
    const end = r.offset + r.length;
    while (c < cuts.length && cuts[c].offset + cuts[c].length <= start) c++;
    for (let k = c; k < cuts.length && cuts[k].offset < end; k++) {
      if (cuts[k].offset > start) out.push({ offset: start, length: cuts[k].offset - start });
      start = Math.max(start, cuts[k].offset + cuts[k].length);
      if (start >= end) break;
    }
    if (start < end) out.push({ offset: start, length: end - start });
  }
  return out;
}

/**
 * Ranges as (offset, length) pairs in one Float64Array, sorted and merged: what a flush pass records for
 * the ranges it may tear. A pass over a GiB of random blocks covers tens of thousands of ranges, and as
 * objects they outlive the young generation and cost every scavenge of the pass.
 */
export type RangePairs = Float64Array;

export function rangesOfPairs(pairs: RangePairs): ByteRange[] {
  const out: ByteRange[] = [];
  for (let i = 0; i < pairs.length; i += 2) out.push({ offset: pairs[i], length: pairs[i + 1] });
  return out;
}

export function pairsOfRanges(ranges: readonly ByteRange[]): RangePairs {
  const merged = mergeRanges(ranges);
  const pairs = new Float64Array(merged.length * 2);
  merged.forEach((r, i) => {
    pairs[2 * i] = r.offset;
    pairs[2 * i + 1] = r.length;
  });
  return pairs;
}

/** The pairs' bytes as encodeRanges writes them (little-endian float64s). */
export function encodePairs(pairs: RangePairs): Buffer {
  if (littleEndian) return Buffer.from(pairs.buffer, pairs.byteOffset, pairs.byteLength);
  const out = Buffer.alloc(pairs.byteLength);
  for (let i = 0; i < pairs.length; i++) out.writeDoubleLE(pairs[i], i * 8);
  return out;
}

const littleEndian = new Uint8Array(new Float64Array([1]).buffer)[7] === 0x3f;

/** Ranges as little-endian float64 pairs (offsets are safe integers, exact in a double). */
export function encodeRanges(ranges: readonly ByteRange[]): Buffer {
  const out = Buffer.alloc(ranges.length * 16);
  ranges.forEach((r, i) => {
    out.writeDoubleLE(r.offset, i * 16);
    out.writeDoubleLE(r.length, i * 16 + 8);
  });
  return out;
}

/** The inverse of encodeRanges; undefined when the bytes are not a list of valid ranges. */
export function decodeRanges(bytes: Uint8Array | undefined): ByteRange[] | undefined {
  if (bytes === undefined) return [];
  if (bytes.byteLength % 16 !== 0) return undefined;
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out: ByteRange[] = [];
  for (let i = 0; i < buf.length; i += 16) {
    const offset = buf.readDoubleLE(i);
    const length = buf.readDoubleLE(i + 8);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0) return undefined;
    out.push({ offset, length });
  }
  return out;
}
