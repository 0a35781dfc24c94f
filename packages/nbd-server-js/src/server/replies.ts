/**
 * Encoders for everything the server sends. Handshake encoders return one buffer per message (the
 * handshake is short). Transmission encoders return only the small header frames; a READ's data is
 * sent as its own frame straight from the buffer the device filled, never copied.
 */
import {
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  INFO_BLOCK_SIZE,
  INFO_DESCRIPTION,
  INFO_EXPORT,
  INFO_NAME,
  NBDMAGIC,
  IHAVEOPT,
  OPTION_REPLY_HEADER_BYTES,
  OPTION_REPLY_MAGIC,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_ERROR,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_OFFSET_HOLE,
  SIMPLE_REPLY_BYTES,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_HEADER_BYTES,
  STRUCTURED_REPLY_MAGIC,
} from '../protocol/constants.js';

/** The spec's ceiling for strings (export names, messages). */
export const stringBytesMax = 4096;
/** The zero padding an old-style EXPORT_NAME reply carries unless NO_ZEROES was negotiated. */
export const exportNamePaddingBytes = 124;

const twoTo32 = 2 ** 32;

function writeU64(b: Buffer, at: number, value: number): void {
  b.writeUInt32BE(Math.floor(value / twoTo32), at);
  b.writeUInt32BE(value >>> 0, at + 4);
}

/** UTF-8 bytes of `s`, cut at the spec's string limit on a code point boundary. */
export function utf8Capped(s: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  if (b.length <= stringBytesMax) return b;
  let end = stringBytesMax;
  while (end > 0 && (b[end] & 0xc0) === 0x80) end -= 1;
  return b.subarray(0, end);
}

// ---- Handshake ----

export function encodeGreeting(): Buffer {
  const b = Buffer.allocUnsafe(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
  return b;
}

export function encodeOptionReply(option: number, replyType: number, payload?: Uint8Array): Buffer {
  const length = payload?.length ?? 0;
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_BYTES + length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(replyType >>> 0, 12);
  b.writeUInt32BE(length, 16);
  if (payload) b.set(payload, OPTION_REPLY_HEADER_BYTES);
  return b;
}

/** An error reply with a human-readable message. */
export function encodeOptionError(option: number, replyType: number, message: string): Buffer {
  return encodeOptionReply(option, replyType, utf8Capped(message));
}

export function encodeRepServer(option: number, replyType: number, name: string, description: string): Buffer {
  const n = utf8Capped(name);
  const d = utf8Capped(description);
  const p = Buffer.allocUnsafe(4 + n.length + d.length);
  p.writeUInt32BE(n.length, 0);
  n.copy(p, 4);
  d.copy(p, 4 + n.length);
  return encodeOptionReply(option, replyType, p);
}

export function encodeInfoExport(sizeBytes: number, transmissionFlags: number): Buffer {
  const p = Buffer.allocUnsafe(12);
  p.writeUInt16BE(INFO_EXPORT, 0);
  writeU64(p, 2, sizeBytes);
  p.writeUInt16BE(transmissionFlags, 10);
  return p;
}

export function encodeInfoString(infoType: typeof INFO_NAME | typeof INFO_DESCRIPTION, value: string): Buffer {
  const s = utf8Capped(value);
  const p = Buffer.allocUnsafe(2 + s.length);
  p.writeUInt16BE(infoType, 0);
  s.copy(p, 2);
  return p;
}

export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const p = Buffer.allocUnsafe(14);
  p.writeUInt16BE(INFO_BLOCK_SIZE, 0);
  p.writeUInt32BE(minimum, 2);
  p.writeUInt32BE(preferred, 6);
  p.writeUInt32BE(maximum, 10);
  return p;
}

export function encodeMetaContext(contextId: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const p = Buffer.allocUnsafe(4 + n.length);
  p.writeUInt32BE(contextId, 0);
  n.copy(p, 4);
  return p;
}

/** The reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and the padding unless NO_ZEROES. */
export function encodeExportNameReply(sizeBytes: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(10 + (noZeroes ? 0 : exportNamePaddingBytes));
  writeU64(b, 0, sizeBytes);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

// ---- Transmission ----

export function encodeSimpleReply(errno: number, cookieHi: number, cookieLo: number): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_BYTES);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(errno, 4);
  b.writeUInt32BE(cookieHi, 8);
  b.writeUInt32BE(cookieLo, 12);
  return b;
}

function structuredHeader(b: Buffer, flags: number, type: number, cookieHi: number, cookieLo: number, length: number): void {
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(cookieHi, 8);
  b.writeUInt32BE(cookieLo, 12);
  b.writeUInt32BE(length, 16);
}

export function encodeNoneChunk(cookieHi: number, cookieLo: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES);
  structuredHeader(b, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookieHi, cookieLo, 0);
  return b;
}

/** Header and offset of an OFFSET_DATA chunk; the `dataBytes` of data follow as their own frame. */
export function encodeOffsetDataHeader(cookieHi: number, cookieLo: number, offset: number, dataBytes: number, done: boolean): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES + 8);
  structuredHeader(b, done ? REPLY_FLAG_DONE : 0, REPLY_TYPE_OFFSET_DATA, cookieHi, cookieLo, 8 + dataBytes);
  writeU64(b, STRUCTURED_REPLY_HEADER_BYTES, offset);
  return b;
}

export function encodeOffsetHoleChunk(cookieHi: number, cookieLo: number, offset: number, holeBytes: number, done: boolean): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES + 12);
  structuredHeader(b, done ? REPLY_FLAG_DONE : 0, REPLY_TYPE_OFFSET_HOLE, cookieHi, cookieLo, 12);
  writeU64(b, STRUCTURED_REPLY_HEADER_BYTES, offset);
  b.writeUInt32BE(holeBytes, STRUCTURED_REPLY_HEADER_BYTES + 8);
  return b;
}

/** An ERROR chunk, always the final chunk of its reply. */
export function encodeErrorChunk(cookieHi: number, cookieLo: number, errno: number, message: string): Buffer {
  const m = utf8Capped(message);
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES + 6 + m.length);
  structuredHeader(b, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookieHi, cookieLo, 6 + m.length);
  b.writeUInt32BE(errno, STRUCTURED_REPLY_HEADER_BYTES);
  b.writeUInt16BE(m.length, STRUCTURED_REPLY_HEADER_BYTES + 4);
  m.copy(b, STRUCTURED_REPLY_HEADER_BYTES + 6);
  return b;
}

/** A BLOCK_STATUS chunk from parallel arrays of descriptor lengths and flags. */
export function encodeBlockStatusChunk(
  cookieHi: number,
  cookieLo: number,
  contextId: number,
  lengths: readonly number[],
  flags: readonly number[],
  done: boolean,
): Buffer {
  const n = lengths.length;
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_BYTES + 4 + 8 * n);
  structuredHeader(b, done ? REPLY_FLAG_DONE : 0, REPLY_TYPE_BLOCK_STATUS, cookieHi, cookieLo, 4 + 8 * n);
  let at = STRUCTURED_REPLY_HEADER_BYTES;
  b.writeUInt32BE(contextId, at);
  at += 4;
  for (let i = 0; i < n; i++) {
    b.writeUInt32BE(lengths[i], at);
    b.writeUInt32BE(flags[i], at + 4);
    at += 8;
  }
  return b;
}
