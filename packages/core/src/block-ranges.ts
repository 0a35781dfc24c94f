import { assert } from './assert.js';

/**
 * A set of blocks kept as sorted, disjoint, non-adjacent [start, end) ranges: a zero or trim of any length
 * is one range, so its cost does not grow with the number of blocks it covers. Lookups are binary
 * searches; adding a range splices the array once, merging every range it overlaps or touches; removing
 * one splices once too, keeping the pieces of the two ranges it cuts at its ends.
 */
export class BlockRanges {
  private readonly starts: number[] = [];
  private readonly ends: number[] = [];

  get size(): number {
    return this.starts.length;
  }

  /** The ranges as two parallel sorted arrays, read-only and valid until the next change. */
  view(): { readonly starts: readonly number[]; readonly ends: readonly number[] } {
    return { starts: this.starts, ends: this.ends };
  }

  has(b: number): boolean {
    const i = firstAbove(this.ends, b);
    return i < this.starts.length && this.starts[i] <= b;
  }

  /** Adds [start, end); returns the change in the number of ranges (1 at most, negative when it merges). */
  add(start: number, end: number): number {
    assert(Number.isSafeInteger(start) && Number.isSafeInteger(end) && start >= 0 && start < end, `block range ${start}..${end}`);
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
    assert(Number.isSafeInteger(start) && Number.isSafeInteger(end) && start >= 0 && start < end, `block range ${start}..${end}`);
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
