/**
 * One client connection: the few lines that tie a socket to the parser, the handshake and the
 * transmission state machines. It owns the socket's lifecycle: backpressure (pause reading while too
 * many bytes are in flight or queued for the client), batched writes (cork until the end of the tick),
 * DISC (drain, then close), graceful shutdown, and quiet handling of clients that vanish. It also
 * chooses where each read lands (receive.ts): straight into a large WRITE payload, else a read chunk
 * reused while nothing unparsed points into it.
 */
import type { Socket } from 'node:net';
import { CMD_DISC } from '../protocol/constants.js';
import { Handshake, type ExportRegistry, type HandshakeStep } from './handshake.js';
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
  readonly logger: Logger;
  isShuttingDown(): boolean;
  wantsEvents(): boolean;
  event(ev: RequestEvent): void;
  /** The server's `betweenBatches` option: called after each read's requests are dispatched. */
  betweenBatches(): void;
}

/** Errors that only mean the client went away. */
const quietErrors = new Set(['EPIPE', 'ECONNRESET', 'ECONNABORTED', 'ERR_STREAM_DESTROYED', 'ERR_STREAM_WRITE_AFTER_END']);

/** How long a closed connection waits for the client to close its side before dropping it. */
export const lingerMs = 5000;
/** Reads land in a buffer of this size unless a WRITE payload is being received directly. */
export const receiveChunkBytes = 64 * 1024;
/** A WRITE payload with at least this much still to come is read straight into place. */
export const directReceiveBytesMin = 64 * 1024;
/** Unparsed bytes left after a read up to this size are copied out so the read buffer can be reused. */
const compactBytesMax = 4096;
/**
 * A new read chunk is taken only when the current one has less room than this. Reads fill a chunk end
 * to end, so unparsed bytes (a long option sent a byte at a time, say) hold at most a third more memory
 * than their own size, never a chunk per read.
 */
const receiveRoomBytesMin = 16 * 1024;

type State = 'handshake' | 'transmission' | 'draining' | 'closed';

/**
 * How a connection receives: 'direct' reads large WRITE payloads straight into place; 'stream' is
 * Node's default 'data' events, used when this Node's socket internals are not the expected ones.
 */
export type ReceiveMode = 'direct' | 'stream';

export class Connection {
  readonly remote: string;
  readonly receiveMode: ReceiveMode;
  /** Bytes read straight into WRITE payloads, without a copy. */
  directBytes = 0;
  readonly closed: Promise<void>;
  private state: State = 'handshake';
  private readonly parser: ClientStreamParser;
  private readonly handshake: Handshake;
  private transmission: Transmission | null = null;
  private corked = false;
  private paused = false;
  private pumping = false;
  private shuttingDown = false;
  private readonly socket: Socket;
  private receiveChunk: Buffer | null = null;
  /** Bytes at the start of `receiveChunk` that unparsed bytes may still point into. */
  private receiveUsed = 0;
  private receivingDirect = false;

  /** `raw` must be paused (accepted with `pauseOnConnect`); the connection starts reading it. */
  constructor(
    raw: Socket,
    private readonly ctx: ConnectionContext,
  ) {
    this.parser = new ClientStreamParser({
      optionBytesMax: ctx.optionBytesMax,
      requestBytesMax: ctx.requestBytesMax,
      writeSkipBytesMax: ctx.writeSkipBytesMax,
    }, ctx.payloadPool);
    this.handshake = new Handshake({
      exports: ctx.exports,
      requestBytesMax: ctx.requestBytesMax,
      isShuttingDown: () => ctx.isShuttingDown(),
    });
    const adopted = adoptWithReceiver(raw, {
      buffer: () => this.receiveBuffer(),
      received: (n, buf) => this.received(n, buf),
    });
    const socket = adopted ?? raw;
    this.socket = socket;
    this.receiveMode = adopted === null ? 'stream' : 'direct';
    this.remote = socket.remoteAddress !== undefined ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.once('close', () => this.onClose());
    socket.on('error', (err: NodeJS.ErrnoException) => {
      const quiet = err.code !== undefined && quietErrors.has(err.code);
      ctx.logger(quiet ? 'debug' : 'warn', 'connection error', { remote: this.remote, error: err.message, code: err.code });
    });
    if (adopted === null) {
      socket.on('data', (chunk: Buffer) => {
        if (!this.parsing()) return;
        this.parser.push(chunk);
        this.pump();
        ctx.betweenBatches();
      });
      socket.resume();
    }
    socket.on('drain', () => this.maybeResume());
    if (typeof socket.setNoDelay === 'function') socket.setNoDelay(true);
    socket.write(encodeGreeting());
  }

  /**
   * The buffer for the next read: the rest of a large WRITE payload when one is being received, else
   * the free end of the read chunk. The chunk starts over when nothing unparsed points into it (a
   * short leftover is copied out first) and is replaced only when full.
   */
  private receiveBuffer(): Buffer {
    const direct = this.parser.receiveTarget(directReceiveBytesMin);
    this.receivingDirect = direct !== null;
    if (direct !== null) return direct;
    const pinned = this.parser.bufferedBytes;
    if (pinned > 0 && pinned <= compactBytesMax) this.parser.compact();
    if (pinned <= compactBytesMax) this.receiveUsed = 0;
    if (this.receiveChunk === null || receiveChunkBytes - this.receiveUsed < receiveRoomBytesMin) {
      this.receiveChunk = Buffer.allocUnsafe(receiveChunkBytes);
      this.receiveUsed = 0;
    }
    return this.receiveChunk.subarray(this.receiveUsed);
  }

  private received(n: number, buf: Buffer): void {
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
    if (this.state === 'handshake') this.end();
    else if (this.state === 'transmission') {
      // Keep reading: requests that arrive now are answered ESHUTDOWN while the in-flight ones finish.
      this.shuttingDown = true;
      if (this.inflightCount === 0) this.end();
    }
  }

  destroy(): void {
    this.socket.destroy();
  }

  private pump(): void {
    // A reply sent synchronously may re-enter through 'drain'; one loop at a time.
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (this.state === 'handshake' || this.state === 'transmission') {
        if (this.overBudget()) {
          this.pause();
          break;
        }
        const msg = this.parser.next();
        if (msg === undefined) break;
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

  private apply(step: HandshakeStep): void {
    for (const f of step.frames) this.send1(f);
    if (step.next === 'close') {
      this.ctx.logger('debug', 'handshake ended', { remote: this.remote, reason: step.reason });
      this.end();
    } else if (step.next === 'transmission') {
      this.parser.enterTransmission();
      this.state = 'transmission';
      this.transmission = new Transmission(step.session, {
        send: (frames, lent) => this.send(frames, lent),
        pool: this.ctx.payloadPool,
        settled: () => this.settled(),
        wantsEvents: () => this.ctx.wantsEvents(),
        event: (ev) => this.ctx.event(ev),
        isShuttingDown: () => this.ctx.isShuttingDown(),
      });
      this.ctx.logger('debug', 'transmission', { remote: this.remote, export: step.session.export.name });
    }
  }

  private request(req: Request): void {
    const t = this.transmission!;
    if (req.type === CMD_DISC) {
      this.drainThenEnd();
      return;
    }
    t.handle(req);
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
    if (!this.paused || this.overBudget()) return;
    if (this.state !== 'handshake' && this.state !== 'transmission') return;
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
   * goes back to the pool when the socket reports the write done (or failed), never before.
   */
  private send(frames: Buffer[], lent: Buffer | null): void {
    const pool = this.ctx.payloadPool;
    if (this.state === 'closed' || this.socket.destroyed) {
      if (lent !== null) pool.release(lent);
      return;
    }
    this.cork();
    const last = frames.length - 1;
    for (let i = 0; i < last; i++) this.socket.write(frames[i]);
    if (lent === null) this.socket.write(frames[last]);
    else this.socket.write(frames[last], () => pool.release(lent));
  }

  private cork(): void {
    if (this.corked) return;
    this.corked = true;
    this.socket.cork();
    process.nextTick(() => {
      this.corked = false;
      this.socket.uncork();
    });
  }

  private end(): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.socket.end();
    // A client that never closes its side must not hold the connection open forever.
    setTimeout(() => this.socket.destroy(), lingerMs).unref();
  }

  private onClose(): void {
    this.state = 'closed';
    this.transmission?.kill();
  }
}
