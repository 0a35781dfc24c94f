/**
 * One client connection: the few lines that tie a socket to the parser, the handshake and the
 * transmission state machines. It owns the socket's lifecycle: backpressure (pause reading while too
 * many bytes are in flight or queued for the client, or while the server's memory budget has no room
 * for the next request), batched writes (cork until the end of the tick), STARTTLS (the socket is
 * wrapped in TLS and negotiation starts over), DISC (drain, then close), graceful shutdown, and quiet
 * handling of clients that vanish. It also chooses where each read lands (receive.ts): straight into a
 * large WRITE payload, else a read chunk reused while nothing unparsed points into it.
 *
 * The server's watchdog asks `watch()` regularly whether the connection must be dropped: a handshake
 * that takes too long, or budget memory held by a client that does not move it (a WRITE payload that
 * does not arrive, READ replies it does not read).
 */
import type { Socket } from 'node:net';
import tls from 'node:tls';
import { CMD_DISC } from '../protocol/constants.js';
import type { ServerTlsSetup } from '../tls.js';
import { Handshake, type ExportEntry, type ExportRegistry, type HandshakeStep } from './handshake.js';
import { BudgetedPayloads, type MemoryBudget } from './memory-budget.js';
import { ClientStreamParser, type Request } from './parser.js';
import type { PayloadPool } from './payload-pool.js';
import { adoptWithReceiver } from './receive.js';
import { encodeGreeting } from './replies.js';
import { Transmission, type RequestEvent } from './transmission.js';

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
export type Logger = (level: LogLevel, msg: string, fields?: Record<string, unknown>) => void;

export interface ConnectionContext {
  readonly exports: ExportRegistry;
  readonly requestBytesMax: number;
  readonly writeSkipBytesMax: number;
  readonly optionBytesMax: number;
  readonly inflightBytesMax: number;
  readonly payloadPool: PayloadPool;
  /** Shared by every connection of the server: payloads being received and replies not yet sent. */
  readonly memoryBudget: MemoryBudget;
  /** The TLS mode, and what STARTTLS upgrades with (null when the mode is 'off'). */
  readonly tls: { readonly mode: 'off' | 'on' | 'require'; readonly setup: ServerTlsSetup | null };
  readonly logger: Logger;
  isShuttingDown(): boolean;
  wantsEvents(): boolean;
  event(ev: RequestEvent): void;
  /** The server's `betweenBatches` option: called after each read's requests are dispatched. */
  betweenBatches(): void;
  /** Whether another connection may enter transmission on `entry` (the per-export cap). */
  exportFull(entry: ExportEntry): boolean;
  /** The connection entered transmission on `entry`; `left` follows once it closed. */
  joined(entry: ExportEntry): void;
  left(entry: ExportEntry): void;
}

/** Why the server's watchdog dropped a connection. */
export type DropReason = 'handshake-timeout' | 'stalled';

export interface WatchLimits {
  readonly handshakeTimeoutMs: number;
  readonly stallTimeoutMs: number;
  /** Payload bytes a client must deliver per `stallTimeoutMs` while it holds budget for a WRITE. */
  readonly stallBytesMin: number;
}

/** Errors that only mean the client went away. */
const quietErrors = new Set(['EPIPE', 'ECONNRESET', 'ECONNABORTED', 'ERR_STREAM_DESTROYED', 'ERR_STREAM_WRITE_AFTER_END']);

/** How long a closed connection waits for the client to close its side before dropping it. */
export const lingerMs = 5000;
/** Reads land in a buffer of this size unless a WRITE payload is being received directly. */
export const receiveChunkBytes = 64 * 1024;
/**
 * Reads during negotiation land in a buffer of this size: options are small, and a connection that
 * never gets past the handshake (thousands of idle sockets, up to the connection cap) then holds
 * 4 KiB rather than 64.
 */
export const handshakeChunkBytes = 4 * 1024;
/** A WRITE payload with at least this much still to come is read straight into place. */
export const directReceiveBytesMin = 64 * 1024;
/** Unparsed bytes left after a read up to this size are copied out so the read buffer can be reused. */
const compactBytesMax = 4096;
/**
 * A new read chunk is taken only when the current one has less room than this (a quarter of the chunk
 * at most). Reads fill a chunk end to end, so unparsed bytes (a long option sent a byte at a time, say)
 * hold at most a third more memory than their own size, never a chunk per read.
 */
const receiveRoomBytesMin = 16 * 1024;

type State = 'handshake' | 'tls' | 'transmission' | 'draining' | 'closed';

/**
 * How a connection receives: 'direct' reads large WRITE payloads straight into place; 'stream' is
 * Node's default 'data' events, used when this Node's socket internals are not the expected ones, and
 * after STARTTLS (TLS records are decrypted into buffers of their own).
 */
export type ReceiveMode = 'direct' | 'stream';

/**
 * OpenSSL's verdict on a client's certificate, null when it verified. Node lets the handshake finish
 * whatever the verdict and records it; `authorized` is filled in only on sockets a tls.Server accepted,
 * from the handle's `verifyError()`, which is read here the same way for a socket wrapped after
 * STARTTLS. A Node without that method refuses every certificate rather than accept an unchecked one.
 */
function clientCertificateError(secure: tls.TLSSocket): string | null {
  const handle = (secure as unknown as { _handle?: { verifyError?: () => (Error & { code?: string }) | null } })._handle;
  if (typeof handle?.verifyError !== 'function') return 'this Node offers no way to check client certificates';
  const peer = secure.getPeerCertificate();
  if (peer === null || Object.keys(peer).length === 0) return 'no client certificate';
  const error = handle.verifyError();
  return error === null || error === undefined ? null : (error.code ?? error.message);
}

export class Connection {
  readonly remote: string;
  readonly receiveMode: ReceiveMode;
  /** Bytes read straight into WRITE payloads, without a copy. */
  directBytes = 0;
  readonly closed: Promise<void>;
  private resolveClosed!: () => void;
  private state: State = 'handshake';
  private readonly parser: ClientStreamParser;
  private readonly handshake: Handshake;
  private readonly payloads: BudgetedPayloads;
  private transmission: Transmission | null = null;
  private exportEntry: ExportEntry | null = null;
  private corked = false;
  private paused = false;
  private pumping = false;
  private shuttingDown = false;
  private socket: Socket;
  /** The plain socket, and the TLS socket on top of it once STARTTLS succeeded. */
  private readonly sockets: Socket[] = [];
  private finished = false;
  private tlsActive = false;
  private receiveChunk: Buffer | null = null;
  /** Bytes at the start of `receiveChunk` that unparsed bytes may still point into. */
  private receiveUsed = 0;
  private receivingDirect = false;
  /** Waiting for the memory budget (for a WRITE payload or `heldRequest`'s READ buffer). */
  private memoryWait = false;
  /** A READ whose buffer did not fit the budget; it starts once room is granted. */
  private heldRequest: Request | null = null;
  private readonly acceptedMs = Date.now();
  /** Progress counters the watchdog compares between two looks. */
  private bytesReceived = 0;
  private requestsReceived = 0;
  private lentRepliesSent = 0;
  /** Budget bytes of READ replies handed to the socket and not yet written. */
  private unsentLentBytes = 0;
  private window = { startMs: this.acceptedMs, bytesReceived: 0, requestsReceived: 0, lentRepliesSent: 0 };

  /** `raw` must be paused (accepted with `pauseOnConnect`); the connection starts reading it. */
  constructor(
    raw: Socket,
    private readonly ctx: ConnectionContext,
  ) {
    this.payloads = new BudgetedPayloads(ctx.payloadPool, ctx.memoryBudget);
    this.parser = new ClientStreamParser({
      optionBytesMax: ctx.optionBytesMax,
      requestBytesMax: ctx.requestBytesMax,
      writeSkipBytesMax: ctx.writeSkipBytesMax,
    }, this.payloads);
    this.handshake = new Handshake({
      exports: ctx.exports,
      requestBytesMax: ctx.requestBytesMax,
      isShuttingDown: () => ctx.isShuttingDown(),
      tls: ctx.tls.mode,
      exportFull: (entry) => ctx.exportFull(entry),
    });
    this.closed = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
    const adopted = adoptWithReceiver(raw, {
      buffer: () => this.receiveBuffer(),
      received: (n, buf) => this.received(n, buf),
    });
    const socket = adopted ?? raw;
    this.socket = socket;
    this.receiveMode = adopted === null ? 'stream' : 'direct';
    this.remote = socket.remoteAddress !== undefined ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
    this.watchSocket(socket);
    if (adopted === null) {
      socket.on('data', (chunk: Buffer) => this.onData(chunk));
      socket.resume();
    }
    if (typeof socket.setNoDelay === 'function') socket.setNoDelay(true);
    socket.write(encodeGreeting());
  }

  /** Close, error and drain handling, for the plain socket and for the TLS socket that replaces it. */
  private watchSocket(socket: Socket): void {
    this.sockets.push(socket);
    socket.once('close', () => this.onClose());
    socket.on('error', (err: NodeJS.ErrnoException) => {
      const quiet = err.code !== undefined && quietErrors.has(err.code);
      this.ctx.logger(quiet ? 'debug' : 'warn', 'connection error', { remote: this.remote, error: err.message, code: err.code });
    });
    socket.on('drain', () => this.maybeResume());
  }

  private onData(chunk: Buffer): void {
    if (!this.parsing()) return;
    this.bytesReceived += chunk.length;
    this.parser.push(chunk);
    this.pump();
    this.ctx.betweenBatches();
  }

  /**
   * The buffer for the next read: the rest of a large WRITE payload when one is being received, else
   * the free end of the read chunk. The chunk starts over when nothing unparsed points into it (a
   * short leftover is copied out first) and is replaced only when full, or when the handshake ends and
   * reads grow to full size.
   */
  private receiveBuffer(): Buffer {
    const direct = this.parser.receiveTarget(directReceiveBytesMin);
    this.receivingDirect = direct !== null;
    if (direct !== null) return direct;
    const pinned = this.parser.bufferedBytes;
    if (pinned > 0 && pinned <= compactBytesMax) this.parser.compact();
    if (pinned <= compactBytesMax) this.receiveUsed = 0;
    const chunkBytes = this.state === 'handshake' ? handshakeChunkBytes : receiveChunkBytes;
    const roomMin = Math.min(receiveRoomBytesMin, chunkBytes / 4);
    const chunk = this.receiveChunk;
    if (chunk === null || chunk.length - this.receiveUsed < roomMin || (chunk.length !== chunkBytes && this.receiveUsed === 0)) {
      this.receiveChunk = Buffer.allocUnsafe(chunkBytes);
      this.receiveUsed = 0;
    }
    return this.receiveChunk!.subarray(this.receiveUsed);
  }

  private received(n: number, buf: Buffer): void {
    this.bytesReceived += n;
    if (this.receivingDirect) {
      this.parser.receivedDirect(n);
      this.directBytes += n;
    } else if (this.parsing()) {
      this.parser.push(buf.subarray(0, n));
      this.receiveUsed += n;
    }
    this.pump();
    this.ctx.betweenBatches();
  }

  /** After DISC or once closed, whatever the client still sends is dropped, not queued. */
  private parsing(): boolean {
    return this.state === 'handshake' || this.state === 'transmission';
  }

  get inflightCount(): number {
    return this.transmission?.inflightCount ?? 0;
  }

  /** Graceful shutdown: negotiation ends now; transmission drains (new requests get ESHUTDOWN), then closes. */
  shutdown(): void {
    if (this.state === 'handshake' || this.state === 'tls') this.end();
    else if (this.state === 'transmission') {
      // Keep reading: requests that arrive now are answered ESHUTDOWN while the in-flight ones finish.
      this.shuttingDown = true;
      if (this.inflightCount === 0) this.end();
    }
  }

  destroy(): void {
    this.socket.destroy();
  }

  /**
   * The watchdog's look: why the connection must be dropped now, or null. A connection holds the
   * client's share of the budget while it receives a WRITE payload or has READ replies waiting in the
   * socket; between two looks at most `stallTimeoutMs` apart it must then receive `stallBytesMin`
   * payload bytes (or finish the payload), and get a reply out. Memory held by requests running on the
   * device is the server's business, not the client's, and never counts against it.
   */
  watch(nowMs: number, limits: WatchLimits): DropReason | null {
    if (this.state === 'closed') return null;
    if ((this.state === 'handshake' || this.state === 'tls') && nowMs - this.acceptedMs >= limits.handshakeTimeoutMs) return 'handshake-timeout';
    const w = this.window;
    const receiving = this.parser.receivingPayloadBytes > 0;
    const replying = this.unsentLentBytes > 0;
    const receivedEnough = this.bytesReceived - w.bytesReceived >= limits.stallBytesMin || this.requestsReceived !== w.requestsReceived;
    const replied = this.lentRepliesSent !== w.lentRepliesSent;
    if ((!receiving || receivedEnough) && (!replying || replied)) {
      this.window = { startMs: nowMs, bytesReceived: this.bytesReceived, requestsReceived: this.requestsReceived, lentRepliesSent: this.lentRepliesSent };
      return null;
    }
    return nowMs - w.startMs >= limits.stallTimeoutMs ? 'stalled' : null;
  }

  private pump(): void {
    // A reply sent synchronously may re-enter through 'drain'; one loop at a time.
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (this.parsing() && !this.memoryWait) {
        if (this.heldRequest !== null) {
          const req = this.heldRequest;
          if (!this.transmission!.handle(req)) {
            this.waitForMemory(req.length);
            break;
          }
          this.heldRequest = null;
        }
        if (this.overBudget()) {
          this.pause();
          break;
        }
        const msg = this.parser.next();
        if (msg === undefined) {
          if (this.parser.awaitingMemory) this.waitForMemory(this.parser.awaitingBytes);
          break;
        }
        switch (msg.kind) {
          case 'client-flags':
            this.apply(this.handshake.clientFlags(msg.flags));
            break;
          case 'option':
            this.apply(this.handshake.option(msg.option, msg.data));
            break;
          case 'request':
            this.request(msg);
            break;
          case 'protocol-error':
            this.ctx.logger('warn', 'protocol error, disconnecting', { remote: this.remote, reason: msg.reason });
            this.socket.destroy();
            this.state = 'closed';
            break;
        }
      }
    } finally {
      this.pumping = false;
    }
  }

  /** Stops reading until the budget grants room for `length` bytes; then carries on where it stopped. */
  private waitForMemory(length: number): void {
    this.memoryWait = true;
    this.pause();
    this.payloads.wait(length, () => {
      this.memoryWait = false;
      if (!this.parsing()) return;
      this.pump();
      this.maybeResume();
    });
  }

  private apply(step: HandshakeStep): void {
    if (step.next === 'starttls') {
      this.startTls(step.frames);
      return;
    }
    for (const f of step.frames) this.send1(f);
    if (step.next === 'close') {
      this.ctx.logger('debug', 'handshake ended', { remote: this.remote, reason: step.reason });
      this.end();
    } else if (step.next === 'transmission') {
      this.parser.enterTransmission();
      this.state = 'transmission';
      this.exportEntry = step.session.export;
      this.ctx.joined(step.session.export);
      this.transmission = new Transmission(step.session, {
        send: (frames, lent) => this.send(frames, lent),
        pool: this.payloads,
        settled: () => this.settled(),
        wantsEvents: () => this.ctx.wantsEvents(),
        event: (ev) => this.ctx.event(ev),
        isShuttingDown: () => this.ctx.isShuttingDown(),
      });
      this.ctx.logger('debug', 'transmission', { remote: this.remote, export: step.session.export.name, tls: this.tlsActive });
    }
  }

  /**
   * Answers STARTTLS and hands the socket to TLS once the ACK is written. A client must wait for the
   * ACK before its TLS hello, so bytes already received after STARTTLS can only be an attempt to
   * inject plaintext into the session to come: the connection is dropped.
   */
  private startTls(frames: Buffer[]): void {
    const setup = this.ctx.tls.setup;
    if (setup === null) throw new Error('STARTTLS accepted without a TLS setup');
    if (this.parser.bufferedBytes > 0) {
      this.ctx.logger('warn', 'bytes after STARTTLS before its reply, disconnecting', { remote: this.remote });
      this.socket.destroy();
      this.state = 'closed';
      return;
    }
    this.state = 'tls';
    this.pause();
    const plain = this.socket;
    this.cork();
    const last = frames.length - 1;
    for (let i = 0; i < last; i++) plain.write(frames[i]);
    plain.write(frames[last], (err) => {
      if (err === null || err === undefined) this.upgrade(plain, setup);
    });
  }

  private upgrade(plain: Socket, setup: ServerTlsSetup): void {
    if (this.state !== 'tls' || plain.destroyed) return;
    const secure = new tls.TLSSocket(plain, {
      isServer: true,
      secureContext: setup.secureContext,
      requestCert: setup.requestCert,
      rejectUnauthorized: setup.requestCert,
      ...(setup.pskCallback !== undefined && { pskCallback: setup.pskCallback }),
    });
    this.socket = secure;
    this.watchSocket(secure);
    secure.once('secure', () => {
      const refused = setup.requestCert ? clientCertificateError(secure) : null;
      if (refused !== null) {
        this.ctx.logger('warn', 'client certificate refused', { remote: this.remote, reason: refused });
        secure.destroy();
        return;
      }
      if (this.state !== 'tls') return;
      this.tlsActive = true;
      this.handshake.tlsStarted();
      this.state = 'handshake';
      this.paused = false;
      secure.setNoDelay(true);
      secure.on('data', (chunk: Buffer) => this.onData(chunk));
    });
  }

  private request(req: Request): void {
    const t = this.transmission!;
    this.requestsReceived += 1;
    if (req.type === CMD_DISC) {
      this.drainThenEnd();
      return;
    }
    if (!t.handle(req)) {
      this.heldRequest = req;
      this.waitForMemory(req.length);
    }
  }

  private drainThenEnd(): void {
    this.state = 'draining';
    if (this.inflightCount === 0) this.end();
  }

  private settled(): void {
    if ((this.state === 'draining' || this.shuttingDown) && this.inflightCount === 0) this.end();
    else this.maybeResume();
  }

  private overBudget(): boolean {
    const held = (this.transmission?.inflightBytes ?? 0) + this.socket.writableLength;
    return held >= this.ctx.inflightBytesMax;
  }

  private pause(): void {
    if (this.paused) return;
    this.paused = true;
    this.socket.pause();
  }

  private maybeResume(): void {
    if (!this.paused || this.memoryWait || this.overBudget()) return;
    if (!this.parsing()) return;
    this.paused = false;
    this.socket.resume();
    this.pump();
  }

  private send1(frame: Buffer): void {
    this.cork();
    this.socket.write(frame);
  }

  /**
   * Writes one reply's frames back to back; replies of one tick leave in one writev. A lent buffer
   * goes back to the pool (and its bytes to the budget) when the socket reports the write done (or
   * failed), never before.
   */
  private send(frames: Buffer[], lent: Buffer | null): void {
    if (this.state === 'closed' || this.socket.destroyed) {
      if (lent !== null) this.payloads.release(lent);
      return;
    }
    this.cork();
    const last = frames.length - 1;
    for (let i = 0; i < last; i++) this.socket.write(frames[i]);
    if (lent === null) {
      this.socket.write(frames[last]);
      return;
    }
    const bytes = this.payloads.footprint(lent.length);
    this.unsentLentBytes += bytes;
    this.socket.write(frames[last], () => {
      this.unsentLentBytes -= bytes;
      this.lentRepliesSent += 1;
      this.payloads.release(lent);
    });
  }

  private cork(): void {
    if (this.corked) return;
    this.corked = true;
    const socket = this.socket;
    socket.cork();
    process.nextTick(() => {
      this.corked = false;
      socket.uncork();
    });
  }

  private end(): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.socket.end();
    const socket = this.socket;
    // A client that never closes its side must not hold the connection open forever.
    setTimeout(() => socket.destroy(), lingerMs).unref();
  }

  /**
   * The plain socket closes, or the TLS socket wrapping it; either takes the other down. Whatever the
   * connection held of the memory budget goes back: requests still on the device give theirs back as
   * they finish, a partly received WRITE payload and a pending grant now.
   */
  private onClose(): void {
    for (const s of this.sockets) if (!s.destroyed) s.destroy();
    if (this.finished) return;
    this.finished = true;
    this.state = 'closed';
    this.transmission?.kill();
    const partial = this.parser.takePartialPayload();
    if (partial !== null) this.payloads.release(partial);
    this.heldRequest = null;
    this.payloads.close();
    if (this.exportEntry !== null) this.ctx.left(this.exportEntry);
    this.resolveClosed();
  }
}
