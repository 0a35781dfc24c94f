/**
 * A raw NBD connection for hostile-client tests: exact-length reads with timeouts, a close detector,
 * and just enough handshake and reply framing to drive a server byte by byte. Messages are built with
 * the builders from nbd-server-js; the framing here is deliberately independent of the package's own
 * client, so a shared bug does not hide itself.
 */
import { connect, type Socket } from 'node:net';
import {
  buildClientFlags,
  buildGoOption,
  buildOption,
  buildSetMetaContext,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  IHAVEOPT,
  INFO_BLOCK_SIZE,
  INFO_EXPORT,
  NBDMAGIC,
  OPT_STRUCTURED_REPLY,
  OPTION_REPLY_MAGIC,
  REP_ACK,
  REP_INFO,
  REP_META_CONTEXT,
  REPLY_FLAG_DONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_OFFSET_HOLE,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from 'nbd-server-js';
import type { NbdAddress } from './nbd-cli.js';

/** How long a single expected message may take to arrive on loopback. */
export const replyTimeoutMs = 10_000;

export class ClosedError extends Error {
  constructor(what: string) {
    super(`connection closed while waiting for ${what}`);
    this.name = 'ClosedError';
  }
}

export class RawConn {
  readonly socket: Socket;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private ended = false;
  private waiter: (() => void) | undefined;
  readonly closed: Promise<void>;
  /** Bytes received and thrown away by `discardIncoming`. */
  discardedBytes = 0;
  private discarding = false;

  private constructor(socket: Socket) {
    this.socket = socket;
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => {
      if (this.discarding) {
        this.discardedBytes += chunk.length;
        return;
      }
      this.chunks.push(chunk);
      this.buffered += chunk.length;
      this.wake();
    });
    // A reset from the server is a close as far as these tests care; the error itself is expected.
    socket.on('error', () => {});
    this.closed = new Promise((resolve) => {
      socket.once('close', () => {
        this.ended = true;
        this.wake();
        resolve();
      });
    });
  }

  static connect(address: NbdAddress): Promise<RawConn> {
    return new Promise((resolve, reject) => {
      const s = 'path' in address ? connect(address.path) : connect(address.port, address.host);
      s.once('connect', () => resolve(new RawConn(s)));
      s.once('error', reject);
    });
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  get isClosed(): boolean {
    return this.ended;
  }

  /** Resolves with exactly `n` bytes; rejects with ClosedError on EOF first, or on timeout. */
  async read(n: number, what = `${n} bytes`, timeoutMs = replyTimeoutMs): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.buffered < n) {
      if (this.ended) throw new ClosedError(what);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (have ${this.buffered} bytes)`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
    const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.chunks = rest.length > 0 ? [rest] : [];
    this.buffered = rest.length;
    return out;
  }

  /** Stops keeping received bytes (a client that never looks at replies but keeps the socket drained). */
  discardIncoming(): void {
    this.discarding = true;
    this.discardedBytes += this.buffered;
    this.chunks = [];
    this.buffered = 0;
  }

  /** Writes and waits until the kernel took the bytes (or the socket died, which resolves false). */
  write(data: Uint8Array): Promise<boolean> {
    return new Promise((resolve) => {
      if (this.socket.destroyed) {
        resolve(false);
        return;
      }
      this.socket.write(data, (err) => resolve(!err));
    });
  }

  /** Resolves true if the server closed the connection within the timeout. */
  async waitClosed(timeoutMs = replyTimeoutMs): Promise<boolean> {
    if (this.ended) return true;
    let t: NodeJS.Timeout | undefined;
    const timedOut = new Promise<false>((resolve) => {
      t = setTimeout(() => resolve(false), timeoutMs);
    });
    const r = await Promise.race([this.closed.then(() => true as const), timedOut]);
    clearTimeout(t);
    return r;
  }

  destroy(): void {
    this.socket.destroy();
  }
}

/** Reads and checks the newstyle greeting; returns the handshake flags. */
export async function readGreeting(c: RawConn): Promise<number> {
  const g = await c.read(18, 'greeting');
  if (g.readBigUInt64BE(0) !== NBDMAGIC || g.readBigUInt64BE(8) !== IHAVEOPT) {
    throw new Error(`bad greeting ${g.toString('hex')}`);
  }
  return g.readUInt16BE(16);
}

export interface OptionReply {
  option: number;
  type: number;
  payload: Buffer;
}

export async function readOptionReply(c: RawConn): Promise<OptionReply> {
  const h = await c.read(20, 'option reply header');
  if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new Error(`bad option reply magic ${h.toString('hex')}`);
  const length = h.readUInt32BE(16);
  if (length > 1024 * 1024) throw new Error(`option reply of ${length} bytes`);
  return { option: h.readUInt32BE(8), type: h.readUInt32BE(12) >>> 0, payload: await c.read(length, 'option reply payload') };
}

export interface Negotiated {
  size: number;
  transmissionFlags: number;
  structured: boolean;
  metaContextId?: number;
  blockSizes?: { minimum: number; preferred: number; maximum: number };
}

/** Client flags, optional STRUCTURED_REPLY and SET_META_CONTEXT base:allocation, then GO. */
export async function negotiate(
  c: RawConn,
  options: { structured?: boolean; metaContext?: boolean; exportName?: string } = {},
): Promise<Negotiated> {
  await readGreeting(c);
  await c.write(buildClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES));
  const name = options.exportName ?? '';
  const structured = options.structured ?? true;
  const out: Negotiated = { size: -1, transmissionFlags: 0, structured };
  if (structured) {
    await c.write(buildOption(OPT_STRUCTURED_REPLY));
    const r = await readOptionReply(c);
    if (r.type !== REP_ACK) throw new Error(`STRUCTURED_REPLY answered ${r.type.toString(16)}`);
  }
  if (options.metaContext) {
    await c.write(buildSetMetaContext(name, ['base:allocation']));
    for (;;) {
      const r = await readOptionReply(c);
      if (r.type === REP_META_CONTEXT) out.metaContextId = r.payload.readUInt32BE(0);
      else if (r.type === REP_ACK) break;
      else throw new Error(`SET_META_CONTEXT answered ${r.type.toString(16)}`);
    }
  }
  await c.write(buildGoOption(name, [INFO_BLOCK_SIZE]));
  for (;;) {
    const r = await readOptionReply(c);
    if (r.type === REP_ACK) break;
    if (r.type !== REP_INFO) throw new Error(`GO answered ${r.type.toString(16)}: ${r.payload.toString('utf8')}`);
    const info = r.payload.readUInt16BE(0);
    if (info === INFO_EXPORT) {
      out.size = Number(r.payload.readBigUInt64BE(2));
      out.transmissionFlags = r.payload.readUInt16BE(10);
    } else if (info === INFO_BLOCK_SIZE) {
      out.blockSizes = {
        minimum: r.payload.readUInt32BE(2),
        preferred: r.payload.readUInt32BE(6),
        maximum: r.payload.readUInt32BE(10),
      };
    }
  }
  if (out.size < 0) throw new Error('GO finished without NBD_INFO_EXPORT');
  return out;
}

/** One request's complete answer: the first error (0 if none) and, for a successful READ, the data. */
export interface Reply {
  cookie: bigint;
  error: number;
  data?: Buffer;
}

/** Where a READ points, so its data can be placed; undefined for every other command. */
export type ReadLookup = (cookie: bigint) => { offset: number; length: number } | undefined;

/**
 * Reads messages until one request is complete and returns it. Simple READ data follows the header;
 * structured READ data is assembled from data and hole chunks (holes read as zeroes). `partial` holds
 * structured replies in progress across calls when several requests are in flight.
 */
export async function readReply(c: RawConn, lookup: ReadLookup, partial: Map<bigint, Reply> = new Map()): Promise<Reply> {
  for (;;) {
    const magicBuf = await c.read(4, 'reply magic');
    const magic = magicBuf.readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const h = await c.read(12, 'simple reply');
      const error = h.readUInt32BE(0);
      const cookie = h.readBigUInt64BE(4);
      const req = lookup(cookie);
      const reply: Reply = { cookie, error };
      if (error === 0 && req !== undefined) reply.data = Buffer.from(await c.read(req.length, 'simple read data'));
      return reply;
    }
    if (magic !== STRUCTURED_REPLY_MAGIC) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
    const h = await c.read(16, 'structured reply header');
    const flags = h.readUInt16BE(0);
    const type = h.readUInt16BE(2);
    const cookie = h.readBigUInt64BE(4);
    const length = h.readUInt32BE(12);
    if (length > structuredChunkBytesMax) throw new Error(`structured chunk of ${length} bytes`);
    const payload = await c.read(length, 'structured reply payload');
    const req = lookup(cookie);
    let reply = partial.get(cookie);
    if (!reply) {
      reply = { cookie, error: 0 };
      if (req !== undefined) reply.data = Buffer.alloc(req.length);
      partial.set(cookie, reply);
    }
    if (type & 0x8000) {
      if (reply.error === 0) reply.error = payload.readUInt32BE(0);
    } else if (type === REPLY_TYPE_OFFSET_DATA && req !== undefined) {
      const at = Number(payload.readBigUInt64BE(0)) - req.offset;
      const data = payload.subarray(8);
      if (at < 0 || at + data.length > req.length) throw new Error(`data chunk outside the request (at ${at})`);
      reply.data!.set(data, at);
    } else if (type === REPLY_TYPE_OFFSET_HOLE && req !== undefined) {
      const at = Number(payload.readBigUInt64BE(0)) - req.offset;
      const holeBytes = payload.readUInt32BE(8);
      if (at < 0 || at + holeBytes > req.length) throw new Error(`hole chunk outside the request (at ${at})`);
    }
    if (flags & REPLY_FLAG_DONE) {
      partial.delete(cookie);
      if (reply.error !== 0) delete reply.data;
      return reply;
    }
  }
}

/** Largest structured chunk a test accepts before calling the stream broken. */
export const structuredChunkBytesMax = 64 * 1024 * 1024;
