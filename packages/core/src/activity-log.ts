import { GannetError } from './errors.js';
import type { KvOp, KvStore } from './kv.js';

/** One extent's persisted bits, or the promise of the batch that is making the extent's entry durable. */
type HotState = Batch | null;

interface Batch {
  readonly seq: number;
  readonly extents: number[];
  readonly done: Promise<void>;
  resolve(): void;
  reject(err: unknown): void;
}

/** What the log held when the volume opened: every block in these may differ from the peer's disk. */
export interface ActivityLogState {
  readonly hot: number[];
  readonly bitmaps: Map<number, Uint32Array>;
}

/**
 * The primary's record of which blocks may differ from what the peer has made durable, kept durable
 * cheaply as DRBD keeps it: an activity log of hot extents (4 MiB each) plus a bitmap per cold extent.
 *
 * Invariant: every block that may differ lies in an extent of the durable log, or is set in the durable
 * bitmap of its extent. So a write may start on the local disk only once its extents are in the log
 * (`admit`, one synced batch for any number of writes that need new extents at once; none for a write to
 * an extent already hot, which is nearly every write). An extent leaves the log only when the log is
 * full, least recently used first: the local disk is flushed first (a block the peer has made durable is
 * clean only once the local disk has it durably too), then the batch that takes the extent out writes its
 * bits (the caller's current dirty set for it) in the same atomic batch. A crash therefore costs a resync
 * of the logged extents and the persisted bits, and nothing is ever missed. Persisted bits of cold extents go stale as the peer
 * catches up (a superset is safe); `trimCold` rewrites them without a sync.
 *
 * Keys under the prefix: `al` (the logged extents, uint32 little-endian) and `bm/<extent, 8 hex digits>`
 * (one extent's bits, uint32 little-endian words).
 */
export class ActivityLog {
  private readonly hot: Map<number, HotState>;
  private readonly persisted: Set<number>;
  private next: Batch | null = null;
  private chain: Promise<void> = Promise.resolve();
  private seq = 0;

  constructor(
    private readonly kv: KvStore,
    private readonly prefix: string,
    private readonly extentsMax: number,
    private readonly dirtyBits: (extent: number) => Uint32Array | undefined,
    /** Makes every completed write of the local disk durable (fdatasync). */
    private readonly flushLocal: () => Promise<void>,
    state: ActivityLogState,
  ) {
    this.hot = new Map(state.hot.map((e) => [e, null]));
    this.persisted = new Set(state.bitmaps.keys());
  }

  /** Reads the log; a damaged value refuses the volume with its key named. */
  static async load(kv: KvStore, prefix: string, wordsPerExtent: number): Promise<ActivityLogState> {
    const [al] = await kv.getMany([`${prefix}al`]);
    const hot = al === undefined ? [] : decodeWords(al, `${prefix}al`, null);
    const bitmaps = new Map<number, Uint32Array>();
    for (const [key, value] of await kv.entries({ gte: `${prefix}bm/`, lt: `${prefix}bm0` })) {
      const extent = /^[0-9a-f]{8}$/.test(key.slice(prefix.length + 3)) ? Number.parseInt(key.slice(prefix.length + 3), 16) : Number.NaN;
      if (!Number.isSafeInteger(extent)) throw damaged(key, 'is not an extent number');
      bitmaps.set(extent, Uint32Array.from(decodeWords(value, key, wordsPerExtent)));
    }
    return { hot: Array.from(hot), bitmaps };
  }

  get hotExtents(): number {
    return this.hot.size;
  }

  /**
   * Makes extents [first, end) hot: null when they all are, durably, already (the common case: no wait),
   * otherwise the promise of the batch that logs them. A rejected batch (disk full) leaves them cold.
   */
  admit(first: number, end: number): Promise<void> | null {
    let wait: Batch | null = null;
    for (let e = first; e < end; e++) {
      let state = this.hot.get(e);
      if (state === undefined) state = this.enqueue(e);
      else this.hot.delete(e);
      this.hot.set(e, state);
      if (state !== null && (wait === null || state.seq > wait.seq)) wait = state;
    }
    return wait === null ? null : wait.done;
  }

  /** Rewrites the persisted bits of extents that are not hot from the current dirty set, unsynced. */
  trimCold(extents: Iterable<number>): void {
    const ops: KvOp[] = [];
    for (const e of extents) if (!this.hot.has(e) && this.persisted.has(e)) ops.push(this.bitmapOp(e));
    if (ops.length === 0) return;
    this.chain = this.chain.then(() => this.kv.batch(ops, { sync: false })).catch(() => undefined);
  }

  /** At a clean close, after the local disk's last flush: every extent's exact bits persisted and the log emptied, in one synced batch. */
  async closeClean(): Promise<void> {
    await this.chain;
    const ops: KvOp[] = [];
    for (const e of this.hot.keys()) ops.push(this.bitmapOp(e));
    ops.push({ type: 'put', key: `${this.prefix}al`, value: new Uint8Array(0) });
    await this.kv.batch(ops, { sync: true });
    this.hot.clear();
  }

  private enqueue(extent: number): Batch {
    let batch = this.next;
    if (batch === null) {
      let resolve!: () => void;
      let reject!: (err: unknown) => void;
      const done = new Promise<void>((res, rej) => {
        resolve = res;
        reject = rej;
      });
      // Nobody may be waiting when a batch fails with nothing admitted after it.
      done.catch(() => undefined);
      batch = { seq: ++this.seq, extents: [], done, resolve, reject };
      this.next = batch;
      const written = batch;
      this.chain = this.chain.then(() => this.write(written));
    }
    batch.extents.push(extent);
    return batch;
  }

  private async write(batch: Batch): Promise<void> {
    if (this.next === batch) this.next = null;
    const ops: KvOp[] = [];
    try {
      if (this.hot.size > this.extentsMax) {
        await this.flushLocal();
        for (const [e, state] of this.hot) {
          if (this.hot.size <= this.extentsMax) break;
          if (state !== null) continue;
          ops.push(this.bitmapOp(e));
          this.hot.delete(e);
        }
      }
      ops.push({ type: 'put', key: `${this.prefix}al`, value: encodeWords(this.hot.keys(), this.hot.size) });
      await this.kv.batch(ops, { sync: true });
    } catch (err) {
      for (const e of batch.extents) if (this.hot.get(e) === batch) this.hot.delete(e);
      batch.reject(err);
      return;
    }
    for (const e of batch.extents) if (this.hot.get(e) === batch) this.hot.set(e, null);
    batch.resolve();
  }

  private bitmapOp(extent: number): KvOp {
    const key = `${this.prefix}bm/${extent.toString(16).padStart(8, '0')}`;
    const bits = this.dirtyBits(extent);
    if (bits === undefined) {
      this.persisted.delete(extent);
      return { type: 'del', key };
    }
    this.persisted.add(extent);
    return { type: 'put', key, value: encodeWords(bits, bits.length) };
  }
}

function encodeWords(words: Iterable<number>, count: number): Uint8Array {
  const out = Buffer.alloc(count * 4);
  let i = 0;
  for (const w of words) out.writeUInt32LE(w >>> 0, 4 * i++);
  return out;
}

function decodeWords(bytes: Uint8Array, key: string, count: number | null): Uint32Array {
  if (bytes.byteLength % 4 !== 0 || (count !== null && bytes.byteLength !== count * 4)) {
    throw damaged(key, `has ${bytes.byteLength} bytes, not ${count === null ? 'a multiple of 4' : count * 4}`);
  }
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Uint32Array(bytes.byteLength / 4);
  for (let i = 0; i < out.length; i++) out[i] = buf.readUInt32LE(4 * i);
  return out;
}

function damaged(key: string, problem: string): GannetError {
  return new GannetError('EMETA', `the primary's metadata is damaged: key ${key} ${problem}`);
}
