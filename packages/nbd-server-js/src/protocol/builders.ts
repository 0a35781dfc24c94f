/**
 * One builder per NBD wire message (NetworkBlockDevice/nbd doc/proto.md), named after the spec. The
 * client sends what these build, and the tests use them to speak raw protocol to a server (client
 * messages) or to a client's reply parser (server messages). Every builder returns a fresh Buffer.
 */
import {
  IHAVEOPT,
  NBDMAGIC,
  OPT_GO,
  OPT_INFO,
  OPT_LIST_META_CONTEXT,
  OPT_SET_META_CONTEXT,
  OPTION_HEADER_BYTES,
  OPTION_REPLY_HEADER_BYTES,
  OPTION_REPLY_MAGIC,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_ERROR,
  REPLY_TYPE_ERROR_OFFSET,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_OFFSET_HOLE,
  REQUEST_HEADER_BYTES,
  REQUEST_MAGIC,
  SIMPLE_REPLY_BYTES,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_HEADER_BYTES,
  STRUCTURED_REPLY_MAGIC,
} from './constants.js';

/** Cookies are 8 opaque bytes on the wire; builders accept a bigint or a safe non-negative integer. */
export type Cookie = bigint | number;

const uint32Max = 0xffffffff;
const uint16Max = 0xffff;

function u64(value: Cookie): bigint {
  const v = typeof value === 'bigint' ? value : BigInt(value);
  if (v < 0n || v > 0xffffffffffffffffn) throw new RangeError(`not a 64-bit unsigned value: ${value}`);
  return v;
}

function u32(value: number, what: string): number {
  if (!Number.isInteger(value) || value < 0 || value > uint32Max) throw new RangeError(`${what} out of 32-bit range: ${value}`);
  return value;
}

function u16(value: number, what: string): number {
  if (!Number.isInteger(value) || value < 0 || value > uint16Max) throw new RangeError(`${what} out of 16-bit range: ${value}`);
  return value;
}

function utf8(s: string): Buffer {
  return Buffer.from(s, 'utf8');
}

// ---- Handshake, server to client ----

/** The newstyle greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags. */
export function buildServerGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(u16(handshakeFlags, 'handshake flags'), 16);
  return b;
}

/** An option reply: magic, option, reply type, length, payload. */
export function buildOptionReply(option: number, replyType: number, payload: Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(OPTION_REPLY_HEADER_BYTES + payload.length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(u32(option, 'option'), 8);
  b.writeUInt32BE(u32(replyType >>> 0, 'reply type'), 12);
  b.writeUInt32BE(payload.length, 16);
  b.set(payload, OPTION_REPLY_HEADER_BYTES);
  return b;
}

/** Payload of NBD_REP_SERVER (an OPT_LIST answer): name length, name, description. */
export function buildRepServerPayload(name: string, description = ''): Buffer {
  const n = utf8(name);
  const d = utf8(description);
  const b = Buffer.alloc(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

/** Payload of NBD_REP_INFO carrying NBD_INFO_EXPORT: type 0, 64-bit size, 16-bit transmission flags. */
export function buildInfoExportPayload(sizeBytes: number | bigint, transmissionFlags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(0, 0);
  b.writeBigUInt64BE(u64(sizeBytes), 2);
  b.writeUInt16BE(u16(transmissionFlags, 'transmission flags'), 10);
  return b;
}

/** Payload of NBD_REP_INFO carrying NBD_INFO_BLOCK_SIZE: type 3, minimum, preferred, maximum. */
export function buildInfoBlockSizePayload(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.alloc(14);
  b.writeUInt16BE(3, 0);
  b.writeUInt32BE(u32(minimum, 'minimum'), 2);
  b.writeUInt32BE(u32(preferred, 'preferred'), 6);
  b.writeUInt32BE(u32(maximum, 'maximum'), 10);
  return b;
}

/** Payload of NBD_REP_META_CONTEXT: 32-bit context id, then the context name. */
export function buildMetaContextPayload(contextId: number, name: string): Buffer {
  const n = utf8(name);
  const b = Buffer.alloc(4 + n.length);
  b.writeUInt32BE(u32(contextId, 'context id'), 0);
  n.copy(b, 4);
  return b;
}

/** The server's answer to NBD_OPT_EXPORT_NAME: size, transmission flags, 124 zero bytes unless NO_ZEROES. */
export function buildExportNameReply(sizeBytes: number | bigint, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  b.writeBigUInt64BE(u64(sizeBytes), 0);
  b.writeUInt16BE(u16(transmissionFlags, 'transmission flags'), 8);
  return b;
}

// ---- Handshake, client to server ----

/** The client's 32-bit flags, sent right after the greeting. */
export function buildClientFlags(flags: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(u32(flags >>> 0, 'client flags'), 0);
  return b;
}

/** An option request: IHAVEOPT, option, length, payload. */
export function buildOption(option: number, payload: Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(OPTION_HEADER_BYTES + payload.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(u32(option, 'option'), 8);
  b.writeUInt32BE(payload.length, 12);
  b.set(payload, OPTION_HEADER_BYTES);
  return b;
}

/**
 * NBD_OPT_INFO (or NBD_OPT_GO, which shares the layout): name length, name, count of info requests,
 * 16-bit info types.
 */
export function buildInfoOption(name: string, infos: readonly number[] = [], option: number = OPT_INFO): Buffer {
  const n = utf8(name);
  const p = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
  p.writeUInt32BE(n.length, 0);
  n.copy(p, 4);
  p.writeUInt16BE(u16(infos.length, 'info count'), 4 + n.length);
  infos.forEach((info, i) => p.writeUInt16BE(u16(info, 'info type'), 6 + n.length + 2 * i));
  return buildOption(option, p);
}

export function buildGoOption(name: string, infos: readonly number[] = []): Buffer {
  return buildInfoOption(name, infos, OPT_GO);
}

/**
 * NBD_OPT_SET_META_CONTEXT (or NBD_OPT_LIST_META_CONTEXT, same layout): export name length, name,
 * 32-bit query count, then each query as length and string.
 */
export function buildSetMetaContext(name: string, queries: readonly string[], option: number = OPT_SET_META_CONTEXT): Buffer {
  const n = utf8(name);
  const qs = queries.map(utf8);
  const p = Buffer.alloc(4 + n.length + 4 + qs.reduce((sum, q) => sum + 4 + q.length, 0));
  let pos = p.writeUInt32BE(n.length, 0);
  pos += n.copy(p, pos);
  pos = p.writeUInt32BE(qs.length, pos);
  for (const q of qs) {
    pos = p.writeUInt32BE(q.length, pos);
    pos += q.copy(p, pos);
  }
  return buildOption(option, p);
}

export function buildListMetaContext(name: string, queries: readonly string[]): Buffer {
  return buildSetMetaContext(name, queries, OPT_LIST_META_CONTEXT);
}

// ---- Transmission, client to server ----

export interface RequestHeader {
  readonly flags?: number;
  readonly type: number;
  readonly cookie: Cookie;
  readonly offset: number | bigint;
  readonly length: number;
}

/** Writes a 28-byte request header into `b` at `pos` (the client's allocation-light path). */
export function writeRequestHeader(b: Buffer, pos: number, h: RequestHeader): void {
  b.writeUInt32BE(REQUEST_MAGIC, pos);
  b.writeUInt16BE(u16(h.flags ?? 0, 'command flags'), pos + 4);
  b.writeUInt16BE(u16(h.type, 'command type'), pos + 6);
  b.writeBigUInt64BE(u64(h.cookie), pos + 8);
  b.writeBigUInt64BE(u64(h.offset), pos + 16);
  b.writeUInt32BE(u32(h.length, 'length'), pos + 24);
}

/** A request: the 28-byte header, followed by `payload` when given (a WRITE's data). */
export function buildRequest(h: RequestHeader, payload?: Uint8Array): Buffer {
  const b = Buffer.alloc(REQUEST_HEADER_BYTES + (payload?.length ?? 0));
  writeRequestHeader(b, 0, h);
  if (payload) b.set(payload, REQUEST_HEADER_BYTES);
  return b;
}

// ---- Transmission, server to client ----

/** A simple reply: magic, error, cookie, then a successful READ's data. */
export function buildSimpleReply(error: number, cookie: Cookie, data?: Uint8Array): Buffer {
  const b = Buffer.alloc(SIMPLE_REPLY_BYTES + (data?.length ?? 0));
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(u32(error, 'error'), 4);
  b.writeBigUInt64BE(u64(cookie), 8);
  if (data) b.set(data, SIMPLE_REPLY_BYTES);
  return b;
}

/** A structured reply chunk: magic, flags, type, cookie, length, payload. */
export function buildStructuredReply(flags: number, type: number, cookie: Cookie, payload: Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(STRUCTURED_REPLY_HEADER_BYTES + payload.length);
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(u16(flags, 'reply flags'), 4);
  b.writeUInt16BE(u16(type, 'reply type'), 6);
  b.writeBigUInt64BE(u64(cookie), 8);
  b.writeUInt32BE(payload.length, 16);
  b.set(payload, STRUCTURED_REPLY_HEADER_BYTES);
  return b;
}

function doneFlag(done: boolean): number {
  return done ? REPLY_FLAG_DONE : 0;
}

export function buildNoneChunk(cookie: Cookie): Buffer {
  return buildStructuredReply(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie);
}

export function buildOffsetDataChunk(cookie: Cookie, offset: number | bigint, data: Uint8Array, done = false): Buffer {
  const p = Buffer.alloc(8 + data.length);
  p.writeBigUInt64BE(u64(offset), 0);
  p.set(data, 8);
  return buildStructuredReply(doneFlag(done), REPLY_TYPE_OFFSET_DATA, cookie, p);
}

export function buildOffsetHoleChunk(cookie: Cookie, offset: number | bigint, holeBytes: number, done = false): Buffer {
  const p = Buffer.alloc(12);
  p.writeBigUInt64BE(u64(offset), 0);
  p.writeUInt32BE(u32(holeBytes, 'hole size'), 8);
  return buildStructuredReply(doneFlag(done), REPLY_TYPE_OFFSET_HOLE, cookie, p);
}

/** NBD_REPLY_TYPE_BLOCK_STATUS: context id, then (length, flags) descriptors. */
export function buildBlockStatusChunk(
  cookie: Cookie,
  contextId: number,
  extents: readonly { length: number; flags: number }[],
  done = false,
): Buffer {
  const p = Buffer.alloc(4 + 8 * extents.length);
  p.writeUInt32BE(u32(contextId, 'context id'), 0);
  extents.forEach((e, i) => {
    p.writeUInt32BE(u32(e.length, 'extent length'), 4 + 8 * i);
    p.writeUInt32BE(u32(e.flags, 'extent flags'), 8 + 8 * i);
  });
  return buildStructuredReply(doneFlag(done), REPLY_TYPE_BLOCK_STATUS, cookie, p);
}

/** NBD_REPLY_TYPE_ERROR: error, message length, message. */
export function buildErrorChunk(cookie: Cookie, error: number, message = '', done = true): Buffer {
  const m = utf8(message);
  const p = Buffer.alloc(6 + m.length);
  p.writeUInt32BE(u32(error, 'error'), 0);
  p.writeUInt16BE(u16(m.length, 'message length'), 4);
  m.copy(p, 6);
  return buildStructuredReply(doneFlag(done), REPLY_TYPE_ERROR, cookie, p);
}

/** NBD_REPLY_TYPE_ERROR_OFFSET: error, message length, message, 64-bit offset. */
export function buildErrorOffsetChunk(cookie: Cookie, error: number, offset: number | bigint, message = '', done = false): Buffer {
  const m = utf8(message);
  const p = Buffer.alloc(6 + m.length + 8);
  p.writeUInt32BE(u32(error, 'error'), 0);
  p.writeUInt16BE(u16(m.length, 'message length'), 4);
  m.copy(p, 6);
  p.writeBigUInt64BE(u64(offset), 6 + m.length);
  return buildStructuredReply(doneFlag(done), REPLY_TYPE_ERROR_OFFSET, cookie, p);
}
