import { assert } from './assert.js';

/**
 * A set of blocks as a bitmap kept by extent: each extent that has a block in the set is one Uint32Array
 * of bits, made when its first bit is set and dropped when its last is cleared, so a disk of TiBs with a
 * few hot extents costs a few hundred bytes, and a random 4K write is one map lookup and one word. Runs
 * are set and cleared a word at a time. The primary role keeps what the peer has not made durable in
 * these (primary.ts), and the activity log persists them by extent (activity-log.ts).
 */
export class BlockBitmap {
  readonly blocksPerExtent: number;
  private readonly wordsPerExtent: number;
  private readonly extents = new Map<number, Uint32Array>();
  private blocks = 0;

  constructor(blocksPerExtent: number) {
    assert(blocksPerExtent >= 32 && blocksPerExtent % 32 === 0, `blocksPerExtent ${blocksPerExtent} is a multiple of 32`);
    this.blocksPerExtent = blocksPerExtent;
    this.wordsPerExtent = blocksPerExtent / 32;
  }

  /** Blocks in the set. */
  get count(): number {
    return this.blocks;
  }

  get isEmpty(): boolean {
    return this.blocks === 0;
  }

  has(block: number): boolean {
    const words = this.extents.get(Math.floor(block / this.blocksPerExtent));
    if (words === undefined) return false;
    const bit = block % this.blocksPerExtent;
    return (words[bit >>> 5] & (1 << (bit & 31))) !== 0;
  }

  /** Adds blocks [first, end). */
  add(first: number, end: number): void {
    this.forEachSpan(first, end, (extent, from, to) => {
      let words = this.extents.get(extent);
      if (words === undefined) {
        words = new Uint32Array(this.wordsPerExtent);
        this.extents.set(extent, words);
      }
      this.blocks += setBits(words, from, to);
    });
  }

  /** Removes blocks [first, end). */
  remove(first: number, end: number): void {
    this.forEachSpan(first, end, (extent, from, to) => {
      const words = this.extents.get(extent);
      if (words === undefined) return;
      this.blocks -= clearBits(words, from, to);
      if (isZero(words)) this.extents.delete(extent);
    });
    assert(this.blocks >= 0, 'bitmap count never negative');
  }

  /** Adds every block of `other`. */
  addAll(other: BlockBitmap): void {
    assert(other.blocksPerExtent === this.blocksPerExtent, 'bitmaps of one geometry');
    for (const [extent, bits] of other.extents) this.orExtent(extent, bits);
  }

  /** Removes every block of `other`. */
  removeAll(other: BlockBitmap): void {
    for (const [extent, bits] of other.extents) {
      const words = this.extents.get(extent);
      if (words === undefined) continue;
      for (let i = 0; i < words.length; i++) {
        const cleared = words[i] & bits[i];
        if (cleared !== 0) {
          this.blocks -= popcount(cleared);
          words[i] &= ~bits[i];
        }
      }
      if (isZero(words)) this.extents.delete(extent);
    }
  }

  /** ORs one extent's bits (as `extentBits` gives them) into the set. */
  orExtent(extent: number, bits: Uint32Array): void {
    assert(bits.length === this.wordsPerExtent, 'extent bits of this geometry');
    let words = this.extents.get(extent);
    for (let i = 0; i < bits.length; i++) {
      const added = bits[i] & ~(words?.[i] ?? 0);
      if (added === 0) continue;
      if (words === undefined) {
        words = new Uint32Array(this.wordsPerExtent);
        this.extents.set(extent, words);
      }
      words[i] |= added;
      this.blocks += popcount(added);
    }
  }

  /** The extent's bits (live, read-only), or undefined when none is set. */
  extentBits(extent: number): Uint32Array | undefined {
    return this.extents.get(extent);
  }

  /** Extents with at least one block in the set, in no particular order. */
  extentNumbers(): IterableIterator<number> {
    return this.extents.keys();
  }

  clear(): void {
    this.extents.clear();
    this.blocks = 0;
  }

  /** The set as ascending runs of blocks [first, end), adjacent runs across extents joined. */
  *runs(): IterableIterator<[number, number]> {
    const order = [...this.extents.keys()].sort((a, b) => a - b);
    let start = -1;
    let end = -1;
    for (const extent of order) {
      const words = this.extents.get(extent)!;
      const base = extent * this.blocksPerExtent;
      for (let w = 0; w < words.length; w++) {
        let word = words[w];
        if (word === 0) continue;
        let bit = 0;
        while (word !== 0) {
          const skip = trailingZeros(word);
          bit += skip;
          word >>>= skip;
          const ones = trailingZeros(~word);
          const first = base + w * 32 + bit;
          if (first === end) end = first + ones;
          else {
            if (start >= 0) yield [start, end];
            start = first;
            end = first + ones;
          }
          bit += ones;
          word = ones === 32 ? 0 : word >>> ones;
        }
      }
    }
    if (start >= 0) yield [start, end];
  }

  private forEachSpan(first: number, end: number, span: (extent: number, from: number, to: number) => void): void {
    assert(Number.isSafeInteger(first) && Number.isSafeInteger(end) && first >= 0 && first <= end, `blocks ${first}..${end}`);
    let at = first;
    while (at < end) {
      const extent = Math.floor(at / this.blocksPerExtent);
      const base = extent * this.blocksPerExtent;
      const stop = Math.min(end, base + this.blocksPerExtent);
      span(extent, at - base, stop - base);
      at = stop;
    }
  }
}

function trailingZeros(x: number): number {
  return x === 0 ? 32 : 31 - Math.clz32(x & -x);
}

function popcount(x: number): number {
  let v = x >>> 0;
  v -= (v >>> 1) & 0x55555555;
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

/** Sets bits [from, to) of `words`; returns how many were clear. */
function setBits(words: Uint32Array, from: number, to: number): number {
  let added = 0;
  let bit = from;
  while (bit < to) {
    const w = bit >>> 5;
    const lo = bit & 31;
    const hi = Math.min(32, to - (w << 5));
    if (lo === 0 && hi === 32) {
      added += 32 - popcount(words[w]);
      words[w] = 0xffffffff;
    } else {
      const mask = maskOf(lo, hi);
      added += popcount(mask & ~words[w]);
      words[w] |= mask;
    }
    bit = (w + 1) << 5;
  }
  return added;
}

/** Clears bits [from, to) of `words`; returns how many were set. */
function clearBits(words: Uint32Array, from: number, to: number): number {
  let removed = 0;
  let bit = from;
  while (bit < to) {
    const w = bit >>> 5;
    const lo = bit & 31;
    const hi = Math.min(32, to - (w << 5));
    const mask = lo === 0 && hi === 32 ? 0xffffffff : maskOf(lo, hi);
    removed += popcount(words[w] & mask);
    words[w] &= ~mask;
    bit = (w + 1) << 5;
  }
  return removed;
}

/** Bits [lo, hi) of a word, 0 <= lo < hi <= 32. */
function maskOf(lo: number, hi: number): number {
  const upper = hi === 32 ? 0xffffffff : (1 << hi) - 1;
  return (upper & ~((1 << lo) - 1)) >>> 0;
}

function isZero(words: Uint32Array): boolean {
  for (let i = 0; i < words.length; i++) if (words[i] !== 0) return false;
  return true;
}
