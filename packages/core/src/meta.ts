import { Level } from 'level';
import { assert } from './assert.js';
import { GannetError } from './errors.js';
import type { Run } from './plan.js';
import { decodeRanges, encodePairs, encodeRanges, type RangePairs } from './ranges.js';
import type { ByteRange, FailoverTarget } from './types.js';

/**
 * The volume's LevelDB (one per volume, in dataDir): metadata and the failover journal.
 * Every state change is one batch; batches that a restart relies on are written with `sync: true`.
 *
 * Keys: m/<name> metadata; j/<block> journal (block data, empty value = zero block); j/h<first block>
 * journal hole range (zeroes the file may deallocate) and j/z<first block> journal zero range (zeroes that
 * stay allocated), both valued with their block count in decimal and sorting after every j/<block> since
 * 'h' and 'z' follow the hex digits. Journals written before hole ranges existed hold only j/z, which
 * replays as before.
 */
type Db = Level<string, Uint8Array>;
type BatchOp = { type: 'put'; key: string; value: Uint8Array } | { type: 'del'; key: string };

export type PersistedState = 'replicating' | 'failing-over' | 'failed-over';

export interface PersistedMeta {
  identity: { sizeBytes: number; blockBytes: number } | null;
  state: PersistedState;
  target: FailoverTarget | null;
  durableEpoch: number;
  epochCeiling: number;
  flushing: ByteRange[];
  torn: ByteRange[];
}

const key = {
  identity: 'm/identity',
  state: 'm/state',
  target: 'm/target',
  durableEpoch: 'm/durable-epoch',
  epochCeiling: 'm/epoch-ceiling',
  flushing: 'm/flushing',
  torn: 'm/torn',
};
const journalPrefix = 'j/';
const journalHolesPrefix = `${journalPrefix}h`;
const journalZeroesPrefix = `${journalPrefix}z`;
/** What a hole or zero range record counts for in a journal chunk's size (its key and value, roughly). */
export const journalZeroRecordBytes = 32;
const spillPrefix = 's/';
const hex = (n: number, width: number) => n.toString(16).padStart(width, '0');
const blockKey = (b: number) => hex(b, 13);
const text = (s: string) => Buffer.from(s);
const str = (v: Uint8Array | undefined) => (v === undefined ? undefined : Buffer.from(v).toString());
const num = (v: Uint8Array | undefined) => (v === undefined ? 0 : Number(str(v)));
/** The key just past every key starting with `prefix` (prefixes end in '/', and '0' follows '/'). */
const prefixEnd = (prefix: string) => `${prefix.slice(0, -1)}0`;

/**
 * One journal record: a block's final content, or a run of blocks that end as zeroes, as a hole or kept
 * allocated. Records of one journal never overlap, so the order they are applied in does not matter and
 * applying one twice is harmless (punching a hole or zeroing a range again leaves the same zeroes).
 */
export type JournalEntry =
  | {
      block: number;
      /** Block content (blockBytes), or null for a zero block. */
      data: Uint8Array | null;
    }
  | { holes: Run }
  | { zeroes: Run };

const journalKey = (e: JournalEntry) =>
  'holes' in e
    ? journalHolesPrefix + blockKey(e.holes.first)
    : 'zeroes' in e
      ? journalZeroesPrefix + blockKey(e.zeroes.first)
      : journalPrefix + blockKey(e.block);

const journalValue = (e: JournalEntry) =>
  'holes' in e ? text(String(e.holes.count)) : 'zeroes' in e ? text(String(e.zeroes.count)) : (e.data ?? new Uint8Array(0));

function journalRun(k: string, prefix: string, v: Uint8Array): Run {
  const run = { first: parseInt(k.slice(prefix.length), 16), count: num(v) };
  assert(Number.isSafeInteger(run.count) && run.count > 0, `journal range ${k} holds a block count`);
  return run;
}

export class MetaStore {
  private readonly db: Db;

  private constructor(db: Db) {
    this.db = db;
  }

  static async open(location: string): Promise<MetaStore> {
    const db: Db = new Level<string, Uint8Array>(location, { keyEncoding: 'utf8', valueEncoding: 'view' });
    try {
      await db.open();
    } catch (err) {
      throw new GannetError('EMISMATCH', `cannot open the volume metadata store ${location}`, { cause: err });
    }
    return new MetaStore(db);
  }

  async load(): Promise<PersistedMeta> {
    const [identity, state, target, durable, ceiling, flushing, torn] = await this.db.getMany([
      key.identity,
      key.state,
      key.target,
      key.durableEpoch,
      key.epochCeiling,
      key.flushing,
      key.torn,
    ]);
    return {
      identity: identity === undefined ? null : JSON.parse(str(identity)!),
      state: (str(state) as PersistedState | undefined) ?? 'replicating',
      target: (str(target) as FailoverTarget | undefined) ?? null,
      durableEpoch: num(durable),
      epochCeiling: num(ceiling),
      flushing: storedRanges(key.flushing, flushing),
      torn: storedRanges(key.torn, torn),
    };
  }

  /** First open: the identity, state and first epoch lease in one batch. */
  async create(identity: { sizeBytes: number; blockBytes: number }, epochCeiling: number): Promise<void> {
    await this.db.batch(
      [
        { type: 'put', key: key.identity, value: text(JSON.stringify(identity)) },
        { type: 'put', key: key.state, value: text('replicating') },
        { type: 'put', key: key.durableEpoch, value: text('0') },
        { type: 'put', key: key.epochCeiling, value: text(String(epochCeiling)) },
      ],
      { sync: true },
    );
  }

  /** Reopen after a flush was interrupted: its ranges become torn ranges, and a new epoch lease. */
  async reopen(torn: readonly ByteRange[], epochCeiling: number): Promise<void> {
    await this.db.batch(
      [
        tornOp(torn),
        { type: 'del', key: key.flushing },
        { type: 'put', key: key.epochCeiling, value: text(String(epochCeiling)) },
      ],
      { sync: true },
    );
  }

  async putEpochCeiling(epochCeiling: number): Promise<void> {
    await this.db.put(key.epochCeiling, text(String(epochCeiling)), { sync: true });
  }

  /** Before a flush writes anything: the ranges it may leave torn if the process dies mid-write. */
  async recordFlushing(ranges: RangePairs): Promise<void> {
    await this.db.put(key.flushing, encodePairs(ranges), { sync: true });
  }

  /** After the flush's fdatasync: the durable epoch advances and nothing is in flight any more. */
  async recordDurable(durableEpoch: number, torn: readonly ByteRange[]): Promise<void> {
    await this.db.batch(
      [
        { type: 'put', key: key.durableEpoch, value: text(String(durableEpoch)) },
        { type: 'del', key: key.flushing },
        tornOp(torn),
      ],
      { sync: true },
    );
  }

  /** Spilled blocks were kept here by earlier versions (under s/); a store that still holds some drops them. */
  async clearLegacySpill(): Promise<void> {
    await this.db.clear({ gte: spillPrefix, lt: prefixEnd(spillPrefix) });
  }

  /**
   * Journal records (blocks, hole and zero ranges) are written in synced chunks before the state record;
   * until that record lands they are not a journal (a restart discards them), so the chunks and the record
   * act as one batch without holding the whole buffer twice in memory.
   */
  async putJournal(entries: readonly JournalEntry[]): Promise<void> {
    const ops: BatchOp[] = entries.map((e) => ({ type: 'put', key: journalKey(e), value: journalValue(e) }));
    await this.db.batch(ops, { sync: true });
  }

  async clearJournal(): Promise<void> {
    await this.db.clear({ gte: journalPrefix, lt: prefixEnd(journalPrefix) });
  }

  async recordFailingOver(target: FailoverTarget): Promise<void> {
    await this.db.batch(
      [
        { type: 'put', key: key.state, value: text('failing-over') },
        { type: 'put', key: key.target, value: text(target) },
      ],
      { sync: true },
    );
  }

  /**
   * Journal records, blocks in block order, then hole ranges, then zero ranges (each in block order), in
   * chunks of about `chunkBytes`.
   */
  async *readJournal(chunkBytes: number): AsyncGenerator<JournalEntry[]> {
    let chunk: JournalEntry[] = [];
    let bytes = 0;
    for await (const [k, v] of this.db.iterator({ gte: journalPrefix, lt: prefixEnd(journalPrefix) })) {
      if (k.startsWith(journalHolesPrefix)) {
        chunk.push({ holes: journalRun(k, journalHolesPrefix, v) });
        bytes += journalZeroRecordBytes;
      } else if (k.startsWith(journalZeroesPrefix)) {
        chunk.push({ zeroes: journalRun(k, journalZeroesPrefix, v) });
        bytes += journalZeroRecordBytes;
      } else {
        chunk.push({ block: parseInt(k.slice(journalPrefix.length), 16), data: v.length === 0 ? null : v });
        bytes += v.length;
      }
      if (bytes >= chunkBytes) {
        yield chunk;
        chunk = [];
        bytes = 0;
      }
    }
    if (chunk.length > 0) yield chunk;
  }

  /** Failover done: the state, and the journal deleted, in one batch. */
  async recordFailedOver(
    target: FailoverTarget,
    journal: { blocks: Iterable<number>; holeRuns: Iterable<Run>; zeroRuns: Iterable<Run> },
    torn: readonly ByteRange[],
  ): Promise<void> {
    const ops: BatchOp[] = [
      { type: 'put', key: key.state, value: text('failed-over') },
      { type: 'put', key: key.target, value: text(target) },
      { type: 'del', key: key.flushing },
      tornOp(torn),
    ];
    for (const block of journal.blocks) ops.push({ type: 'del', key: journalKey({ block, data: null }) });
    for (const holes of journal.holeRuns) ops.push({ type: 'del', key: journalKey({ holes }) });
    for (const zeroes of journal.zeroRuns) ops.push({ type: 'del', key: journalKey({ zeroes }) });
    await this.db.batch(ops, { sync: true });
  }

  async close(): Promise<void> {
    await this.db.close();
  }
}

function storedRanges(name: string, bytes: Uint8Array | undefined): ByteRange[] {
  const ranges = decodeRanges(bytes);
  if (ranges === undefined) throw new GannetError('EMISMATCH', `metadata key ${name} holds no valid list of byte ranges`);
  return ranges;
}

function tornOp(torn: readonly ByteRange[]): BatchOp {
  return torn.length === 0 ? { type: 'del', key: key.torn } : { type: 'put', key: key.torn, value: encodeRanges(torn) };
}
