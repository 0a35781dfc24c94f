/**
 * A simulated storage for power-loss tests: the engine's Storage seam (backing file, metadata store,
 * state file, journal) in memory, where every write that was not made durable (fdatasync of its file,
 * a synced batch, a directory sync for a new file) sits in a volatile layer. `powerCut(rng)` then loses
 * a seeded part of it, as a machine losing power would: nothing, everything, a prefix in write order,
 * or a prefix plus one write torn at 512-byte sectors; batches of the metadata store are atomic, so a
 * prefix of whole batches survives. Handles opened before a cut are dead after it: what the old volume
 * still does after the cut changes nothing. `armCut(rng, n)` cuts the power at the n-th storage event
 * from now (a write, a sync, a batch, a rename), wherever the engine is: in the middle of a background
 * flush or failover as often as between two requests.
 */
import { AbstractBlockDevice, allCapabilities, BlockDeviceError, type BlockDevice, type Capabilities, type ZeroRequest } from '@gannet/block-device';
import type { KvOp, KvRange, KvStore, Storage } from '@gannet/core';
import type { Rng } from './model.js';

const sectorBytes = 512;

type CutMode = 'none' | 'all' | 'prefix' | 'torn';

interface PendingWrite {
  readonly offset: number;
  /** null: zeroes. */
  readonly data: Uint8Array | null;
  readonly length: number;
}

class FileState {
  durable: Uint8Array;
  current: Uint8Array;
  pending: PendingWrite[] = [];
  /** A created file whose directory entry is not durable yet: a cut loses the file. */
  entryVolatile: boolean;

  constructor(size: number, entryVolatile: boolean) {
    this.durable = new Uint8Array(size);
    this.current = new Uint8Array(size);
    this.entryVolatile = entryVolatile;
  }

  write(offset: number, data: Uint8Array | null, length: number): void {
    this.pending.push({ offset, data: data === null ? null : data.slice(), length });
    if (data === null) this.current.fill(0, offset, offset + length);
    else this.current.set(data, offset);
  }

  sync(): void {
    this.durable = this.current.slice();
    this.pending = [];
  }

  /** Applies what survives of the pending writes to the durable image; it becomes the file. */
  cut(rng: Rng, mode: CutMode): void {
    const keep = mode === 'none' ? 0 : mode === 'all' ? this.pending.length : rng.below(this.pending.length + 1);
    for (let i = 0; i < keep; i++) apply(this.durable, this.pending[i]);
    if (mode === 'torn' && keep < this.pending.length) {
      const w = this.pending[keep];
      for (let at = w.offset; at < w.offset + w.length; at += sectorBytes) {
        if (!rng.chance(0.5)) continue;
        const end = Math.min(at + sectorBytes, w.offset + w.length);
        if (w.data === null) this.durable.fill(0, at, end);
        else this.durable.set(w.data.subarray(at - w.offset, end - w.offset), at);
      }
    }
    this.current = this.durable.slice();
    this.pending = [];
  }
}

function apply(image: Uint8Array, w: PendingWrite): void {
  if (w.data === null) image.fill(0, w.offset, w.offset + w.length);
  else image.set(w.data, w.offset);
}

class KvState {
  durable = new Map<string, Uint8Array>();
  current = new Map<string, Uint8Array>();
  pending: KvOp[][] = [];

  cut(rng: Rng, mode: CutMode): void {
    const keep = mode === 'none' ? 0 : mode === 'all' ? this.pending.length : rng.below(this.pending.length + 1);
    for (let i = 0; i < keep; i++) applyOps(this.durable, this.pending[i]);
    this.current = new Map(this.durable);
    this.pending = [];
  }
}

function applyOps(map: Map<string, Uint8Array>, ops: readonly KvOp[]): void {
  for (const op of ops) {
    if (op.type === 'put') map.set(op.key, op.value.slice());
    else map.delete(op.key);
  }
}

const inRange = (key: string, range: KvRange) => key >= range.gte && key < range.lt;

export class SimStorage implements Storage {
  private generation = 0;
  private armed: { remaining: number; rng: Rng; fire: () => void } | null = null;
  /** Set once an armed cut has happened, until the next `armCut`. */
  fired = false;
  /** Resolves when the armed cut happens. */
  whenFired: Promise<void> = new Promise<void>(() => undefined);
  private readonly onEvent = (): void => this.event();
  private readonly files = new Map<string, FileState>();
  /** Files removed since their directory was last synced: a cut may bring them back. */
  private readonly removed = new Map<string, FileState>();
  private readonly kvs = new Map<string, KvState>();
  /** Small files replaced atomically: the durable content, and the one a call in progress is writing. */
  private readonly smalls = new Map<string, { durable: Uint8Array | undefined; writing: Uint8Array | undefined }>();
  /** How each file and store fared at the last cut, for failure messages. */
  lastCut: Record<string, CutMode> = {};

  /** Cuts the power at the `events`-th storage event from now. */
  armCut(rng: Rng, events: number): void {
    this.fired = false;
    this.whenFired = new Promise<void>((resolve) => {
      this.armed = { remaining: events, rng, fire: resolve };
    });
  }

  /** Drops an armed cut that has not happened, or forgets the one that has (once it is dealt with). */
  disarm(): void {
    this.armed = null;
    this.fired = false;
    this.whenFired = new Promise<void>(() => undefined);
  }

  private event(): void {
    const armed = this.armed;
    if (armed === null || --armed.remaining > 0) return;
    this.armed = null;
    this.powerCut(armed.rng);
    this.fired = true;
    armed.fire();
  }

  /** Loses a seeded part of everything not durable; every handle opened so far is dead. */
  powerCut(rng: Rng): void {
    this.generation++;
    this.lastCut = {};
    const mode = (): CutMode => rng.pick(['none', 'all', 'prefix', 'torn'] as const);
    for (const [path, file] of [...this.files]) {
      if (file.entryVolatile && rng.chance(0.5)) {
        this.files.delete(path);
        this.lastCut[path] = 'none';
        continue;
      }
      file.entryVolatile = false;
      const m = mode();
      file.cut(rng, m);
      this.lastCut[path] = m;
    }
    for (const [path, file] of this.removed) if (rng.chance(0.5) && !this.files.has(path)) this.files.set(path, file);
    this.removed.clear();
    for (const [location, kv] of this.kvs) {
      const m = mode() === 'torn' ? 'prefix' : mode();
      kv.cut(rng, m);
      this.lastCut[location] = m;
    }
    for (const small of this.smalls.values()) {
      if (small.writing !== undefined && rng.chance(0.5)) small.durable = small.writing;
      small.writing = undefined;
    }
  }

  /** What the file holds now (for checks), or undefined. */
  fileBytes(path: string): Uint8Array | undefined {
    return this.files.get(path)?.current.slice();
  }

  async openBacking(path: string, sizeBytes: number, options: { create: boolean }): Promise<BlockDevice> {
    let file = this.files.get(path);
    if (file === undefined) {
      if (!options.create) throw Object.assign(new Error(`${path}: no such file`), { code: 'ENOENT' });
      // Made durable at creation, as fileStorage does.
      file = new FileState(sizeBytes, false);
      this.files.set(path, file);
    }
    if (file.current.length !== sizeBytes) throw new Error(`${path}: ${file.current.length} bytes, want ${sizeBytes}`);
    return new SimFile(path, file, this.generation, () => this.generation, false, this.onEvent);
  }

  async openMeta(location: string, options: { create: boolean }): Promise<KvStore> {
    let kv = this.kvs.get(location);
    if (kv === undefined) {
      if (!options.create) throw Object.assign(new Error(`${location} does not exist`), { code: 'EMETA' });
      kv = new KvState();
      this.kvs.set(location, kv);
    }
    return new SimKv(kv, this.generation, () => this.generation, this.onEvent);
  }

  async readFile(path: string): Promise<Uint8Array | undefined> {
    const small = this.smalls.get(path);
    const bytes = small?.writing ?? small?.durable;
    return bytes?.slice();
  }

  async writeFileAtomic(path: string, data: Uint8Array): Promise<void> {
    const generation = this.generation;
    let small = this.smalls.get(path);
    if (small === undefined) {
      small = { durable: undefined, writing: undefined };
      this.smalls.set(path, small);
    }
    small.writing = data.slice();
    // A cut may land while the rename is on its way to the disk.
    await new Promise<void>((resolve) => setImmediate(resolve));
    this.event();
    if (generation !== this.generation) throw powerLost();
    small.durable = small.writing;
    small.writing = undefined;
  }

  async createFile(path: string, sizeBytes: number): Promise<BlockDevice> {
    const generation = this.generation;
    this.event();
    if (generation !== this.generation) throw powerLost();
    const file = new FileState(sizeBytes, true);
    this.files.set(path, file);
    return new SimFile(path, file, this.generation, () => this.generation, false, this.onEvent);
  }

  async openFile(path: string): Promise<BlockDevice> {
    const file = this.files.get(path);
    if (file === undefined) throw Object.assign(new Error(`${path}: no such file`), { code: 'ENOENT' });
    return new SimFile(path, file, this.generation, () => this.generation, true, this.onEvent);
  }

  async syncDirectory(dir: string): Promise<void> {
    await tick();
    const generation = this.generation;
    this.event();
    if (generation !== this.generation) throw powerLost();
    for (const [path, file] of this.files) if (path.startsWith(`${dir}/`)) file.entryVolatile = false;
    for (const path of [...this.removed.keys()]) if (path.startsWith(`${dir}/`)) this.removed.delete(path);
  }

  async removeFile(path: string): Promise<void> {
    const generation = this.generation;
    this.event();
    if (generation !== this.generation) throw powerLost();
    const file = this.files.get(path);
    if (file === undefined) return;
    this.files.delete(path);
    this.removed.set(path, file);
  }

  async rename(from: string, to: string): Promise<void> {
    const generation = this.generation;
    this.event();
    if (generation !== this.generation) throw powerLost();
    const kv = this.kvs.get(from);
    if (kv !== undefined) {
      this.kvs.delete(from);
      this.kvs.set(to, kv);
    }
  }

  async exists(path: string): Promise<boolean> {
    return this.files.has(path) || this.kvs.has(path) || this.smalls.get(path)?.durable !== undefined;
  }
}

function powerLost(): BlockDeviceError {
  return new BlockDeviceError('EIO', 'simulated power loss: this handle is gone');
}

class SimFile extends AbstractBlockDevice {
  readonly capabilities: Capabilities;

  constructor(
    readonly path: string,
    private readonly file: FileState,
    private readonly generation: number,
    private readonly now: () => number,
    readOnly: boolean,
    private readonly event: () => void,
  ) {
    super(file.current.length);
    this.capabilities = Object.freeze({ ...allCapabilities, readOnly, cache: false, extents: false });
  }

  private alive(): void {
    if (this.now() !== this.generation) throw powerLost();
  }

  protected async _read(buf: Uint8Array, offset: number): Promise<void> {
    this.alive();
    buf.set(this.file.current.subarray(offset, offset + buf.length));
  }

  protected async _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    await tick();
    this.event();
    this.alive();
    this.file.write(offset, data, data.length);
    if (fua) this.file.sync();
  }

  protected override async _zero(offset: number, length: number, request: ZeroRequest): Promise<void> {
    await tick();
    this.event();
    this.alive();
    this.file.write(offset, null, length);
    if (request.fua) this.file.sync();
  }

  protected override async _trim(offset: number, length: number): Promise<void> {
    await tick();
    this.event();
    this.alive();
    this.file.write(offset, null, length);
  }

  protected override async _flush(): Promise<void> {
    await tick();
    this.event();
    this.alive();
    this.file.sync();
  }
}

class SimKv implements KvStore {
  constructor(
    private readonly kv: KvState,
    private readonly generation: number,
    private readonly now: () => number,
    private readonly event: () => void,
  ) {}

  private alive(): void {
    if (this.now() !== this.generation) throw powerLost();
  }

  async getMany(keys: readonly string[]): Promise<(Uint8Array | undefined)[]> {
    this.alive();
    return keys.map((k) => this.kv.current.get(k)?.slice());
  }

  async batch(ops: readonly KvOp[], options: { sync: boolean }): Promise<void> {
    await tick();
    this.event();
    this.alive();
    applyOps(this.kv.current, ops);
    this.kv.pending.push([...ops]);
    if (options.sync) {
      for (const batch of this.kv.pending) applyOps(this.kv.durable, batch);
      this.kv.pending = [];
    }
  }

  async clear(range: KvRange): Promise<void> {
    const ops: KvOp[] = [...this.kv.current.keys()].filter((k) => inRange(k, range)).map((key) => ({ type: 'del', key }));
    if (ops.length > 0) await this.batch(ops, { sync: false });
  }

  async any(range: KvRange): Promise<boolean> {
    this.alive();
    return [...this.kv.current.keys()].some((k) => inRange(k, range));
  }

  async entries(range: KvRange): Promise<[string, Uint8Array][]> {
    this.alive();
    return [...this.kv.current.entries()]
      .filter(([k]) => inRange(k, range))
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
      .map(([k, v]) => [k, v.slice()]);
  }

  async compact(): Promise<void> {
    this.alive();
  }

  async close(): Promise<void> {}
}

/** Every simulated write takes a turn of the event loop, so a cut can fall between any two. */
function tick(): Promise<void> {
  return new Promise<void>((resolve) => setImmediate(resolve));
}
