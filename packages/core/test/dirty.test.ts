/**
 * The primary role's building blocks. Goal: the dirty bitmap is a set of blocks (add, remove, union,
 * difference, runs, count) whatever the runs and extents; the ordering primitives keep overlapping
 * requests in arrival order and a barrier waits for exactly what entered before it. Method: fast-check
 * properties against a plain Set model, and explicit interleavings.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BlockBitmap } from '../src/dirty.js';
import { Order, Tally } from '../src/inflight.js';

const blocksPerExtent = 64;
const blocksMax = 6 * blocksPerExtent + 7;

const op = fc.record({
  kind: fc.constantFrom('add', 'remove', 'addAll', 'removeAll'),
  first: fc.integer({ min: 0, max: blocksMax }),
  length: fc.integer({ min: 0, max: 3 * blocksPerExtent }),
});

function runsOf(set: Set<number>): [number, number][] {
  const sorted = [...set].sort((a, b) => a - b);
  const out: [number, number][] = [];
  for (const b of sorted) {
    const last = out.at(-1);
    if (last !== undefined && last[1] === b) last[1] = b + 1;
    else out.push([b, b + 1]);
  }
  return out;
}

describe('BlockBitmap', () => {
  it('behaves as a set of blocks under any sequence of adds, removes, unions and differences', () => {
    fc.assert(
      fc.property(fc.array(op, { maxLength: 40 }), (ops) => {
        const bitmap = new BlockBitmap(blocksPerExtent);
        const model = new Set<number>();
        for (const { kind, first, length } of ops) {
          const end = first + length;
          if (kind === 'add' || kind === 'addAll') {
            if (kind === 'add') bitmap.add(first, end);
            else {
              const other = new BlockBitmap(blocksPerExtent);
              other.add(first, end);
              bitmap.addAll(other);
            }
            for (let b = first; b < end; b++) model.add(b);
          } else {
            if (kind === 'remove') bitmap.remove(first, end);
            else {
              const other = new BlockBitmap(blocksPerExtent);
              other.add(first, end);
              bitmap.removeAll(other);
            }
            for (let b = first; b < end; b++) model.delete(b);
          }
          expect(bitmap.count).toBe(model.size);
        }
        expect([...bitmap.runs()]).toEqual(runsOf(model));
        for (let b = 0; b < blocksMax + 3 * blocksPerExtent; b += 5) expect(bitmap.has(b)).toBe(model.has(b));
        // Extents without a block are dropped: no memory held for clean extents.
        for (const e of bitmap.extentNumbers()) expect(bitmap.extentBits(e)!.some((w) => w !== 0)).toBe(true);
      }),
    );
  });

  it('joins runs across extent borders and whole words', () => {
    const bitmap = new BlockBitmap(64);
    bitmap.add(60, 70);
    bitmap.add(128, 192);
    bitmap.add(31, 33);
    expect([...bitmap.runs()]).toEqual([
      [31, 33],
      [60, 70],
      [128, 192],
    ]);
    bitmap.remove(0, 1000);
    expect(bitmap.isEmpty).toBe(true);
    expect([...bitmap.extentNumbers()]).toEqual([]);
  });
});

describe('Order', () => {
  it('an overlapping request waits for those ahead of it; others pass at once', async () => {
    const order = new Order(64 * 1024);
    const seen: string[] = [];
    const a = order.enter(0, 4096);
    const b = order.enter(2048, 100_000);
    const c = order.enter(1024 * 1024, 4096);
    expect(a.before).toBeNull();
    expect(c.before).toBeNull();
    expect(b.before).not.toBeNull();
    const bDone = b.before!.then(() => seen.push('b'));
    seen.push('c');
    c.leave();
    seen.push('a');
    a.leave();
    await bDone;
    b.leave();
    expect(seen).toEqual(['c', 'a', 'b']);
    expect(order.enter(0, 200_000).before).toBeNull();
  });
});

describe('Tally', () => {
  it('a barrier waits for what entered before it, not after', async () => {
    const tally = new Tally();
    const first = tally.enter();
    let passed = false;
    const barrier = tally.barrier().then(() => (passed = true));
    const later = tally.enter();
    await Promise.resolve();
    expect(passed).toBe(false);
    tally.leave(first);
    await barrier;
    expect(passed).toBe(true);
    expect(tally.inFlight).toBe(1);
    tally.leave(later);
    await tally.barrier();
  });
});
