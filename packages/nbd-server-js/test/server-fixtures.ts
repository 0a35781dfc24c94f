/**
 * Shared pieces of the server tests: a small in-test memory device (byte array plus a per-4-KiB
 * allocation map for extents, with optional gates to hold operations open), a byte-level harness that
 * runs a real `Connection` over an in-memory duplex stream (no sockets), and a decoder for what the
 * server sends, written independently of the server's encoders.
 */
import { MemoryBudget } from '../src/server/memory-budget.js';
import { PayloadPool } from '../src/server/payload-pool.js';
import { connect, type Socket } from 'node:net';
import { Duplex } from 'node:stream';
import { BlockDeviceError, checkRange, defaultBlockSizes, EXTENT_HOLE, EXTENT_ZERO } from '@gannet/block-device';
import type { BlockDevice, Capabilities, Extent } from '@gannet/block-device';
import { Connection, type ConnectionContext } from '../src/server/connection.js';
import type { ExportEntry, ExportRegistry } from '../src/server/handshake.js';
import type { RequestEvent } from '../src/server/transmission.js';
import type { ListenAddress } from '../src/server/uri.js';
import { buildClientFlags, buildGoOption, buildOption } from '../src/protocol/builders.js';
import {
  OPT_STRUCTURED_REPLY,
  OPTION_REPLY_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from '../src/protocol/constants.js';

export const allCaps: Capabilities = {
  readOnly: false,
  flush: true,
  fua: true,
  trim: true,
  zero: true,
  fastZero: true,
  cache: true,
  multiConn: true,
  extents: true,
};

const pageBytes = 4096;

export type Verb = 'read' | 'write' | 'flush' | 'trim' | 'zero' | 'cache' | 'extents';

/** A memory disk: zeroes until written; extents report unwritten 4 KiB pages as hole+zero. */
export class TestDevice implements BlockDevice {
  readonly data: Buffer;
  readonly allocated: Uint8Array;
  readonly blockSizes = defaultBlockSizes;
  readonly calls: { verb: Verb; offset: number; length: number; options?: unknown }[] = [];
  /** When set, each operation waits for this before touching data. */
  gate: ((verb: Verb, offset: number) => Promise<void>) | null = null;
  /** When set, the verb fails with this error. */
  fail: Partial<Record<Verb, BlockDeviceError>> = {};

  constructor(
    readonly size: number,
    readonly capabilities: Capabilities = allCaps,
  ) {
    this.data = Buffer.alloc(size);
    this.allocated = new Uint8Array(Math.ceil(size / pageBytes));
  }

  private async enter(verb: Verb, offset: number, length: number, options?: unknown): Promise<void> {
    this.calls.push({ verb, offset, length, options });
    if (this.gate) await this.gate(verb, offset);
    const err = this.fail[verb];
    if (err) throw err;
  }

  private mark(offset: number, length: number, value: number): void {
    for (let p = Math.floor(offset / pageBytes); p * pageBytes < offset + length; p++) this.allocated[p] = value;
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    checkRange(this.size, offset, buf.length, 'read');
    await this.enter('read', offset, buf.length);
    buf.set(this.data.subarray(offset, offset + buf.length));
  }

  async write(data: Uint8Array, offset: number, options?: { fua?: boolean }): Promise<void> {
    checkRange(this.size, offset, data.length, 'write');
    await this.enter('write', offset, data.length, options);
    this.data.set(data, offset);
    this.mark(offset, data.length, 1);
  }

  async writev(buffers: readonly Uint8Array[], offset: number, options?: { fua?: boolean }): Promise<void> {
    await this.write(Buffer.concat(buffers), offset, options);
  }

  async writeBatch(runs: readonly { offset: number; buffers: readonly Uint8Array[] }[]): Promise<void> {
    for (const run of runs) await this.writev(run.buffers, run.offset);
  }

  async flush(): Promise<void> {
    await this.enter('flush', 0, 0);
  }

  async trim(offset: number, length: number, options?: { fua?: boolean }): Promise<void> {
    checkRange(this.size, offset, length, 'trim');
    await this.enter('trim', offset, length, options);
    this.data.fill(0, offset, offset + length);
  }

  async writeZeroes(offset: number, length: number, options?: unknown): Promise<void> {
    checkRange(this.size, offset, length, 'zero');
    await this.enter('zero', offset, length, options);
    this.data.fill(0, offset, offset + length);
  }

  async cache(offset: number, length: number): Promise<void> {
    checkRange(this.size, offset, length, 'cache');
    await this.enter('cache', offset, length);
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    checkRange(this.size, offset, length, 'extents');
    await this.enter('extents', offset, length);
    const out: { length: number; flags: number }[] = [];
    for (let at = offset; at < offset + length; ) {
      const p = Math.floor(at / pageBytes);
      const end = Math.min(this.size, (p + 1) * pageBytes);
      const flags = this.allocated[p] ? 0 : EXTENT_HOLE | EXTENT_ZERO;
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += end - at;
      else out.push({ length: end - at, flags });
      at = end;
    }
    return out;
  }

  async close(): Promise<void> {}
}

/** A gate the test opens by hand: operations park until released, in any order. */
export class Gates {
  private readonly waiting: { key: string; release: () => void }[] = [];
  private readonly arrivals: (() => void)[] = [];

  readonly gate = (verb: Verb, offset: number): Promise<void> =>
    new Promise((resolve) => {
      this.waiting.push({ key: `${verb}@${offset}`, release: resolve });
      for (const a of this.arrivals.splice(0)) a();
    });

  get parked(): string[] {
    return this.waiting.map((w) => w.key);
  }

  /** Resolves once `count` operations are parked. */
  async until(count: number): Promise<void> {
    while (this.waiting.length < count) await new Promise<void>((r) => this.arrivals.push(r));
  }

  release(key: string): void {
    const i = this.waiting.findIndex((w) => w.key === key);
    if (i < 0) throw new Error(`nothing parked at ${key}; parked: ${this.parked.join(', ')}`);
    this.waiting.splice(i, 1)[0].release();
  }
}

export function registryOf(entries: ExportEntry[], defaultName?: string): ExportRegistry {
  const byName = new Map(entries.map((e) => [e.name, e]));
  return {
    lookup: (name) => byName.get(name) ?? (name === '' && defaultName !== undefined ? byName.get(defaultName) : undefined),
    list: () => entries,
  };
}

export function entry(name: string, device: BlockDevice, options: { description?: string; readOnly?: boolean } = {}): ExportEntry {
  return { name, device, description: options.description ?? '', readOnly: options.readOnly ?? false };
}

/** A duplex standing in for a socket: what the test writes is what the server reads, and vice versa. */
class FakeSocket extends Duplex {
  readonly sent: Buffer[] = [];
  ended = false;
  readonly remoteAddress = '127.0.0.1';
  readonly remotePort = 1;
  private onSent: (() => void)[] = [];

  constructor() {
    super({ allowHalfOpen: false });
  }

  override _read(): void {}

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    this.sent.push(chunk);
    for (const f of this.onSent.splice(0)) f();
    cb();
  }

  override _writev(chunks: { chunk: Buffer }[], cb: (err?: Error | null) => void): void {
    for (const c of chunks) this.sent.push(c.chunk);
    for (const f of this.onSent.splice(0)) f();
    cb();
  }

  override _final(cb: (err?: Error | null) => void): void {
    this.ended = true;
    for (const f of this.onSent.splice(0)) f();
    cb();
    // The client side closes too, as real clients do after the server's FIN.
    this.push(null);
  }

  waitSent(): Promise<void> {
    return new Promise((resolve) => this.onSent.push(resolve));
  }
}

export interface Harness {
  readonly socket: FakeSocket;
  readonly connection: Connection;
  readonly events: RequestEvent[];
  /** Feeds bytes as the client would, optionally in pieces. */
  push(bytes: Buffer): void;
  /** Everything the server has sent so far, from the first byte. */
  output(): Buffer;
  /** Waits until the server has sent at least `n` bytes in total or ended the stream. */
  waitBytes(n: number): Promise<Buffer>;
  /** What the connection's isShuttingDown() answers. */
  shuttingDown: boolean;
}

export function harness(registry: ExportRegistry, limits: Partial<ConnectionContext> = {}): Harness {
  const socket = new FakeSocket();
  const events: RequestEvent[] = [];
  const h: Harness = {
    socket,
    connection: undefined as unknown as Connection,
    events,
    shuttingDown: false,
    push: (bytes) => {
      socket.push(bytes);
    },
    output: () => Buffer.concat(socket.sent),
    waitBytes: async (n) => {
      for (let i = 0; i < 10_000; i++) {
        const out = h.output();
        if (out.length >= n || socket.ended) return out;
        await socket.waitSent();
      }
      throw new Error(`server never sent ${n} bytes`);
    },
  };
  const ctx: ConnectionContext = {
    exports: registry,
    requestBytesMax: 32 * 1024 * 1024,
    writeSkipBytesMax: 64 * 1024 * 1024,
    optionBytesMax: 64 * 1024,
    inflightBytesMax: 64 * 1024 * 1024,
    payloadPool: new PayloadPool(),
    memoryBudget: new MemoryBudget(256 * 1024 * 1024),
    tls: { mode: 'off', setup: null },
    logger: () => {},
    isShuttingDown: () => h.shuttingDown,
    wantsEvents: () => true,
    event: (ev) => events.push(ev),
    betweenBatches: () => {},
    exportFull: () => false,
    joined: () => {},
    left: () => {},
    ...limits,
  };
  (h as { connection: Connection }).connection = new Connection(socket as never, ctx);
  return h;
}

// ---- Decoding what the server sends ----

export interface OptionReply {
  readonly option: number;
  readonly type: number;
  readonly data: Buffer;
}

/** Splits option replies out of `buf` (which must start at a reply); returns them and the rest. */
export function decodeOptionReplies(buf: Buffer): { replies: OptionReply[]; rest: Buffer } {
  const replies: OptionReply[] = [];
  let at = 0;
  while (buf.length - at >= 20) {
    if (buf.readBigUInt64BE(at) !== OPTION_REPLY_MAGIC) throw new Error(`bad option reply magic at ${at}`);
    const length = buf.readUInt32BE(at + 16);
    if (buf.length - at < 20 + length) break;
    replies.push({ option: buf.readUInt32BE(at + 8), type: buf.readUInt32BE(at + 12), data: buf.subarray(at + 20, at + 20 + length) });
    at += 20 + length;
  }
  return { replies, rest: buf.subarray(at) };
}

export type Reply =
  | { readonly kind: 'simple'; readonly error: number; readonly cookie: bigint; readonly data: Buffer }
  | { readonly kind: 'chunk'; readonly flags: number; readonly type: number; readonly cookie: bigint; readonly payload: Buffer };

/**
 * Splits transmission replies out of `buf`. Simple replies to successful READs carry data whose length
 * only the request knows: `readLengths` maps cookie to that length.
 */
export function decodeReplies(buf: Buffer, readLengths: ReadonlyMap<bigint, number> = new Map()): { replies: Reply[]; rest: Buffer } {
  const replies: Reply[] = [];
  let at = 0;
  for (;;) {
    if (buf.length - at < 4) break;
    const magic = buf.readUInt32BE(at);
    if (magic === SIMPLE_REPLY_MAGIC) {
      if (buf.length - at < 16) break;
      const error = buf.readUInt32BE(at + 4);
      const cookie = buf.readBigUInt64BE(at + 8);
      const dataBytes = error === 0 ? (readLengths.get(cookie) ?? 0) : 0;
      if (buf.length - at < 16 + dataBytes) break;
      replies.push({ kind: 'simple', error, cookie, data: buf.subarray(at + 16, at + 16 + dataBytes) });
      at += 16 + dataBytes;
    } else if (magic === STRUCTURED_REPLY_MAGIC) {
      if (buf.length - at < 20) break;
      const length = buf.readUInt32BE(at + 16);
      if (buf.length - at < 20 + length) break;
      replies.push({
        kind: 'chunk',
        flags: buf.readUInt16BE(at + 4),
        type: buf.readUInt16BE(at + 6),
        cookie: buf.readBigUInt64BE(at + 8),
        payload: buf.subarray(at + 20, at + 20 + length),
      });
      at += 20 + length;
    } else {
      throw new Error(`bad reply magic 0x${magic.toString(16)} at ${at}`);
    }
  }
  return { replies, rest: buf.subarray(at) };
}

/** Every split of `bytes` into two pieces, plus one-byte-at-a-time: what a parser must survive. */
export function* splits(bytes: Buffer): Generator<Buffer[]> {
  for (let i = 1; i < bytes.length; i++) yield [bytes.subarray(0, i), bytes.subarray(i)];
  yield [...bytes].map((b) => Buffer.from([b]));
}

/** A raw client: collects every byte the server sends, and waits on conditions over them. */
export class RawClient {
  private readonly chunks: Buffer[] = [];
  private readonly waiters: (() => void)[] = [];
  closed = false;
  start = 0;

  constructor(readonly socket: Socket) {
    socket.on('data', (c: Buffer) => {
      this.chunks.push(c);
      for (const w of this.waiters.splice(0)) w();
    });
    socket.on('close', () => {
      this.closed = true;
      for (const w of this.waiters.splice(0)) w();
    });
    socket.on('error', () => {});
  }

  static async open(addr: ListenAddress): Promise<RawClient> {
    const socket = 'path' in addr ? connect(addr.path) : connect(addr.port, addr.host);
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    return new RawClient(socket);
  }

  bytes(): Buffer {
    return Buffer.concat(this.chunks);
  }

  async until<T>(check: (bytes: Buffer) => T | undefined, what: string): Promise<T> {
    for (let i = 0; i < 100_000; i++) {
      const v = check(this.bytes());
      if (v !== undefined) return v;
      if (this.closed) throw new Error(`connection closed waiting for ${what}`);
      await new Promise<void>((resolve) => this.waiters.push(resolve));
    }
    throw new Error(`gave up waiting for ${what}`);
  }

  /** Negotiates structured replies (optional) and GO; returns once in transmission. */
  async go(name: string, structured = true): Promise<void> {
    const opts = [buildClientFlags(3), ...(structured ? [buildOption(OPT_STRUCTURED_REPLY)] : []), buildGoOption(name)];
    this.socket.write(Buffer.concat(opts));
    const want = (structured ? 1 : 0) + 3;
    await this.until((b) => {
      if (b.length < 18) return undefined;
      const { replies, rest } = decodeOptionReplies(b.subarray(18));
      return replies.length >= want ? rest : undefined;
    }, 'GO');
    this.start = this.bytes().length;
  }

  async replies(n: number, readLengths?: Map<bigint, number>): Promise<Reply[]> {
    return this.until((b) => {
      const { replies } = decodeReplies(b.subarray(this.start), readLengths);
      return replies.length >= n ? replies : undefined;
    }, `${n} replies`);
  }
}

export { BlockDeviceError };
