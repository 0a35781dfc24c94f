/**
 * I/O-free framing of what an NBD client sends: the client flags, option requests during the handshake,
 * and request headers (plus WRITE payloads) during transmission. Bytes go in with `push`, messages come
 * out of `next`, one at a time, so the caller can switch phase (or stop pulling, for backpressure)
 * between two messages.
 *
 * Fixed-size fields are read straight out of the socket chunk when one chunk holds them and copied into
 * a small scratch buffer only when they span chunks. WRITE payloads are always copied, as they arrive,
 * into a buffer the server owns (from the PayloadPool, returned there once the write settles): a socket
 * chunk is never handed to a device, and a small view never pins a large chunk. Option payloads are returned as views, valid only until the next `push`; the handshake
 * consumes them synchronously.
 */
import { CMD_WRITE, IHAVEOPT, OPTION_HEADER_BYTES, REQUEST_HEADER_BYTES, REQUEST_MAGIC } from '../protocol/constants.js';
import { PayloadPool, type PayloadSource } from './payload-pool.js';

export interface ParserLimits {
  /** Largest option payload accepted; a longer one ends the connection. */
  readonly optionBytesMax: number;
  /** Largest WRITE payload collected into memory. */
  readonly requestBytesMax: number;
  /**
   * Largest WRITE payload skipped (read and dropped) to keep the stream in step when it is over
   * `requestBytesMax`; beyond this the stream is taken as broken and the connection ends.
   */
  readonly writeSkipBytesMax: number;
}

export interface ClientFlagsMessage {
  readonly kind: 'client-flags';
  readonly flags: number;
}

export interface OptionMessage {
  readonly kind: 'option';
  readonly option: number;
  /** A view valid until the next `push`. */
  readonly data: Buffer;
}

/** A transmission request. One object per request: it travels with the request until its reply. */
export interface Request {
  readonly kind: 'request';
  readonly flags: number;
  readonly type: number;
  /** The cookie as two opaque 32-bit halves: echoed, never interpreted. */
  readonly cookieHi: number;
  readonly cookieLo: number;
  /** Exact below 2^53; larger offsets are approximate, which only matters for rejecting them. */
  readonly offset: number;
  readonly length: number;
  /** A WRITE's payload, owned by the server; null for other commands and for a skipped payload. */
  readonly payload: Buffer | null;
  /** The WRITE payload was longer than `requestBytesMax` and has been read and dropped. */
  readonly payloadSkipped: boolean;
}

export interface ProtocolErrorMessage {
  readonly kind: 'protocol-error';
  readonly reason: string;
}

export type ClientMessage = ClientFlagsMessage | OptionMessage | Request | ProtocolErrorMessage;

const clientFlagsBytes = 4;
const ihaveoptHi = Number(IHAVEOPT >> 32n);
const ihaveoptLo = Number(IHAVEOPT & 0xffffffffn);
const twoTo32 = 2 ** 32;

/**
 * A queue of incoming chunks with a read cursor. Consumed chunks are dropped as soon as the cursor
 * leaves them, so memory held is what has arrived and not yet been parsed.
 */
export class ChunkQueue {
  private chunks: Buffer[] = [];
  private head = 0;
  private pos = 0;
  private bytes = 0;

  get available(): number {
    return this.bytes;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.bytes += chunk.length;
  }

  /**
   * A view of the next `n` bytes without consuming them: the chunk itself when it holds them all, else
   * a copy into `scratch` (which must be at least `n` long) or a fresh buffer.
   */
  peek(n: number, scratch?: Buffer): { buf: Buffer; at: number } {
    if (n > this.bytes) throw new RangeError(`peek ${n} with ${this.bytes} available`);
    const first = this.chunks[this.head];
    if (first !== undefined && first.length - this.pos >= n) return { buf: first, at: this.pos };
    const out = scratch ?? Buffer.allocUnsafe(n);
    this.copyOut(out, 0, n);
    return { buf: out, at: 0 };
  }

  /** Copies the next `n` bytes into `dst` at `at` without consuming them. */
  private copyOut(dst: Buffer, at: number, n: number): void {
    let i = this.head;
    let p = this.pos;
    let done = 0;
    while (done < n) {
      const c = this.chunks[i];
      const take = Math.min(c.length - p, n - done);
      c.copy(dst, at + done, p, p + take);
      done += take;
      i += 1;
      p = 0;
    }
  }

  /** Consumes `n` bytes. */
  skip(n: number): void {
    if (n > this.bytes) throw new RangeError(`skip ${n} with ${this.bytes} available`);
    this.bytes -= n;
    let left = n;
    while (left > 0) {
      const c = this.chunks[this.head];
      const inChunk = c.length - this.pos;
      if (left < inChunk) {
        this.pos += left;
        left = 0;
      } else {
        left -= inChunk;
        this.releaseHead();
      }
    }
  }

  /** Copies up to `n` available bytes into `dst` at `at`, consumes them, and returns how many. */
  take(dst: Buffer, at: number, n: number): number {
    const count = Math.min(n, this.bytes);
    this.copyOut(dst, at, count);
    this.skip(count);
    return count;
  }

  /** Replaces what is held by one owned copy, so the chunks it came from may be reused. */
  compact(): void {
    if (this.bytes === 0) return;
    const out = Buffer.allocUnsafe(this.bytes);
    this.copyOut(out, 0, this.bytes);
    this.chunks = [out];
    this.head = 0;
    this.pos = 0;
  }

  /** Consumes `n` bytes and returns them: a view when one chunk holds them, else a copy. */
  read(n: number): Buffer {
    const { buf, at } = this.peek(n);
    const out = buf.length === n && at === 0 ? buf : buf.subarray(at, at + n);
    this.skip(n);
    return out;
  }

  private releaseHead(): void {
    this.chunks[this.head] = undefined as unknown as Buffer;
    this.head += 1;
    this.pos = 0;
    if (this.head === this.chunks.length) {
      this.chunks = [];
      this.head = 0;
    } else if (this.head >= 64 && this.head * 2 >= this.chunks.length) {
      this.chunks = this.chunks.slice(this.head);
      this.head = 0;
    }
  }
}

type Mutable<T> = { -readonly [K in keyof T]: T[K] };
type Phase = 'client-flags' | 'options' | 'transmission' | 'failed';

export class ClientStreamParser {
  private readonly queue = new ChunkQueue();
  private readonly scratch = Buffer.allocUnsafe(REQUEST_HEADER_BYTES);
  private phase: Phase = 'client-flags';
  /** The request whose WRITE payload is being collected or skipped (or waits for its buffer). */
  private pending: { request: Mutable<Request>; filled: number; awaitingMemory: boolean } | null = null;

  constructor(
    private readonly limits: ParserLimits,
    private readonly pool: PayloadSource = new PayloadPool(),
  ) {
    if (!(limits.requestBytesMax <= limits.writeSkipBytesMax)) {
      throw new RangeError('writeSkipBytesMax must be at least requestBytesMax');
    }
  }

  /** Bytes received and not yet parsed (excludes a partly collected WRITE payload). */
  get bufferedBytes(): number {
    return this.queue.available;
  }

  /** A WRITE header was parsed but the budget had no room for its payload: `next` asks again. */
  get awaitingMemory(): boolean {
    return this.pending?.awaitingMemory ?? false;
  }

  /** Length of the WRITE payload waiting for memory (0 when none waits). */
  get awaitingBytes(): number {
    return this.pending?.awaitingMemory === true ? this.pending.request.length : 0;
  }

  /** Bytes of a WRITE payload being collected (its buffer is held), 0 when none is. */
  get receivingPayloadBytes(): number {
    const p = this.pending;
    return p !== null && p.request.payload !== null ? p.request.length : 0;
  }

  /**
   * Takes the buffer of a WRITE whose payload was still being collected, for the caller to hand back
   * (the connection closed). Null when there is none.
   */
  takePartialPayload(): Buffer | null {
    const p = this.pending;
    if (p === null || p.request.payload === null) return null;
    const payload = p.request.payload;
    p.request.payload = null;
    this.pending = null;
    this.phase = 'failed';
    return payload;
  }

  push(chunk: Buffer): void {
    this.queue.push(chunk);
  }

  /**
   * Copies what is buffered and not yet parsed into memory the parser owns, so the caller may reuse
   * the buffers it pushed.
   */
  compact(): void {
    this.queue.compact();
  }

  /**
   * Where the next bytes from the client can go without a copy: the unfilled rest of a WRITE payload of
   * at least `bytesMin` bytes, when nothing else is buffered ahead of it. Null otherwise. Bytes put
   * there are announced with `receivedDirect`.
   */
  receiveTarget(bytesMin: number): Buffer | null {
    const p = this.pending;
    if (p === null || p.request.payload === null || this.queue.available !== 0) return null;
    if (p.request.length - p.filled < bytesMin) return null;
    return p.request.payload.subarray(p.filled);
  }

  /** `n` bytes were received into the buffer `receiveTarget` returned. */
  receivedDirect(n: number): void {
    const p = this.pending;
    if (p === null || p.request.payload === null || this.queue.available !== 0 || !(n > 0 && p.filled + n <= p.request.length)) {
      throw new Error(`receivedDirect(${n}) without a matching receive target`);
    }
    p.filled += n;
  }

  /** After EXPORT_NAME or a successful GO. */
  enterTransmission(): void {
    if (this.phase !== 'options') throw new Error(`enterTransmission in phase ${this.phase}`);
    this.phase = 'transmission';
  }

  /** The next complete message, or undefined when more bytes are needed. */
  next(): ClientMessage | undefined {
    switch (this.phase) {
      case 'client-flags':
        return this.nextClientFlags();
      case 'options':
        return this.nextOption();
      case 'transmission':
        return this.nextRequest();
      case 'failed':
        return undefined;
    }
  }

  private fail(reason: string): ProtocolErrorMessage {
    this.phase = 'failed';
    return { kind: 'protocol-error', reason };
  }

  private nextClientFlags(): ClientFlagsMessage | undefined {
    if (this.queue.available < clientFlagsBytes) return undefined;
    const { buf, at } = this.queue.peek(clientFlagsBytes, this.scratch);
    const flags = buf.readUInt32BE(at);
    this.queue.skip(clientFlagsBytes);
    this.phase = 'options';
    return { kind: 'client-flags', flags };
  }

  private nextOption(): OptionMessage | ProtocolErrorMessage | undefined {
    if (this.queue.available < OPTION_HEADER_BYTES) return undefined;
    const { buf, at } = this.queue.peek(OPTION_HEADER_BYTES, this.scratch);
    if (buf.readUInt32BE(at) !== ihaveoptHi || buf.readUInt32BE(at + 4) !== ihaveoptLo) {
      return this.fail('bad option magic');
    }
    const option = buf.readUInt32BE(at + 8);
    const length = buf.readUInt32BE(at + 12);
    if (length > this.limits.optionBytesMax) {
      return this.fail(`option ${option} length ${length} exceeds ${this.limits.optionBytesMax}`);
    }
    if (this.queue.available < OPTION_HEADER_BYTES + length) return undefined;
    this.queue.skip(OPTION_HEADER_BYTES);
    return { kind: 'option', option, data: this.queue.read(length) };
  }

  private nextRequest(): Request | ProtocolErrorMessage | undefined {
    if (this.pending === null) {
      if (this.queue.available < REQUEST_HEADER_BYTES) return undefined;
      const { buf, at } = this.queue.peek(REQUEST_HEADER_BYTES, this.scratch);
      if (buf.readUInt32BE(at) !== REQUEST_MAGIC) return this.fail('bad request magic');
      const request: Mutable<Request> = {
        kind: 'request',
        flags: buf.readUInt16BE(at + 4),
        type: buf.readUInt16BE(at + 6),
        cookieHi: buf.readUInt32BE(at + 8),
        cookieLo: buf.readUInt32BE(at + 12),
        offset: buf.readUInt32BE(at + 16) * twoTo32 + buf.readUInt32BE(at + 20),
        length: buf.readUInt32BE(at + 24),
        payload: null,
        payloadSkipped: false,
      };
      this.queue.skip(REQUEST_HEADER_BYTES);
      if (request.type !== CMD_WRITE) return request;
      if (request.length > this.limits.writeSkipBytesMax) {
        return this.fail(`write length ${request.length} exceeds ${this.limits.writeSkipBytesMax}`);
      }
      this.pending = { request, filled: 0, awaitingMemory: request.length <= this.limits.requestBytesMax };
      if (!this.pending.awaitingMemory) request.payloadSkipped = true;
    }
    const p = this.pending;
    if (p.awaitingMemory) {
      const payload = this.pool.tryAcquire(p.request.length);
      if (payload === null) return undefined;
      p.request.payload = payload;
      p.awaitingMemory = false;
    }
    const want = p.request.length - p.filled;
    if (p.request.payload !== null) {
      p.filled += this.queue.take(p.request.payload, p.filled, want);
    } else {
      const n = Math.min(want, this.queue.available);
      this.queue.skip(n);
      p.filled += n;
    }
    if (p.filled < p.request.length) return undefined;
    this.pending = null;
    return p.request;
  }
}
