import { z } from 'zod';
import { GannetError } from './errors.js';
import type { KvOp, KvRange, KvStore } from './kv.js';
import { decodeRanges, encodePairs, encodeRanges, type RangePairs } from './ranges.js';
import { generationSchema, type Generation } from './generation.js';
import type { ByteRange, FailoverTarget, SplitBrain } from './types.js';

/**
 * The volume's replication metadata, in a key-value store (LevelDB, one per volume, in dataDir): the
 * identity, the durable epoch and the epoch lease, the ranges a flush has in flight and the torn ones,
 * and where a failover stands. Every state change is one batch; batches a restart relies on are synced.
 * Every value is checked when the volume opens: a damaged one refuses the volume with the key named.
 *
 * Keys: m/identity {uuid, sizeBytes, blockBytes} (JSON); m/state replicating | failover-pending |
 * failed-over; m/target; m/failover-at (when a pending failover was requested); m/durable-epoch and
 * m/epoch-ceiling (decimal); m/flushing and m/torn (byte ranges, float64 pairs); m/lost-failover (JSON:
 * a failover the process stopped before it was durable); m/inconsistent (JSON: a resync from the primary
 * is under way, since when); m/generation (JSON {current, history}: generation.ts; absent: unknown) and
 * m/generation-before (the one a pending failover replaced, put back if that failover is lost);
 * m/discard (JSON {at}: discardSecondary has begun turning this failed-over volume back into a
 * replicating one); m/split-brain (JSON {local, peer, since}: the last primary that attached had written
 * since it split from this volume). Earlier versions kept a journal under j/ and
 * spilled blocks under s/; `clearLegacy` drops them.
 */

export type PersistedState = 'replicating' | 'failover-pending' | 'failed-over';

export interface Identity {
  /** Names the volume for good: its state file and its metadata must agree on it. */
  readonly uuid: string;
  readonly sizeBytes: number;
  readonly blockBytes: number;
}

export interface LostFailover {
  readonly target: FailoverTarget;
  readonly requestedAt: string;
  readonly lostAt: string;
}

export interface PersistedMeta {
  identity: Identity | null;
  state: PersistedState;
  target: FailoverTarget | null;
  failoverAt: string | null;
  durableEpoch: number;
  epochCeiling: number;
  flushing: ByteRange[];
  torn: ByteRange[];
  lostFailover: LostFailover | null;
  /** Set while a resync from the primary has the disk half-way (the primary clears it). */
  inconsistent: Inconsistent | null;
  /** Null: the volume has none yet (a fresh disk): the primary's first sync is a full one. */
  generation: Generation | null;
  generationBefore: Generation | null;
  /** A discard of this failed-over volume began (see discardSecondary). */
  discard: { readonly at: string } | null;
  splitBrain: SplitBrain | null;
}

export interface Inconsistent {
  readonly since: string;
}

const key = {
  identity: 'm/identity',
  state: 'm/state',
  target: 'm/target',
  failoverAt: 'm/failover-at',
  durableEpoch: 'm/durable-epoch',
  epochCeiling: 'm/epoch-ceiling',
  flushing: 'm/flushing',
  torn: 'm/torn',
  lostFailover: 'm/lost-failover',
  inconsistent: 'm/inconsistent',
  generation: 'm/generation',
  generationBefore: 'm/generation-before',
  discard: 'm/discard',
  splitBrain: 'm/split-brain',
} as const;
const legacyRanges: KvRange[] = [
  { gte: 'j/', lt: 'j0' },
  { gte: 's/', lt: 's0' },
];

const text = (s: string) => Buffer.from(s);
const str = (v: Uint8Array) => Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString('utf8');
const target = z.enum(['secondary', 'checkpoint', 'primary']);
const epochNumber = z
  .string()
  .regex(/^\d{1,16}$/, 'must be a decimal epoch number')
  .transform(Number)
  .pipe(z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER));
const json = <T extends z.ZodType>(schema: T) =>
  z.string().transform((s, ctx) => {
    try {
      return JSON.parse(s) as unknown;
    } catch {
      ctx.addIssue({ code: 'custom', message: 'is not JSON' });
      return z.NEVER;
    }
  }).pipe(schema);
const identitySchema = json(
  z
    .object({
      uuid: z.uuid().optional(),
      sizeBytes: z.number().int().positive().max(2 ** 52),
      blockBytes: z.number().int().positive(),
    })
    .strict(),
);
const lostFailoverSchema = json(z.object({ target, requestedAt: z.string(), lostAt: z.string() }).strict());
const inconsistentSchema = json(z.object({ since: z.string() }).strict());
const generationJson = json(generationSchema);
const discardSchema = json(z.object({ at: z.string() }).strict());
const splitBrainSchema = json(z.object({ local: generationSchema, peer: generationSchema, since: z.string() }).strict());
const generationOp = (k: string, g: Generation | null): KvOp => (g === null ? { type: 'del', key: k } : { type: 'put', key: k, value: text(JSON.stringify(g)) });

export class MetaStore {
  constructor(
    private readonly kv: KvStore,
    /** Where the store is, for messages. */
    readonly location: string,
  ) {}

  async load(): Promise<PersistedMeta & { legacyIdentity: boolean }> {
    const keys = Object.values(key);
    const values = await this.kv.getMany(keys);
    const raw = Object.fromEntries(keys.map((k, i) => [k, values[i]])) as Record<string, Uint8Array | undefined>;
    const field = <T>(k: string, schema: z.ZodType<T>): T | null => {
      const v = raw[k];
      if (v === undefined) return null;
      const parsed = schema.safeParse(str(v));
      if (!parsed.success) throw this.damaged(k, parsed.error.issues[0].message);
      return parsed.data;
    };
    const ranges = (k: string): ByteRange[] => {
      const decoded = decodeRanges(raw[k]);
      if (decoded === undefined) throw this.damaged(k, 'holds no valid list of byte ranges');
      return decoded;
    };
    const identity = field(key.identity, identitySchema);
    const state = field(key.state, z.enum(['replicating', 'failover-pending', 'failed-over', 'failing-over']));
    if (state === 'failing-over') {
      throw this.damaged(key.state, 'records a failover journal of an earlier gannet version: finish that failover with it first');
    }
    const loaded = {
      identity: identity === null ? null : { uuid: identity.uuid ?? '', sizeBytes: identity.sizeBytes, blockBytes: identity.blockBytes },
      legacyIdentity: identity !== null && identity.uuid === undefined,
      state: state ?? 'replicating',
      target: field(key.target, target),
      failoverAt: field(key.failoverAt, z.string()),
      durableEpoch: field(key.durableEpoch, epochNumber) ?? 0,
      epochCeiling: field(key.epochCeiling, epochNumber) ?? 0,
      flushing: ranges(key.flushing),
      torn: ranges(key.torn),
      lostFailover: field(key.lostFailover, lostFailoverSchema),
      inconsistent: field(key.inconsistent, inconsistentSchema),
      generation: field(key.generation, generationJson),
      generationBefore: field(key.generationBefore, generationJson),
      discard: field(key.discard, discardSchema),
      splitBrain: field(key.splitBrain, splitBrainSchema),
    };
    if (identity !== null && state === null) throw this.damaged(key.state, 'is missing');
    if (state !== null && identity === null) throw this.damaged(key.identity, 'is missing');
    if ((loaded.state === 'failover-pending' || loaded.state === 'failed-over') && loaded.target === null) {
      throw this.damaged(key.target, `is missing while the state is ${loaded.state}`);
    }
    return loaded;
  }

  /** First open: the identity, state and first epoch lease in one batch. */
  async create(identity: Identity, epochCeiling: number, durable: { epoch: number; torn: readonly ByteRange[] }): Promise<void> {
    await this.kv.batch(
      [
        { type: 'put', key: key.identity, value: text(JSON.stringify(identity)) },
        { type: 'put', key: key.state, value: text('replicating') },
        { type: 'put', key: key.durableEpoch, value: text(String(durable.epoch)) },
        { type: 'put', key: key.epochCeiling, value: text(String(epochCeiling)) },
        tornOp(durable.torn),
      ],
      { sync: true },
    );
  }

  /** A store written before volumes had a uuid gets one. */
  async putIdentity(identity: Identity): Promise<void> {
    await this.kv.batch([{ type: 'put', key: key.identity, value: text(JSON.stringify(identity)) }], { sync: true });
  }

  /** Reopen after a flush was interrupted: its ranges become torn ranges, and a new epoch lease. */
  async reopen(torn: readonly ByteRange[], epochCeiling: number): Promise<void> {
    await this.kv.batch(
      [tornOp(torn), { type: 'del', key: key.flushing }, { type: 'put', key: key.epochCeiling, value: text(String(epochCeiling)) }],
      { sync: true },
    );
  }

  async putEpochCeiling(epochCeiling: number): Promise<void> {
    await this.kv.batch([{ type: 'put', key: key.epochCeiling, value: text(String(epochCeiling)) }], { sync: true });
  }

  /** Before a flush writes anything: the ranges it may leave torn if the process dies mid-write. */
  async recordFlushing(ranges: RangePairs): Promise<void> {
    await this.kv.batch([{ type: 'put', key: key.flushing, value: encodePairs(ranges) }], { sync: true });
  }

  /** After the flush's fdatasync: the durable epoch advances and nothing is in flight any more. */
  async recordDurable(durableEpoch: number, torn: readonly ByteRange[]): Promise<void> {
    await this.kv.batch(
      [{ type: 'put', key: key.durableEpoch, value: text(String(durableEpoch)) }, { type: 'del', key: key.flushing }, tornOp(torn)],
      { sync: true },
    );
  }

  /**
   * Marks the disk inconsistent (a resync from the primary began) or consistent again (it ended); with a
   * generation, the volume adopts it in the same batch (the resync made it that lineage's copy).
   */
  async putInconsistent(inconsistent: Inconsistent | null, generation?: Generation): Promise<void> {
    const op: KvOp = inconsistent === null ? { type: 'del', key: key.inconsistent } : { type: 'put', key: key.inconsistent, value: text(JSON.stringify(inconsistent)) };
    await this.kv.batch(generation === undefined ? [op] : [op, generationOp(key.generation, generation)], { sync: true });
  }

  /**
   * The foreground of a failover: requested, not durable yet (a restart before it is reports it lost).
   * The volume takes its next generation in the same batch, keeping the one before in case it is lost.
   */
  async recordFailoverPending(to: FailoverTarget, at: string, generation: Generation, before: Generation | null): Promise<void> {
    await this.kv.batch(
      [
        { type: 'put', key: key.state, value: text('failover-pending') },
        { type: 'put', key: key.target, value: text(to) },
        { type: 'put', key: key.failoverAt, value: text(at) },
        generationOp(key.generation, generation),
        generationOp(key.generationBefore, before),
      ],
      { sync: true },
    );
  }

  /**
   * The process stopped before a requested failover was durable: the volume is back at its checkpoint,
   * and at the generation it had then (its disk is still that lineage's copy).
   */
  async recordFailoverLost(lost: LostFailover, generation: Generation | null): Promise<void> {
    await this.kv.batch(
      [
        { type: 'put', key: key.state, value: text('replicating') },
        { type: 'del', key: key.target },
        { type: 'del', key: key.failoverAt },
        { type: 'put', key: key.lostFailover, value: text(JSON.stringify(lost)) },
        generationOp(key.generation, generation),
        { type: 'del', key: key.generationBefore },
      ],
      { sync: true },
    );
  }

  /** A primary split from this volume attached (refused), or one that is not split did (null). */
  async putSplitBrain(splitBrain: SplitBrain | null): Promise<void> {
    const op: KvOp = splitBrain === null ? { type: 'del', key: key.splitBrain } : { type: 'put', key: key.splitBrain, value: text(JSON.stringify(splitBrain)) };
    await this.kv.batch([op], { sync: true });
  }

  /** Step 1 of discardSecondary (role-change.ts): the intent, before the state file says replicating. */
  async recordDiscardBegun(at: string): Promise<void> {
    await this.kv.batch([{ type: 'put', key: key.discard, value: text(JSON.stringify({ at })) }], { sync: true });
  }

  /**
   * The last step of a discard: the failed-over volume is a replicating secondary again, its data
   * unknown (`generation`'s current id is null) and marked inconsistent until a primary's full sync.
   */
  async recordDiscarded(generation: Generation, inconsistent: Inconsistent): Promise<void> {
    await this.kv.batch(
      [
        { type: 'put', key: key.state, value: text('replicating') },
        { type: 'del', key: key.target },
        { type: 'del', key: key.failoverAt },
        { type: 'del', key: key.flushing },
        { type: 'del', key: key.torn },
        { type: 'del', key: key.lostFailover },
        { type: 'del', key: key.discard },
        { type: 'del', key: key.generationBefore },
        { type: 'del', key: key.splitBrain },
        generationOp(key.generation, generation),
        { type: 'put', key: key.inconsistent, value: text(JSON.stringify(inconsistent)) },
      ],
      { sync: true },
    );
  }

  /** A new secondary made from an existing disk (role-change.ts): its generation and inconsistent mark. */
  async putAdopted(generation: Generation, inconsistent: Inconsistent): Promise<void> {
    await this.kv.batch(
      [
        generationOp(key.generation, generation),
        { type: 'put', key: key.inconsistent, value: text(JSON.stringify(inconsistent)) },
        { type: 'del', key: key.splitBrain },
      ],
      { sync: true },
    );
  }

  /** The failover is durable (its journal committed): replication state is over for good. */
  async recordFailedOver(to: FailoverTarget): Promise<void> {
    await this.kv.batch(
      [
        { type: 'put', key: key.state, value: text('failed-over') },
        { type: 'put', key: key.target, value: text(to) },
        { type: 'del', key: key.failoverAt },
        { type: 'del', key: key.flushing },
        { type: 'del', key: key.torn },
        { type: 'del', key: key.lostFailover },
        { type: 'del', key: key.generationBefore },
      ],
      { sync: true },
    );
  }

  /** Drops what earlier versions kept here (journal, spilled blocks) and gives the space back. */
  async clearLegacy(): Promise<void> {
    for (const range of legacyRanges) {
      if (!(await this.kv.any(range))) continue;
      await this.kv.clear(range);
      await this.kv.compact(range);
    }
  }

  async close(): Promise<void> {
    await this.kv.close();
  }

  private damaged(k: string, problem: string): GannetError {
    return new GannetError('EMETA', `the metadata store ${this.location} is damaged: key ${k} ${problem}`);
  }
}

function tornOp(torn: readonly ByteRange[]): KvOp {
  return torn.length === 0 ? { type: 'del', key: key.torn } : { type: 'put', key: key.torn, value: encodeRanges(torn) };
}
