import { Level } from 'level';
import { GannetError } from './errors.js';

export type KvOp = { readonly type: 'put'; readonly key: string; readonly value: Uint8Array } | { readonly type: 'del'; readonly key: string };

/** Keys from `gte` (inclusive) to `lt` (exclusive). */
export interface KvRange {
  readonly gte: string;
  readonly lt: string;
}

/**
 * What the metadata store needs of a key-value store: LevelDB in production (`openLevelKv`), a simulated
 * store that loses unsynced batches at a simulated power cut in tests. A batch is atomic; with
 * `sync: true` it is durable, together with every batch before it, when the promise resolves.
 */
export interface KvStore {
  getMany(keys: readonly string[]): Promise<(Uint8Array | undefined)[]>;
  batch(ops: readonly KvOp[], options: { sync: boolean }): Promise<void>;
  clear(range: KvRange): Promise<void>;
  /** Whether any key lies in `range`. */
  any(range: KvRange): Promise<boolean>;
  /** Every key in `range` with its value, in key order. */
  entries(range: KvRange): Promise<[string, Uint8Array][]>;
  /** Gives the space of deleted keys back (LevelDB compaction). */
  compact(range: KvRange): Promise<void>;
  close(): Promise<void>;
}

type Db = Level<string, Uint8Array>;

/**
 * Opens the LevelDB at `location`. The failures a user can do something about get a message that says
 * what happened: the store locked by another process, damaged files, no space.
 */
export async function openLevelKv(location: string, options: { createIfMissing: boolean }): Promise<KvStore> {
  const db = await openDb(location, options.createIfMissing);
  return new LevelKv(location, db);
}

async function openDb(location: string, createIfMissing: boolean): Promise<Db> {
  const db: Db = new Level<string, Uint8Array>(location, { keyEncoding: 'utf8', valueEncoding: 'view', createIfMissing });
  try {
    await db.open();
  } catch (err) {
    throw new GannetError(noSpace(err) ? 'ENOSPC' : 'EMETA', `the metadata store ${location} cannot be opened: ${describeOpenFailure(err)}`, { cause: err });
  }
  return db;
}

function noSpace(err: unknown): boolean {
  return /No space left|ENOSPC/i.test(`${(err as { cause?: Error }).cause?.message ?? ''} ${(err as Error).message ?? ''}`);
}

function describeOpenFailure(err: unknown): string {
  const cause = (err as { cause?: { code?: string; message?: string } }).cause;
  const code = (err as { code?: string }).code;
  const text = `${cause?.message ?? ''} ${(err as Error).message ?? ''}`;
  if (code === 'LEVEL_LOCKED' || /lock/i.test(text)) return 'it is locked by another process (is another gannet daemon serving this data directory?)';
  if (/does not exist/i.test(text) || code === 'LEVEL_DATABASE_NOT_OPEN' && /exist/i.test(text)) return 'it does not exist';
  if (/No space left|ENOSPC/i.test(text)) return 'the file system is full';
  if (/corrupt|checksum|bad magic|truncated|MANIFEST|CURRENT/i.test(text)) return `its files are damaged (${(cause?.message ?? text).trim()})`;
  return (cause?.message ?? (err as Error).message ?? String(err)).trim();
}

/**
 * LevelDB keeps the first write error it meets (a full disk) and refuses every later write with it, even
 * once space is back. So after a failed write the store is closed and opened again before the next
 * operation: a transient fault heals without a restart of the daemon.
 */
class LevelKv implements KvStore {
  private db: Db;
  private broken = false;
  private reopening: Promise<void> | null = null;

  constructor(
    private readonly location: string,
    db: Db,
  ) {
    this.db = db;
  }

  async getMany(keys: readonly string[]): Promise<(Uint8Array | undefined)[]> {
    return this.run(() => this.db.getMany([...keys]));
  }

  async batch(ops: readonly KvOp[], options: { sync: boolean }): Promise<void> {
    await this.run(() => this.db.batch(ops as KvOp[], { sync: options.sync }));
  }

  async clear(range: KvRange): Promise<void> {
    await this.run(() => this.db.clear(range));
  }

  async any(range: KvRange): Promise<boolean> {
    return this.run(async () => {
      for await (const _ of this.db.keys({ ...range, limit: 1 })) return true;
      return false;
    });
  }

  async entries(range: KvRange): Promise<[string, Uint8Array][]> {
    return this.run(() => this.db.iterator(range).all());
  }

  async compact(range: KvRange): Promise<void> {
    await this.run(() => (this.db as unknown as { compactRange(a: string, b: string): Promise<void> }).compactRange(range.gte, range.lt));
  }

  async close(): Promise<void> {
    if (this.reopening !== null) await this.reopening.catch(() => undefined);
    await this.db.close();
  }

  private async run<T>(op: () => Promise<T>): Promise<T> {
    if (this.broken) {
      this.reopening ??= this.reopen();
      await this.reopening;
    }
    try {
      return await op();
    } catch (err) {
      this.broken = true;
      // LevelDB reports a full disk as a generic IO error; the engine and the client need ENOSPC.
      if (noSpace(err)) throw new GannetError('ENOSPC', `the metadata store ${this.location}: the file system is full`, { cause: err });
      throw err;
    }
  }

  private async reopen(): Promise<void> {
    try {
      await this.db.close().catch(() => undefined);
      this.db = await openDb(this.location, false);
      this.broken = false;
    } finally {
      this.reopening = null;
    }
  }
}
