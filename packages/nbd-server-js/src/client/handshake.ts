/**
 * The client side of the fixed newstyle handshake: greeting, client flags, then options one at a time
 * (STRUCTURED_REPLY, SET_META_CONTEXT, GO with a BLOCK_SIZE request, EXPORT_NAME when GO is
 * unsupported, LIST). The handshake is short and not a hot path, so it reads with awaited length-framed
 * reads and copies what it keeps.
 */
import type { Socket } from 'node:net';
import type { BlockSizes } from '@gannet/block-device';
import { defaultBlockSizes } from '@gannet/block-device';
import {
  buildClientFlags,
  buildGoOption,
  buildOption,
  buildSetMetaContext,
} from '../protocol/builders.js';
import {
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  INFO_BLOCK_SIZE,
  INFO_EXPORT,
  isOptionReplyError,
  NBDMAGIC,
  OPT_ABORT,
  OPT_EXPORT_NAME,
  OPT_GO,
  OPT_LIST,
  OPT_SET_META_CONTEXT,
  OPT_STARTTLS,
  OPT_STRUCTURED_REPLY,
  OPTION_REPLY_HEADER_BYTES,
  OPTION_REPLY_MAGIC,
  REP_ACK,
  REP_ERR_BLOCK_SIZE_REQD,
  REP_ERR_EXT_HEADER_REQD,
  REP_ERR_INVALID,
  REP_ERR_PLATFORM,
  REP_ERR_POLICY,
  REP_ERR_SHUTDOWN,
  REP_ERR_TLS_REQD,
  REP_ERR_TOO_BIG,
  REP_ERR_UNKNOWN,
  REP_ERR_UNSUP,
  REP_INFO,
  REP_META_CONTEXT,
  REP_SERVER,
} from '../protocol/constants.js';
import { ChunkCursor } from './chunks.js';

/** Option replies carry short strings (the spec caps them at 4 KiB); anything far larger is hostile. */
export const optionReplyBytesMax = 64 * 1024;
/** Replies to one option (REP_SERVER per export, REP_META_CONTEXT per context) before we give up. */
export const optionRepliesMax = 100_000;
const greetingBytes = 18;
const exportNameReplyBytes = 10;
const exportNamePaddingBytes = 124;

const replyNames: Readonly<Record<number, string>> = {
  [REP_ERR_UNSUP]: 'NBD_REP_ERR_UNSUP',
  [REP_ERR_POLICY]: 'NBD_REP_ERR_POLICY',
  [REP_ERR_INVALID]: 'NBD_REP_ERR_INVALID',
  [REP_ERR_PLATFORM]: 'NBD_REP_ERR_PLATFORM',
  [REP_ERR_TLS_REQD]: 'NBD_REP_ERR_TLS_REQD',
  [REP_ERR_UNKNOWN]: 'NBD_REP_ERR_UNKNOWN',
  [REP_ERR_SHUTDOWN]: 'NBD_REP_ERR_SHUTDOWN',
  [REP_ERR_BLOCK_SIZE_REQD]: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
  [REP_ERR_TOO_BIG]: 'NBD_REP_ERR_TOO_BIG',
  [REP_ERR_EXT_HEADER_REQD]: 'NBD_REP_ERR_EXT_HEADER_REQD',
};

/** The handshake failed: the server refused an option, closed, or broke the protocol. */
export class NbdHandshakeError extends Error {
  /** The option reply type that refused us (an NBD_REP_ERR_* value), when there was one. */
  readonly replyType?: number;
  constructor(message: string, replyType?: number, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'NbdHandshakeError';
    this.replyType = replyType;
  }
}

interface OptionReply {
  readonly type: number;
  readonly payload: Buffer;
}

/** Length-framed reads over a socket, for the handshake. */
export class HandshakeReader {
  readonly cursor = new ChunkCursor();
  private waiter: { bytes: number; resolve: () => void; reject: (err: Error) => void } | undefined;
  private ended: Error | undefined;
  private readonly onData = (chunk: Buffer) => {
    this.cursor.push(chunk);
    this.wake();
  };
  private readonly onEnd = () => this.fail(new NbdHandshakeError('server closed the connection during the handshake'));
  private readonly onError = (err: Error) => this.fail(new NbdHandshakeError(`connection error during the handshake: ${err.message}`, undefined, { cause: err }));

  constructor(private readonly socket: Socket) {
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
    socket.on('error', this.onError);
  }

  async read(bytes: number): Promise<Buffer> {
    if (this.cursor.available < bytes) {
      if (this.ended) throw this.ended;
      await new Promise<void>((resolve, reject) => {
        this.waiter = { bytes, resolve, reject };
      });
    }
    return Buffer.from(this.cursor.take(bytes));
  }

  write(b: Buffer): void {
    this.socket.write(b);
  }

  /** Stops listening; returns bytes that arrived past the handshake. */
  detach(): Buffer[] {
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
    this.socket.off('error', this.onError);
    return this.cursor.drain();
  }

  private wake(): void {
    const w = this.waiter;
    if (w && this.cursor.available >= w.bytes) {
      this.waiter = undefined;
      w.resolve();
    }
  }

  private fail(err: Error): void {
    this.ended ??= err;
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(this.ended);
  }
}

export interface Negotiated {
  readonly exportName: string;
  readonly size: number;
  readonly transmissionFlags: number;
  readonly structuredReplies: boolean;
  /** Negotiated meta contexts by name. */
  readonly metaContexts: ReadonlyMap<string, number>;
  readonly blockSizes: BlockSizes;
}

export interface HandshakeOptions {
  readonly exportName: string;
  readonly structuredReplies: boolean;
  readonly metaContexts: readonly string[];
  /**
   * Upgrades the connection to TLS right after the greeting, before any other option (so none can be
   * tampered with): sends STARTTLS, and once the server acknowledged it, hands over to the caller, who
   * wraps the socket and returns a reader on the TLS socket for the rest of the handshake.
   */
  readonly startTls?: (r: HandshakeReader) => Promise<HandshakeReader>;
}

/**
 * Sends NBD_OPT_STARTTLS and waits for its ACK. Any refusal fails the handshake: a client that asked
 * for TLS does not carry on in plaintext (a man in the middle could have forged the refusal).
 */
export async function requestStartTls(r: HandshakeReader): Promise<void> {
  r.write(buildOption(OPT_STARTTLS));
  const reply = await readOptionReply(r, OPT_STARTTLS);
  if (isOptionReplyError(reply.type)) throw refusal('NBD_OPT_STARTTLS', reply);
  if (reply.type !== REP_ACK) throw new NbdHandshakeError(`unexpected reply type ${reply.type} to NBD_OPT_STARTTLS`);
  if (r.cursor.available > 0) throw new NbdHandshakeError('the server sent plaintext after acknowledging STARTTLS');
}

/** Greeting and client flags; returns whether the server omits the EXPORT_NAME padding. */
async function greet(r: HandshakeReader): Promise<{ noZeroes: boolean }> {
  const g = await r.read(greetingBytes);
  if (g.readBigUInt64BE(0) !== NBDMAGIC) throw new NbdHandshakeError('not an NBD server (bad greeting magic)');
  if (g.readBigUInt64BE(8) !== IHAVEOPT) throw new NbdHandshakeError('oldstyle NBD servers are not supported');
  const flags = g.readUInt16BE(16);
  if ((flags & FLAG_FIXED_NEWSTYLE) === 0) throw new NbdHandshakeError('server does not speak fixed newstyle');
  const noZeroes = (flags & FLAG_NO_ZEROES) !== 0;
  r.write(buildClientFlags(FLAG_C_FIXED_NEWSTYLE | (noZeroes ? FLAG_C_NO_ZEROES : 0)));
  return { noZeroes };
}

async function readOptionReply(r: HandshakeReader, option: number): Promise<OptionReply> {
  const h = await r.read(OPTION_REPLY_HEADER_BYTES);
  if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new NbdHandshakeError('bad option reply magic');
  const echoed = h.readUInt32BE(8);
  if (echoed !== option) throw new NbdHandshakeError(`option reply for option ${echoed}, expected ${option}`);
  const type = h.readUInt32BE(12);
  const length = h.readUInt32BE(16);
  if (length > optionReplyBytesMax) throw new NbdHandshakeError(`option reply of ${length} bytes exceeds ${optionReplyBytesMax}`);
  return { type, payload: await r.read(length) };
}

function refusal(what: string, reply: OptionReply): NbdHandshakeError {
  const name = replyNames[reply.type] ?? `error reply 0x${reply.type.toString(16)}`;
  const detail = reply.payload.length > 0 ? `: ${reply.payload.toString('utf8')}` : '';
  return new NbdHandshakeError(`${what} refused with ${name}${detail}`, reply.type);
}

/** Reads the replies to one option up to its ACK, passing each non-ACK reply to `each`. */
async function collectReplies(r: HandshakeReader, option: number, what: string, each: (reply: OptionReply) => void): Promise<void> {
  for (let i = 0; i < optionRepliesMax; i++) {
    const reply = await readOptionReply(r, option);
    if (isOptionReplyError(reply.type)) throw refusal(what, reply);
    if (reply.type === REP_ACK) return;
    each(reply);
  }
  throw new NbdHandshakeError(`${what}: more than ${optionRepliesMax} replies`);
}

async function negotiateStructuredReplies(r: HandshakeReader): Promise<boolean> {
  r.write(buildOption(OPT_STRUCTURED_REPLY));
  const reply = await readOptionReply(r, OPT_STRUCTURED_REPLY);
  if (reply.type === REP_ACK) return true;
  if (isOptionReplyError(reply.type)) return false;
  throw new NbdHandshakeError(`unexpected reply type ${reply.type} to NBD_OPT_STRUCTURED_REPLY`);
}

async function negotiateMetaContexts(r: HandshakeReader, exportName: string, queries: readonly string[]): Promise<Map<string, number>> {
  const contexts = new Map<string, number>();
  r.write(buildSetMetaContext(exportName, queries));
  for (let i = 0; i < optionRepliesMax; i++) {
    const reply = await readOptionReply(r, OPT_SET_META_CONTEXT);
    // A refusal only means no contexts: the export may still be usable without block status.
    if (isOptionReplyError(reply.type)) return new Map();
    if (reply.type === REP_ACK) return contexts;
    if (reply.type !== REP_META_CONTEXT || reply.payload.length < 4) {
      throw new NbdHandshakeError(`unexpected reply type ${reply.type} to NBD_OPT_SET_META_CONTEXT`);
    }
    contexts.set(reply.payload.toString('utf8', 4), reply.payload.readUInt32BE(0));
  }
  throw new NbdHandshakeError(`NBD_OPT_SET_META_CONTEXT: more than ${optionRepliesMax} replies`);
}

function readSize(b: Buffer, at: number): number {
  const size = b.readBigUInt64BE(at);
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new NbdHandshakeError(`export size ${size} exceeds 2^53`);
  return Number(size);
}

export async function clientHandshake(reader: HandshakeReader, options: HandshakeOptions): Promise<Negotiated> {
  const { noZeroes } = await greet(reader);
  const r = options.startTls === undefined ? reader : await options.startTls(reader);
  const structuredReplies = options.structuredReplies && (await negotiateStructuredReplies(r));
  const metaContexts = structuredReplies && options.metaContexts.length > 0
    ? await negotiateMetaContexts(r, options.exportName, options.metaContexts)
    : new Map<string, number>();

  r.write(buildGoOption(options.exportName, [INFO_BLOCK_SIZE]));
  let size: number | undefined;
  let transmissionFlags = 0;
  let blockSizes: BlockSizes = defaultBlockSizes;
  const what = `NBD_OPT_GO for export ${JSON.stringify(options.exportName)}`;
  for (let i = 0; ; i++) {
    if (i >= optionRepliesMax) throw new NbdHandshakeError(`${what}: more than ${optionRepliesMax} replies`);
    const reply = await readOptionReply(r, OPT_GO);
    if (reply.type === REP_ERR_UNSUP) {
      return { ...(await exportNameFallback(r, options.exportName, noZeroes)), structuredReplies, metaContexts };
    }
    if (isOptionReplyError(reply.type)) throw refusal(what, reply);
    if (reply.type === REP_ACK) break;
    if (reply.type !== REP_INFO) throw new NbdHandshakeError(`${what}: unexpected reply type ${reply.type}`);
    const p = reply.payload;
    if (p.length < 2) throw new NbdHandshakeError(`${what}: NBD_REP_INFO of ${p.length} bytes`);
    const info = p.readUInt16BE(0);
    if (info === INFO_EXPORT) {
      if (p.length !== 12) throw new NbdHandshakeError(`${what}: NBD_INFO_EXPORT of ${p.length} bytes`);
      size = readSize(p, 2);
      transmissionFlags = p.readUInt16BE(10);
    } else if (info === INFO_BLOCK_SIZE) {
      if (p.length !== 14) throw new NbdHandshakeError(`${what}: NBD_INFO_BLOCK_SIZE of ${p.length} bytes`);
      blockSizes = { minimum: p.readUInt32BE(2), preferred: p.readUInt32BE(6), maximum: p.readUInt32BE(10) };
    }
  }
  if (size === undefined) throw new NbdHandshakeError(`${what}: ACK without NBD_INFO_EXPORT`);
  return { exportName: options.exportName, size, transmissionFlags, structuredReplies, metaContexts, blockSizes };
}

/** Old servers: EXPORT_NAME cannot fail politely, the server just closes on an unknown export. */
async function exportNameFallback(r: HandshakeReader, exportName: string, noZeroes: boolean) {
  r.write(buildOption(OPT_EXPORT_NAME, Buffer.from(exportName, 'utf8')));
  let b: Buffer;
  try {
    b = await r.read(exportNameReplyBytes + (noZeroes ? 0 : exportNamePaddingBytes));
  } catch (err) {
    throw new NbdHandshakeError(`NBD_OPT_EXPORT_NAME ${JSON.stringify(exportName)}: server closed the connection (unknown export?)`, undefined, { cause: err });
  }
  return { exportName, size: readSize(b, 0), transmissionFlags: b.readUInt16BE(8), blockSizes: defaultBlockSizes };
}

export interface ExportListing {
  readonly name: string;
  readonly description: string;
}

export async function listExports(reader: HandshakeReader, startTls?: (r: HandshakeReader) => Promise<HandshakeReader>): Promise<ExportListing[]> {
  await greet(reader);
  const r = startTls === undefined ? reader : await startTls(reader);
  r.write(buildOption(OPT_LIST));
  const exports: ExportListing[] = [];
  await collectReplies(r, OPT_LIST, 'NBD_OPT_LIST', (reply) => {
    const p = reply.payload;
    if (reply.type !== REP_SERVER || p.length < 4 || 4 + p.readUInt32BE(0) > p.length) {
      throw new NbdHandshakeError(`NBD_OPT_LIST: malformed reply type ${reply.type}`);
    }
    const nameBytes = p.readUInt32BE(0);
    exports.push({ name: p.toString('utf8', 4, 4 + nameBytes), description: p.toString('utf8', 4 + nameBytes) });
  });
  r.write(buildOption(OPT_ABORT));
  try {
    await readOptionReply(r, OPT_ABORT);
  } catch {
    // The spec lets a server close instead of acknowledging ABORT; the listing is complete either way.
  }
  return exports;
}
