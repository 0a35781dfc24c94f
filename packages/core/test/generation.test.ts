/**
 * Generation identifiers (generation.ts): how two sides' lineages compare. Method: fast-check builds two
 * sides that share a lineage and then each take some further steps (new ids, forgets), and checks the
 * comparison against what happened: who moved on, whether both did, whether one side's data is unknown.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  compareGenerations,
  forgetGeneration,
  generationHistoryMax,
  generationSchema,
  newGeneration,
  nextGeneration,
  unknownGeneration,
  type Generation,
  type GenerationRelation,
} from '@gannet/core';

const mirror: Record<GenerationRelation, GenerationRelation> = {
  same: 'same',
  'local-newer': 'peer-newer',
  'peer-newer': 'local-newer',
  'split-brain': 'split-brain',
  unknown: 'unknown',
};

function steps(g: Generation, n: number): Generation {
  let out = g;
  for (let i = 0; i < n; i++) out = nextGeneration(out);
  return out;
}

/** A shared lineage some steps long, then `a` and `b` further steps on each side. */
const split = fc.record({ common: fc.integer({ min: 1, max: 6 }), a: fc.integer({ min: 0, max: generationHistoryMax + 2 }), b: fc.integer({ min: 0, max: generationHistoryMax + 2 }) });

describe('generation ids', () => {
  it('ids are 16 hex digits, histories newest first and bounded', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 3 * generationHistoryMax }), (n) => {
        const start = newGeneration();
        const g = steps(start, n);
        expect(generationSchema.safeParse(g).success).toBe(true);
        expect(g.history.length).toBe(Math.min(n, generationHistoryMax));
        if (n > 0 && n <= generationHistoryMax) expect(g.history.at(-1)).toBe(start.current);
      }),
    );
  });

  it('compares as what happened: same, one side newer, or split brain when both moved on', () => {
    fc.assert(
      fc.property(split, ({ common, a, b }) => {
        const base = steps(newGeneration(), common);
        const local = steps(base, a);
        const peer = steps(base, b);
        const relation = compareGenerations(local, peer);
        if (a === 0 && b === 0) expect(relation).toBe('same');
        else if (b === 0) expect(relation).toBe(a <= generationHistoryMax ? 'local-newer' : 'split-brain');
        else if (a === 0) expect(relation).toBe(b <= generationHistoryMax ? 'peer-newer' : 'split-brain');
        else expect(relation).toBe('split-brain');
        expect(compareGenerations(peer, local)).toBe(mirror[relation]);
      }),
    );
  });

  it('a side with no generation, or whose data was forgotten, is unknown whatever the other side is', () => {
    fc.assert(
      fc.property(split, ({ common, a, b }) => {
        const base = steps(newGeneration(), common);
        const local = steps(base, a);
        const moved = steps(base, b);
        const forgotten = forgetGeneration(moved);
        expect(forgotten.current).toBeNull();
        expect(forgotten.history[0]).toBe(moved.current);
        expect(compareGenerations(local, forgotten)).toBe('unknown');
        expect(compareGenerations(forgotten, local)).toBe('unknown');
        expect(compareGenerations(local, null)).toBe('unknown');
        expect(compareGenerations(unknownGeneration, local)).toBe('unknown');
        // A forgotten side that takes a new id (it failed over) still carries the lineage it forgot: newer
        // than a side that did not move on since, split from one that did.
        expect(compareGenerations(local, nextGeneration(forgotten))).toBe(a === 0 && b < generationHistoryMax ? 'peer-newer' : 'split-brain');
      }),
    );
  });

  it('two unrelated lineages are a split brain, never silently one newer than the other', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 10 }), fc.integer({ min: 0, max: 10 }), (a, b) => {
        expect(compareGenerations(steps(newGeneration(), a), steps(newGeneration(), b))).toBe('split-brain');
      }),
    );
  });
});
