import { randomBytes } from 'node:crypto';
import { z } from 'zod';

/**
 * Generation identifiers (as DRBD's): a volume's lineage. Each side keeps a current id and the ids it
 * had before, newest first. A side takes a new id when it becomes primary, when it fails over, and when
 * it first writes while not replicating since it was last in sync; a secondary adopts the primary's id
 * once a resync from it is durable. Comparing two sides at connect tells which one is newer:
 *
 * - `same`: neither moved on since they were last in sync;
 * - `local-newer` / `peer-newer`: the other side's current id is in this side's (that side's) history:
 *   only one side moved on, and it resyncs the other;
 * - `split-brain`: both moved on since they split, or their histories share nothing at all (two
 *   unrelated lineages: which disk is right is the operator's call, never overwritten silently);
 * - `unknown`: a side has no current id (a fresh disk, or one whose data was discarded): it gets a
 *   full sync from the other.
 */

/** Ids kept in a generation's history: a side further behind than this compares as split brain. */
export const generationHistoryMax = 8;
const idBytes = 8;

export interface Generation {
  /** 16 hex digits; null: this side's data is unknown (fresh or discarded), it takes a full sync. */
  readonly current: string | null;
  /** Earlier ids, newest first, at most generationHistoryMax. */
  readonly history: readonly string[];
}

export type GenerationRelation = 'same' | 'local-newer' | 'peer-newer' | 'split-brain' | 'unknown';

const idSchema = z.string().regex(/^[0-9a-f]{16}$/, 'must be 16 lowercase hex digits');
export const generationSchema = z
  .object({
    current: idSchema.nullable(),
    history: z.array(idSchema).max(generationHistoryMax),
  })
  .strict();

export function newGenerationId(): string {
  return randomBytes(idBytes).toString('hex');
}

/** A new lineage: a new volume of the primary role. */
export function newGeneration(): Generation {
  return { current: newGenerationId(), history: [] };
}

/** A side with no generation: what a fresh secondary has. */
export const unknownGeneration: Generation = { current: null, history: [] };

/** The next id of a lineage: the current one goes to the head of the history. */
export function nextGeneration(g: Generation): Generation {
  return { current: newGenerationId(), history: pushed(g) };
}

/** The same lineage with its data unknown (discarded, or demoted to a stale copy): the current id joins the history. */
export function forgetGeneration(g: Generation): Generation {
  return { current: null, history: pushed(g) };
}

function pushed(g: Generation): string[] {
  return (g.current === null ? [...g.history] : [g.current, ...g.history]).slice(0, generationHistoryMax);
}

/** How `local` stands to `peer` (see the module comment); null is a side with no generation at all. */
export function compareGenerations(local: Generation | null, peer: Generation | null): GenerationRelation {
  if (local === null || peer === null || local.current === null || peer.current === null) return 'unknown';
  if (local.current === peer.current) return 'same';
  if (local.history.includes(peer.current)) return 'local-newer';
  if (peer.history.includes(local.current)) return 'peer-newer';
  return 'split-brain';
}

export function sameGeneration(a: Generation | null, b: Generation | null): boolean {
  if (a === null || b === null) return a === b;
  return a.current === b.current && a.history.length === b.history.length && a.history.every((id, i) => id === b.history[i]);
}

/** A copy safe to hand out (stats, events). */
export function copyGeneration(g: Generation): Generation {
  return { current: g.current, history: [...g.history] };
}
