/**
 * The client's transmission-phase parser: bytes in, completed requests out, no I/O. It frames simple
 * replies and structured reply chunks by their length fields, streams READ data straight from the
 * socket chunks into the caller's buffer (one copy), fills holes with zeroes, collects base:allocation
 * extents, and records the first error of a request. A reply that breaks the protocol (unknown cookie,
 * bad magic, data outside the request, oversized chunk) throws `NbdProtocolError`: the stream can no
 * longer be trusted, so the owner must drop the connection.
 */
import type { Extent } from '@gannet/block-device';
import {
  CMD_BLOCK_STATUS,
  CMD_READ,
  isReplyTypeError,
  NBD_EIO,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_ERROR,
  REPLY_TYPE_ERROR_OFFSET,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_OFFSET_HOLE,
  SIMPLE_REPLY_BYTES,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_HEADER_BYTES,
  STRUCTURED_REPLY_MAGIC,
} from '../protocol/constants.js';
import { ChunkCursor } from './chunks.js';

export class NbdProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NbdProtocolError';
  }
}

/** A request in flight, as the parser sees it; the parser fills the mutable fields. */
export interface PendingReply {
  readonly cookie: number;
  readonly type: number;
  readonly offset: number;
  readonly length: number;
  /** READ destination, exactly `length` bytes. */
  readonly buf?: Uint8Array;
  /** First wire error seen (0: none). */
  errno: number;
  message: string;
  /** READ bytes delivered by data and hole chunks. */
  bytesSeen: number;
  /** BLOCK_STATUS result for the base:allocation context. */
  extents?: Extent[];
}

export interface ReplyParserOptions {
  lookup(cookie: number): PendingReply | undefined;
  /** Called once per request, when its last reply arrives. */
  complete(reply: PendingReply): void;
  structuredReplies: boolean;
  /** Context id the server gave base:allocation, if negotiated. */
  metaContextId?: number;
  /** Largest payload of a non-data chunk we buffer (errors, block status). */
  chunkPayloadBytesMax: number;
}

const cookieHighMax = 2 ** 21; // cookies are safe integers, so a high word at or above this is foreign
const offsetDataHeaderBytes = 8;
const offsetHoleBytes = 12;
const errorHeaderBytes = 6;
const blockStatusDescriptorBytes = 8;

type State =
  | { kind: 'header' }
  | { kind: 'simple-data'; reply: PendingReply; done: number }
  | { kind: 'chunk-payload'; reply: PendingReply; flags: number; type: number; length: number }
  | { kind: 'data-offset'; reply: PendingReply; flags: number; length: number }
  | { kind: 'chunk-data'; reply: PendingReply; flags: number; destStart: number; dataBytes: number; done: number };

export class ReplyParser {
  private readonly cursor = new ChunkCursor();
  private state: State = { kind: 'header' };
  private failed: NbdProtocolError | undefined;

  constructor(private readonly options: ReplyParserOptions) {}

  /** Feeds bytes from the socket; throws NbdProtocolError if the server broke the protocol. */
  push(chunk: Buffer): void {
    if (this.failed) throw this.failed;
    this.cursor.push(chunk);
    try {
      while (this.step());
    } catch (err) {
      if (err instanceof NbdProtocolError) this.failed = err;
      throw err;
    }
  }

  /** True when no reply is partially parsed (a clean point to end the stream). */
  get idle(): boolean {
    return this.state.kind === 'header' && this.cursor.available === 0;
  }

  private step(): boolean {
    const s = this.state;
    switch (s.kind) {
      case 'header':
        return this.parseHeader();
      case 'simple-data': {
        const n = this.cursor.copyInto(s.reply.buf!, s.done, s.reply.length - s.done);
        s.done += n;
        if (s.done < s.reply.length) return false;
        s.reply.bytesSeen = s.reply.length;
        this.state = { kind: 'header' };
        this.options.complete(s.reply);
        return true;
      }
      case 'data-offset': {
        if (this.cursor.available < offsetDataHeaderBytes) return false;
        const offset = readOffset(this.cursor.take(offsetDataHeaderBytes), 0);
        const dataBytes = s.length - offsetDataHeaderBytes;
        const destStart = this.checkChunkRange(s.reply, offset, dataBytes, 'OFFSET_DATA');
        this.state = { kind: 'chunk-data', reply: s.reply, flags: s.flags, destStart, dataBytes, done: 0 };
        return true;
      }
      case 'chunk-data': {
        const n = this.cursor.copyInto(s.reply.buf!, s.destStart + s.done, s.dataBytes - s.done);
        s.done += n;
        if (s.done < s.dataBytes) return false;
        s.reply.bytesSeen += s.dataBytes;
        this.state = { kind: 'header' };
        this.endChunk(s.reply, s.flags);
        return true;
      }
      case 'chunk-payload': {
        if (this.cursor.available < s.length) return false;
        const payload = this.cursor.take(s.length);
        this.state = { kind: 'header' };
        this.handlePayload(s.reply, s.type, payload);
        this.endChunk(s.reply, s.flags);
        return true;
      }
    }
  }

  private parseHeader(): boolean {
    if (this.cursor.available < 4) return false;
    const magic = this.cursor.peekUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      if (this.cursor.available < SIMPLE_REPLY_BYTES) return false;
      const h = this.cursor.take(SIMPLE_REPLY_BYTES);
      const error = h.readUInt32BE(4);
      const reply = this.lookup(h, 8);
      if (error !== 0) {
        setError(reply, error, '');
        this.options.complete(reply);
      } else if (reply.type === CMD_READ && reply.length > 0) {
        this.state = { kind: 'simple-data', reply, done: 0 };
      } else {
        // Block status only exists as a structured chunk; a bare success would carry no extents.
        if (reply.type === CMD_BLOCK_STATUS) setError(reply, NBD_EIO, 'simple reply to BLOCK_STATUS');
        reply.bytesSeen = reply.type === CMD_READ ? reply.length : 0;
        this.options.complete(reply);
      }
      return true;
    }
    if (magic !== STRUCTURED_REPLY_MAGIC) {
      throw new NbdProtocolError(`bad reply magic 0x${magic.toString(16).padStart(8, '0')}`);
    }
    if (!this.options.structuredReplies) throw new NbdProtocolError('structured reply without negotiation');
    if (this.cursor.available < STRUCTURED_REPLY_HEADER_BYTES) return false;
    const h = this.cursor.take(STRUCTURED_REPLY_HEADER_BYTES);
    const flags = h.readUInt16BE(4);
    const type = h.readUInt16BE(6);
    const reply = this.lookup(h, 8);
    const length = h.readUInt32BE(16);
    if (type === REPLY_TYPE_OFFSET_DATA) {
      if (reply.type !== CMD_READ) throw new NbdProtocolError(`OFFSET_DATA for a non-READ request`);
      if (length <= offsetDataHeaderBytes) throw new NbdProtocolError(`OFFSET_DATA chunk of ${length} bytes`);
      this.state = { kind: 'data-offset', reply, flags, length };
      return true;
    }
    if (length > this.options.chunkPayloadBytesMax) {
      throw new NbdProtocolError(`reply chunk type ${type} of ${length} bytes exceeds ${this.options.chunkPayloadBytesMax}`);
    }
    this.state = { kind: 'chunk-payload', reply, flags, type, length };
    return true;
  }

  private lookup(h: Buffer, at: number): PendingReply {
    const high = h.readUInt32BE(at);
    const low = h.readUInt32BE(at + 4);
    const reply = high < cookieHighMax ? this.options.lookup(high * 2 ** 32 + low) : undefined;
    if (!reply) throw new NbdProtocolError(`reply for unknown cookie 0x${h.toString('hex', at, at + 8)}`);
    return reply;
  }

  /** Asserts [offset, offset + bytes) lies in the READ's range; returns the position in its buffer. */
  private checkChunkRange(reply: PendingReply, offset: number, bytes: number, what: string): number {
    const start = offset - reply.offset;
    if (!(start >= 0 && start + bytes <= reply.length)) {
      throw new NbdProtocolError(`${what} ${offset}+${bytes} outside the request ${reply.offset}+${reply.length}`);
    }
    return start;
  }

  private handlePayload(reply: PendingReply, type: number, p: Buffer): void {
    switch (type) {
      case REPLY_TYPE_NONE:
        if (p.length !== 0) throw new NbdProtocolError(`NONE chunk with ${p.length} bytes of payload`);
        return;
      case REPLY_TYPE_OFFSET_HOLE: {
        if (reply.type !== CMD_READ) throw new NbdProtocolError('OFFSET_HOLE for a non-READ request');
        if (p.length !== offsetHoleBytes) throw new NbdProtocolError(`OFFSET_HOLE chunk of ${p.length} bytes`);
        const holeBytes = p.readUInt32BE(8);
        const start = this.checkChunkRange(reply, readOffset(p, 0), holeBytes, 'OFFSET_HOLE');
        reply.buf!.fill(0, start, start + holeBytes);
        reply.bytesSeen += holeBytes;
        return;
      }
      case REPLY_TYPE_BLOCK_STATUS:
        this.handleBlockStatus(reply, p);
        return;
      case REPLY_TYPE_ERROR:
      case REPLY_TYPE_ERROR_OFFSET: {
        const { error, message } = readError(p, type === REPLY_TYPE_ERROR_OFFSET ? 8 : 0);
        setError(reply, error, message);
        return;
      }
      default:
        if (!isReplyTypeError(type)) throw new NbdProtocolError(`unknown reply chunk type ${type}`);
        setError(reply, p.length >= 4 ? p.readUInt32BE(0) : NBD_EIO, '');
    }
  }

  private handleBlockStatus(reply: PendingReply, p: Buffer): void {
    if (reply.type !== CMD_BLOCK_STATUS) throw new NbdProtocolError('BLOCK_STATUS for a non-BLOCK_STATUS request');
    if (p.length < 4 + blockStatusDescriptorBytes || (p.length - 4) % blockStatusDescriptorBytes !== 0) {
      throw new NbdProtocolError(`BLOCK_STATUS chunk of ${p.length} bytes`);
    }
    const contextId = p.readUInt32BE(0);
    if (contextId !== this.options.metaContextId) throw new NbdProtocolError(`BLOCK_STATUS for unnegotiated context ${contextId}`);
    if (reply.extents) throw new NbdProtocolError('second BLOCK_STATUS chunk for one context');
    const extents: Extent[] = [];
    for (let pos = 4; pos < p.length; pos += blockStatusDescriptorBytes) {
      const length = p.readUInt32BE(pos);
      if (length === 0) {
        setError(reply, NBD_EIO, 'server sent a zero-length extent');
        return;
      }
      extents.push({ length, flags: p.readUInt32BE(pos + 4) });
    }
    reply.extents = extents;
  }

  private endChunk(reply: PendingReply, flags: number): void {
    if ((flags & REPLY_FLAG_DONE) === 0) return;
    if (reply.type === CMD_READ && reply.errno === 0 && reply.bytesSeen !== reply.length) {
      setError(reply, NBD_EIO, `server sent ${reply.bytesSeen} of ${reply.length} bytes`);
    }
    if (reply.type === CMD_BLOCK_STATUS && reply.errno === 0 && !reply.extents) {
      setError(reply, NBD_EIO, 'server sent no extents for base:allocation');
    }
    this.options.complete(reply);
  }
}

function setError(reply: PendingReply, error: number, message: string): void {
  if (reply.errno !== 0) return;
  reply.errno = error === 0 ? NBD_EIO : error;
  reply.message = message;
}

function readOffset(b: Buffer, at: number): number {
  const high = b.readUInt32BE(at);
  if (high >= cookieHighMax) throw new NbdProtocolError(`offset beyond 2^53 in reply`);
  return high * 2 ** 32 + b.readUInt32BE(at + 4);
}

function readError(p: Buffer, trailerBytes: number): { error: number; message: string } {
  if (p.length < errorHeaderBytes + trailerBytes) throw new NbdProtocolError(`error chunk of ${p.length} bytes`);
  const messageBytes = p.readUInt16BE(4);
  if (errorHeaderBytes + messageBytes + trailerBytes !== p.length) {
    throw new NbdProtocolError(`error chunk message length ${messageBytes} does not fit its ${p.length} bytes`);
  }
  return { error: p.readUInt32BE(0), message: p.toString('utf8', errorHeaderBytes, errorHeaderBytes + messageBytes) };
}
