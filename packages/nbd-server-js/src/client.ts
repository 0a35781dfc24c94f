/**
 * An NBD client that is itself a BlockDevice, so the conformance suite can run against any served
 * device through the wire. Requests are pipelined (each carries a cookie; replies complete them in any
 * order), writes issued in one tick go out in one corked batch, and READ data is streamed by the
 * ReplyParser straight into the caller's buffer.
 *
 * With `strict` (the default) the client checks ranges and capabilities before sending, like libnbd,
 * and splits reads and writes larger than the server's maximum payload. `strict: false` sends requests
 * exactly as asked, so tests can probe how a server handles out-of-range or unsupported requests.
 */
import net from 'node:net';
import tls from 'node:tls';
import type { BlockDevice, BlockErrorCode, BlockSizes, Capabilities, Extent, WriteOptions, WriteRun, ZeroOptions } from '@gannet/block-device';
import { BlockDeviceError, checkRange, settleAll, zeroChunkBytes, zeroes, KiB, MiB } from '@gannet/block-device';
import type { ExportListing, Negotiated } from './client/handshake.js';
import { clientHandshake, HandshakeReader, listExports, NbdHandshakeError, requestStartTls } from './client/handshake.js';
import type { PendingReply } from './client/reply-parser.js';
import { NbdProtocolError, ReplyParser } from './client/reply-parser.js';
import { BASE_ALLOCATION, CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, REQUEST_HEADER_BYTES, REQUEST_MAGIC, TFLAG_CAN_MULTI_CONN, TFLAG_READ_ONLY, TFLAG_SEND_CACHE, TFLAG_SEND_DF, TFLAG_SEND_FAST_ZERO, TFLAG_SEND_FLUSH, TFLAG_SEND_FUA, TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES } from './protocol/constants.js';
import { errnoToCode } from './protocol/errno.js';
import { pskCiphers, tlsMinVersion, type TlsClientCredentials } from './tls.js';

export { NbdHandshakeError } from './client/handshake.js';
export type { ExportListing } from './client/handshake.js';
export { NbdProtocolError, ReplyParser } from './client/reply-parser.js';
export type { PendingReply, ReplyParserOptions } from './client/reply-parser.js';
export { ChunkCursor } from './client/chunks.js';
export { errnoToCode, wireErrnoByCode } from './protocol/errno.js';

export type NbdAddress = { host: string; port: number } | { path: string };

export interface NbdClientOptions {
  /** Export to attach; '' selects the server's default. */
  readonly exportName?: string;
  /** Negotiate structured replies (needed for block status and DF). Default true. */
  readonly structuredReplies?: boolean;
  /** Meta contexts to request when structured replies are on. Default ['base:allocation']. */
  readonly metaContexts?: string[];
  /** Check ranges and capabilities client-side and split oversized payloads. Default true. */
  readonly strict?: boolean;
  /**
   * Use TLS (STARTTLS as the first option) with these credentials; a server that refuses it, or a
   * handshake that fails (an unknown CA, a wrong key), fails the connection. Without it, plaintext.
   */
  readonly tls?: TlsClientCredentials;
  /** Abandons the connection while it is being made (connect, TLS, handshake): `connect` rejects, nothing is left open. */
  readonly signal?: AbortSignal;
}

/**
 * Largest length field we put in one TRIM, WRITE_ZEROES, CACHE or BLOCK_STATUS request: the wire field
 * is 32 bits, and 2 GiB keeps every split aligned to any legal minimum block size.
 */
export const rangeRequestBytesMax = 2 ** 31;
/** Block status chunks hold 8 bytes per extent; this bounds what one reply may make us buffer. */
const chunkPayloadBytesMax = 4 * MiB + 64 * KiB;
const cookieMax = Number.MAX_SAFE_INTEGER;


/** A request the server answered with an error; `errno` is the value from the wire. */
export class NbdRequestError extends BlockDeviceError {
  readonly errno: number;
  constructor(errno: number, message: string) {
    super(errnoToCode(errno), message);
    this.name = 'NbdRequestError';
    this.errno = errno;
  }
}

interface Pending extends PendingReply {
  resolve(reply: PendingReply): void;
  reject(err: Error): void;
}

type ClientState = 'open' | 'closing' | 'closed';

const commandLabels: Readonly<Record<number, string>> = {
  [CMD_READ]: 'READ',
  [CMD_WRITE]: 'WRITE',
  [CMD_FLUSH]: 'FLUSH',
  [CMD_TRIM]: 'TRIM',
  [CMD_CACHE]: 'CACHE',
  [CMD_WRITE_ZEROES]: 'WRITE_ZEROES',
  [CMD_BLOCK_STATUS]: 'BLOCK_STATUS',
};

function connectSocket(address: NbdAddress, signal?: AbortSignal): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = 'path' in address ? net.connect({ path: address.path }) : net.connect({ host: address.host, port: address.port });
    const onError = (err: Error) => {
      signal?.removeEventListener('abort', onAbort);
      socket.destroy();
      reject(err);
    };
    const onAbort = () => onError(signal!.reason as Error);
    signal?.addEventListener('abort', onAbort, { once: true });
    socket.once('error', onError);
    socket.once('connect', () => {
      signal?.removeEventListener('abort', onAbort);
      socket.off('error', onError);
      socket.setNoDelay(true);
      resolve(socket);
    });
  });
}

function describe(address: NbdAddress): string {
  return 'path' in address ? address.path : `${address.host}:${address.port}`;
}

/** Wraps the connected socket in TLS after the server acknowledged STARTTLS. */
function secureSocket(plain: net.Socket, credentials: TlsClientCredentials, address: NbdAddress): Promise<tls.TLSSocket> {
  const { x509, psk } = credentials;
  if ((x509 === undefined) === (psk === undefined)) throw new Error('TLS client credentials: give either x509 or psk');
  const options: tls.ConnectionOptions = {
    socket: plain,
    minVersion: tlsMinVersion,
    // The name the server certificate must carry: the address connected to, unless told otherwise.
    ...('host' in address && { host: address.host }),
    ...(x509 !== undefined && {
      ca: x509.ca,
      ...(x509.cert !== undefined && { cert: x509.cert, key: x509.key }),
      ...(x509.servername !== undefined && { servername: x509.servername }),
    }),
    ...(psk !== undefined && {
      ciphers: pskCiphers,
      pskCallback: () => ({ psk: psk.key, identity: psk.identity }),
      // A PSK handshake has no certificate: knowing the key is what proves the server.
      checkServerIdentity: () => undefined,
    }),
  };
  return new Promise((resolve, reject) => {
    const secure = tls.connect(options);
    const onError = (err: Error) => {
      secure.destroy();
      reject(new NbdHandshakeError(`TLS handshake failed: ${err.message}`, undefined, { cause: err }));
    };
    secure.once('error', onError);
    secure.once('secureConnect', () => {
      secure.off('error', onError);
      secure.setNoDelay(true);
      resolve(secure);
    });
  });
}

/** The socket a handshake runs on, and the reader over it: both change when STARTTLS succeeds. */
class Link {
  reader: HandshakeReader;

  constructor(
    public socket: net.Socket,
    private readonly address: NbdAddress,
    private readonly credentials: TlsClientCredentials | undefined,
  ) {
    this.reader = new HandshakeReader(socket);
  }

  async startTls(r: HandshakeReader): Promise<HandshakeReader> {
    await requestStartTls(r);
    r.detach();
    this.socket = await secureSocket(this.socket, this.credentials!, this.address);
    this.reader = new HandshakeReader(this.socket);
    return this.reader;
  }

  destroy(): void {
    this.reader.detach();
    this.socket.destroy();
  }
}

export class NbdClient implements BlockDevice {
  readonly size: number;
  readonly exportName: string;
  readonly transmissionFlags: number;
  readonly structuredReplies: boolean;
  readonly blockSizes: BlockSizes;
  readonly capabilities: Capabilities;
  /** Whether client-side checks and payload splitting are on. */
  readonly strict: boolean;

  private readonly socket: net.Socket;
  private readonly parser: ReplyParser;
  private readonly pending = new Map<number, Pending>();
  private readonly metaContextId: number | undefined;
  private nextCookie = 1;
  private corked = false;
  private state: ClientState = 'open';
  private failure: Error | undefined;
  private drained: (() => void) | undefined;
  private readonly closed: Promise<void>;

  /** Connects, negotiates and attaches an export; rejects with NbdHandshakeError if the server refuses. */
  static async connect(address: NbdAddress, options: NbdClientOptions = {}): Promise<NbdClient> {
    const { signal } = options;
    signal?.throwIfAborted();
    const link = new Link(await connectSocket(address, signal), address, options.tls);
    // Destroyed, not detached: the reader (or the TLS handshake) waiting on the socket then fails.
    const abandon = () => link.socket.destroy();
    signal?.addEventListener('abort', abandon, { once: true });
    try {
      const negotiated = await clientHandshake(link.reader, {
        exportName: options.exportName ?? '',
        structuredReplies: options.structuredReplies ?? true,
        metaContexts: options.metaContexts ?? [BASE_ALLOCATION],
        ...(options.tls !== undefined && { startTls: (r) => link.startTls(r) }),
      });
      signal?.throwIfAborted();
      return new NbdClient(link.socket, negotiated, link.reader.detach(), options.strict ?? true);
    } catch (err) {
      link.destroy();
      if (signal?.aborted) throw signal.reason;
      if (err instanceof NbdHandshakeError) {
        err.message = `NBD handshake with ${describe(address)} failed: ${err.message}`;
      }
      throw err;
    } finally {
      signal?.removeEventListener('abort', abandon);
    }
  }

  /** The server's exports, via NBD_OPT_LIST (over TLS with `options.tls`). */
  static async list(address: NbdAddress, options: { tls?: TlsClientCredentials } = {}): Promise<ExportListing[]> {
    const link = new Link(await connectSocket(address), address, options.tls);
    try {
      return await listExports(link.reader, options.tls !== undefined ? (r) => link.startTls(r) : undefined);
    } finally {
      link.destroy();
    }
  }

  private constructor(socket: net.Socket, n: Negotiated, leftover: Buffer[], strict: boolean) {
    this.socket = socket;
    this.strict = strict;
    this.size = n.size;
    this.exportName = n.exportName;
    this.transmissionFlags = n.transmissionFlags;
    this.structuredReplies = n.structuredReplies;
    this.blockSizes = Object.freeze({ ...n.blockSizes });
    this.metaContextId = n.metaContexts.get(BASE_ALLOCATION);
    const f = n.transmissionFlags;
    this.capabilities = Object.freeze({
      readOnly: (f & TFLAG_READ_ONLY) !== 0,
      flush: (f & TFLAG_SEND_FLUSH) !== 0,
      fua: (f & TFLAG_SEND_FUA) !== 0,
      trim: (f & TFLAG_SEND_TRIM) !== 0,
      zero: (f & TFLAG_SEND_WRITE_ZEROES) !== 0,
      fastZero: (f & TFLAG_SEND_FAST_ZERO) !== 0,
      cache: (f & TFLAG_SEND_CACHE) !== 0,
      multiConn: (f & TFLAG_CAN_MULTI_CONN) !== 0,
      extents: this.metaContextId !== undefined,
    });
    this.parser = new ReplyParser({
      lookup: (cookie) => this.pending.get(cookie),
      complete: (reply) => this.complete(reply as Pending),
      structuredReplies: n.structuredReplies,
      metaContextId: this.metaContextId,
      chunkPayloadBytesMax,
    });
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.fail(new BlockDeviceError('EIO', `NBD connection error: ${err.message}`, { cause: err })));
    socket.on('close', () => this.fail(new BlockDeviceError(this.state === 'open' ? 'EIO' : 'ESHUTDOWN', 'NBD connection closed')));
    for (const chunk of leftover) this.onData(chunk);
  }

  /** Requests sent and not yet answered. */
  get inflightCount(): number {
    return this.pending.size;
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    if (this.strict) {
      checkRange(this.size, offset, buf.length, 'read');
      if (buf.length === 0) return;
    }
    await this.eachPiece(offset, buf.length, this.blockSizes.maximum, (o, n) =>
      this.request(CMD_READ, 0, o, n, undefined, buf.subarray(o - offset, o - offset + n)),
    );
  }

  /** Reads into a new buffer; `df` asks the server not to fragment the reply (one request, no split). */
  async readBytes(offset: number, length: number, options: { df?: boolean } = {}): Promise<Buffer> {
    const buf = Buffer.alloc(length);
    if (!options.df) {
      await this.read(buf, offset);
      return buf;
    }
    if (this.strict) {
      checkRange(this.size, offset, length, 'read');
      this.require((this.transmissionFlags & TFLAG_SEND_DF) !== 0 && this.structuredReplies, 'ENOTSUP', 'server does not support DF');
    }
    await this.request(CMD_READ, CMD_FLAG_DF, offset, length, undefined, buf);
    return buf;
  }

  async write(data: Uint8Array, offset: number, options: WriteOptions = {}): Promise<void> {
    const fua = this.fuaFlag(options.fua);
    if (this.strict) {
      checkRange(this.size, offset, data.length, 'write');
      this.requireWritable();
      if (data.length === 0) return;
    }
    await this.eachPiece(offset, data.length, this.blockSizes.maximum, (o, n) =>
      this.request(CMD_WRITE, fua, o, n, data.subarray(o - offset, o - offset + n)),
    );
    await this.emulatedFua(options.fua);
  }

  /** Pieces are sent as pipelined WRITEs, back to back from `offset`. */
  async writev(buffers: readonly Uint8Array[], offset: number, options: WriteOptions = {}): Promise<void> {
    let length = 0;
    for (const b of buffers) length += b.length;
    if (this.strict) {
      checkRange(this.size, offset, length, 'write');
      this.requireWritable();
    }
    const writes: Promise<void>[] = [];
    let at = offset;
    for (const b of buffers) {
      if (b.length > 0) writes.push(this.write(b, at, options));
      at += b.length;
    }
    await settleAll(writes);
  }

  /** Runs are sent as pipelined WRITEs; strict, every run is checked before any is sent. */
  async writeBatch(runs: readonly WriteRun[]): Promise<void> {
    if (this.strict) {
      for (const run of runs) checkRange(this.size, run.offset, run.buffers.reduce((n, b) => n + b.length, 0), 'write');
      this.requireWritable();
    }
    await settleAll(runs.map((run) => this.writev(run.buffers, run.offset)));
  }

  /** Strict: without the server's FLUSH there is no volatile cache to empty, and nothing is sent. */
  async flush(): Promise<void> {
    if (this.strict && !this.capabilities.flush) return;
    await this.request(CMD_FLUSH, 0, 0, 0);
  }

  async trim(offset: number, length: number, options: WriteOptions = {}): Promise<void> {
    const fua = this.fuaFlag(options.fua);
    if (this.strict) {
      checkRange(this.size, offset, length, 'trim');
      this.requireWritable();
      // Trim is advisory: without the server's TRIM it does nothing.
      if (length === 0 || !this.capabilities.trim) return;
    }
    await this.eachPiece(offset, length, rangeRequestBytesMax, (o, n) => this.request(CMD_TRIM, fua, o, n));
    await this.emulatedFua(options.fua);
  }

  async writeZeroes(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    if (this.strict) {
      checkRange(this.size, offset, length, 'zero');
      this.requireWritable();
      if (options.fastZero) this.require(this.capabilities.fastZero, 'ENOTSUP', 'server does not support FAST_ZERO');
      if (length === 0) return;
      if (!this.capabilities.zero) {
        await this.writeZeroBuffers(offset, length);
        await this.emulatedFua(options.fua);
        return;
      }
    }
    const flags = this.fuaFlag(options.fua) | (options.noHole ? CMD_FLAG_NO_HOLE : 0) | (options.fastZero ? CMD_FLAG_FAST_ZERO : 0);
    await this.eachPiece(offset, length, rangeRequestBytesMax, (o, n) => this.request(CMD_WRITE_ZEROES, flags, o, n));
    await this.emulatedFua(options.fua);
  }

  async cache(offset: number, length: number): Promise<void> {
    if (this.strict) {
      checkRange(this.size, offset, length, 'cache');
      // Cache is advisory: without the server's CACHE it does nothing.
      if (length === 0 || !this.capabilities.cache) return;
    }
    await this.eachPiece(offset, length, rangeRequestBytesMax, (o, n) => this.request(CMD_CACHE, 0, o, n));
  }

  /**
   * base:allocation extents of [offset, offset + length), clamped to the range. Without the context
   * (no structured replies, or the server lacks it) a strict client reports everything as data.
   */
  async extents(offset: number, length: number, options: { reqOne?: boolean } = {}): Promise<Extent[]> {
    if (this.strict) {
      checkRange(this.size, offset, length, 'extents');
      if (length === 0) return [];
      if (this.metaContextId === undefined) return [{ length, flags: 0 }];
    }
    const requested = this.strict ? Math.min(length, rangeRequestBytesMax) : length;
    const reply = await this.request(CMD_BLOCK_STATUS, options.reqOne ? CMD_FLAG_REQ_ONE : 0, offset, requested);
    const out: Extent[] = [];
    let covered = 0;
    for (const e of reply.extents ?? []) {
      if (covered >= requested) break;
      const n = Math.min(e.length, requested - covered);
      out.push({ length: n, flags: e.flags });
      covered += n;
    }
    return out;
  }

  /** Waits for in-flight requests, sends NBD_CMD_DISC, and ends the connection. */
  async close(): Promise<void> {
    if (this.state === 'open') {
      this.state = 'closing';
      if (this.pending.size > 0) await new Promise<void>((resolve) => (this.drained = resolve));
      if (!this.failure && !this.socket.destroyed) {
        this.sendHeader(CMD_DISC, 0, 0, 0, 0);
        this.socket.end();
      }
    }
    await this.closed;
  }

  /** Drops the connection at once; in-flight requests reject with ESHUTDOWN. */
  destroy(): void {
    if (this.state === 'open') this.state = 'closing';
    this.fail(new BlockDeviceError('ESHUTDOWN', 'NBD client destroyed'));
  }

  private onData(chunk: Buffer): void {
    try {
      this.parser.push(chunk);
    } catch (err) {
      if (!(err instanceof NbdProtocolError)) throw err;
      this.fail(new BlockDeviceError('EIO', `NBD protocol error from server: ${err.message}`, { cause: err }));
    }
  }

  private request(type: number, flags: number, offset: number, length: number, payload?: Uint8Array, buf?: Uint8Array): Promise<PendingReply> {
    if (this.state !== 'open') {
      return Promise.reject(this.failure ?? new BlockDeviceError('ESHUTDOWN', 'NBD client is closing'));
    }
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isInteger(length) || length < 0 || length > 0xffffffff) {
      return Promise.reject(new BlockDeviceError('EINVAL', `cannot encode offset=${offset} length=${length}`));
    }
    const cookie = this.nextCookie;
    this.nextCookie = cookie === cookieMax ? 1 : cookie + 1;
    if (this.pending.has(cookie)) throw new Error(`cookie ${cookie} still in flight after wrapping`);
    return new Promise<PendingReply>((resolve, reject) => {
      this.pending.set(cookie, { cookie, type, offset, length, buf, errno: 0, message: '', bytesSeen: 0, resolve, reject });
      this.sendHeader(type, flags, cookie, offset, length);
      if (payload) this.socket.write(payload);
    });
  }

  /** Writes a request header into the current corked batch, which is flushed at the end of the tick. */
  private sendHeader(type: number, flags: number, cookie: number, offset: number, length: number): void {
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(() => {
        this.corked = false;
        this.socket.uncork();
      });
    }
    const h = Buffer.allocUnsafe(REQUEST_HEADER_BYTES);
    h.writeUInt32BE(REQUEST_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeUInt32BE(Math.floor(cookie / 2 ** 32), 8);
    h.writeUInt32BE(cookie >>> 0, 12);
    h.writeUInt32BE(Math.floor(offset / 2 ** 32), 16);
    h.writeUInt32BE(offset >>> 0, 20);
    h.writeUInt32BE(length, 24);
    this.socket.write(h);
  }

  private complete(reply: Pending): void {
    this.pending.delete(reply.cookie);
    if (reply.errno !== 0) {
      const label = commandLabels[reply.type] ?? `command ${reply.type}`;
      const detail = reply.message ? `: ${reply.message}` : '';
      reply.reject(new NbdRequestError(reply.errno, `${label} ${reply.offset}+${reply.length} failed with ${errnoToCode(reply.errno)} (${reply.errno})${detail}`));
    } else {
      reply.resolve(reply);
    }
    if (this.pending.size === 0) this.wakeDrained();
  }

  /** Rejects every request in flight and tears the socket down; the first cause wins. */
  private fail(err: Error): void {
    this.failure ??= err;
    this.state = 'closed';
    const inflight = [...this.pending.values()];
    this.pending.clear();
    for (const p of inflight) p.reject(this.failure);
    this.wakeDrained();
    if (!this.socket.destroyed) this.socket.destroy();
  }

  private wakeDrained(): void {
    const d = this.drained;
    this.drained = undefined;
    d?.();
  }

  private async eachPiece(offset: number, length: number, pieceMax: number, send: (offset: number, length: number) => Promise<unknown>): Promise<void> {
    if (!this.strict || length <= pieceMax) {
      await send(offset, length);
      return;
    }
    const sends: Promise<unknown>[] = [];
    for (let o = offset; o < offset + length; o += pieceMax) sends.push(send(o, Math.min(pieceMax, offset + length - o)));
    await Promise.all(sends);
  }

  private fuaFlag(fua: boolean | undefined): number {
    return fua && (this.capabilities.fua || !this.strict) ? CMD_FLAG_FUA : 0;
  }

  /** FUA on a server without SEND_FUA: a FLUSH after the write gives the same guarantee. */
  private async emulatedFua(fua: boolean | undefined): Promise<void> {
    if (fua && this.strict && !this.capabilities.fua && this.capabilities.flush) await this.flush();
  }

  private async writeZeroBuffers(offset: number, length: number): Promise<void> {
    const pieceMax = Math.min(zeroChunkBytes, this.blockSizes.maximum);
    await this.eachPiece(offset, length, pieceMax, (o, n) => this.request(CMD_WRITE, 0, o, n, zeroes(n)));
  }

  /** A closed client answers ESHUTDOWN before anything else, as every device does. */
  private requireWritable(): void {
    if (this.state !== 'open') throw this.failure ?? new BlockDeviceError('ESHUTDOWN', 'NBD client is closed');
    this.require(!this.capabilities.readOnly, 'EPERM', 'export is read-only');
  }

  private require(condition: boolean, code: BlockErrorCode, message: string): void {
    if (!condition) throw new BlockDeviceError(code, message);
  }
}
