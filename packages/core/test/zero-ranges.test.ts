/**
 * Hole and zero ranges below the volume: RangeSet.remove against a set of blocks, and the flush plan's
 * choice per block (data, hole, or zeroes that stay allocated) against a per-block replay of the same
 * operations, over seeded random layers. The model-based test checks content only, where a hole and an
 * allocated zero look the same; this checks which one each block becomes.
 */
import { describe, expect, it } from 'vitest';
import { mergeRanges, RangeSet, rangesOfPairs } from '../src/ranges.js';
import { BlockBuffers, type Layer } from '../src/buffer.js';
import { coveredPairs, planFlush } from '../src/plan.js';
import { Rng } from '../src/rng.js';

const seedCount = 200;
const blockCount = 64;
const blockBytes = 512;

function blocksOf(ranges: RangeSet): Set<number> {
  const out = new Set<number>();
  for (const [start, end] of ranges) for (let b = start; b < end; b++) out.add(b);
  return out;
}

function randomRange(rng: Rng): [number, number] {
  const start = rng.below(blockCount);
  return [start, rng.between(start + 1, Math.min(blockCount, start + 1 + rng.below(24)))];
}

describe('RangeSet', () => {
  it('removes a range by cutting the ranges at its ends, counting the ranges it adds and drops', () => {
    const ranges = new RangeSet();
    expect(ranges.add(10, 20)).toBe(1);
    expect(ranges.remove(12, 15)).toBe(1);
    expect([...ranges]).toEqual([
      [10, 12],
      [15, 20],
    ]);
    expect(ranges.remove(0, 10)).toBe(0);
    expect(ranges.remove(11, 16)).toBe(0);
    expect([...ranges]).toEqual([
      [10, 11],
      [16, 20],
    ]);
    expect(ranges.remove(5, 30)).toBe(-2);
    expect(ranges.size).toBe(0);
  });

  it('agrees with a set of blocks over random adds and removes', () => {
    for (let seed = 1; seed <= seedCount; seed++) {
      const rng = new Rng(seed);
      const ranges = new RangeSet();
      const model = new Set<number>();
      for (let op = 0; op < 40; op++) {
        const [start, end] = randomRange(rng);
        const adding = rng.chance(0.5);
        const before = ranges.size;
        const delta = adding ? ranges.add(start, end) : ranges.remove(start, end);
        for (let b = start; b < end; b++) {
          if (adding) model.add(b);
          else model.delete(b);
        }
        expect(ranges.size - before, `seed ${seed} op ${op}: returned change`).toBe(delta);
        expect(blocksOf(ranges), `seed ${seed} op ${op}`).toEqual(model);
        const pairs = [...ranges];
        // Sorted, disjoint and not touching: every range is as long as it can be.
        for (let i = 1; i < pairs.length; i++) expect(pairs[i][0]).toBeGreaterThan(pairs[i - 1][1]);
      }
    }
  });
});

type BlockFate = 'data' | 'hole' | 'zero';

describe('planFlush', () => {
  it('makes each block data, a hole or an allocated zero as the newest layer holding it says', async () => {
    const data = new Uint8Array(blockBytes).fill(7);
    // One pool for every seed: dropped layers hand their slabs back for the next seed.
    const buffers = new BlockBuffers({ blockBytes, sizeBytes: blockCount * blockBytes, memoryBytesMax: 1024 * 1024 });
    for (let seed = 1; seed <= seedCount; seed++) {
      const rng = new Rng(seed);
      const layers: Layer[] = [];
      const fate = new Map<number, BlockFate>();
      const layerCount = rng.between(1, 6);
      for (let epoch = 0; epoch < layerCount; epoch++) {
        const layer = buffers.newLayer('primary', epoch);
        const opCount = rng.between(1, 12);
        for (let op = 0; op < opCount; op++) {
          const [start, end] = randomRange(rng);
          const kind = rng.below(3);
          for (let b = start; b < end; b++) {
            if (kind === 0) buffers.writeBlock(layer, b, 0, blockBytes, data, 0, null);
            fate.set(b, kind === 0 ? 'data' : kind === 1 ? 'hole' : 'zero');
          }
          if (kind !== 0) buffers.zeroRange(layer, start, end, kind === 2);
        }
        layers.push(layer);
      }
      const plan = await planFlush(layers);
      const planned = new Map<number, BlockFate>();
      const twice: number[] = [];
      const put = (b: number, f: BlockFate) => {
        if (planned.has(b)) twice.push(b);
        planned.set(b, f);
      };
      for (const b of plan.blocks) put(b, 'data');
      for (const run of plan.holeRuns) for (let b = run.first; b < run.first + run.count; b++) put(b, 'hole');
      for (const run of plan.zeroRuns) for (let b = run.first; b < run.first + run.count; b++) put(b, 'zero');
      expect(twice, `seed ${seed}: blocks planned twice`).toEqual([]);
      expect(planned, `seed ${seed}`).toEqual(fate);
      // The ranges a flush records as in flight: every planned block, as merged byte ranges.
      const geometry = { blockBytes, sizeBytes: blockCount * blockBytes };
      const covered = mergeRanges([...planned.keys()].map((b) => ({ offset: b * blockBytes, length: blockBytes })));
      expect(rangesOfPairs(coveredPairs(plan.blocks, plan.holeRuns, plan.zeroRuns, geometry)), `seed ${seed}: covered ranges`).toEqual(covered);
      for (const layer of layers) buffers.dropLayer(layer);
      expect(buffers.indexEntries, `seed ${seed}: index entries after every layer is dropped`).toBe(0);
    }
  });
});
