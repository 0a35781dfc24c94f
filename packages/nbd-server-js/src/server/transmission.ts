/**
 * The transmission phase of one connection, free of sockets: requests go in (already framed by the
 * parser), each is validated at the edge, run on the device concurrently with the others, and its whole
 * reply handed to `send` as one frame list once it completes, so replies may complete out of order but
 * never interleave. Nothing is sent for a connection that has died.
 */
import type { BlockDevice, Extent } from '@gannet/block-device';
import { EXTENT_ZERO, settleAll } from '@gannet/block-device';
import {
  CMD_BLOCK_STATUS,
  CMD_CACHE,
  CMD_DISC,
  CMD_FLAG_DF,
  CMD_FLAG_FAST_ZERO,
  CMD_FLAG_FUA,
  CMD_FLAG_NO_HOLE,
  CMD_FLAG_REQ_ONE,
  CMD_FLUSH,
  CMD_READ,
  CMD_TRIM,
  CMD_WRITE,
  CMD_WRITE_ZEROES,
  commandNames,
  TFLAG_SEND_CACHE,
  TFLAG_SEND_DF,
  TFLAG_SEND_FAST_ZERO,
  TFLAG_SEND_FLUSH,
  TFLAG_SEND_FUA,
  TFLAG_SEND_TRIM,
  TFLAG_SEND_WRITE_ZEROES,
} from '../protocol/constants.js';
import { requestError, toWireError } from './errors.js';
import { baseAllocationContextId, isWritable, type Session } from './handshake.js';
import type { Request } from './parser.js';
import type { PayloadSource } from './payload-pool.js';
import {
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeOffsetHoleChunk,
  encodeSimpleReply,
} from './replies.js';

/** Reads at least this long ask the device for extents first and send zero ranges as holes. */
export const holeScanBytesMin = 64 * 1024;
/** Zero extents shorter than this are sent as data: a hole chunk would cost more than it saves. */
export const holeBytesMin = 4096;
/** Descriptors in one BLOCK_STATUS chunk; the client asks again for the rest. */
export const blockStatusExtentsMax = 2048;

export type CommandName = 'read' | 'write' | 'flush' | 'trim' | 'cache' | 'write_zeroes' | 'block_status' | 'disc' | 'unknown';

export interface RequestEvent {
  readonly exportName: string;
  readonly command: CommandName;
  readonly bytes: number;
  readonly durationNs: bigint;
  /** Errno code when the request failed. */
  readonly error?: string;
}

export interface TransmissionHooks {
  /**
   * Sends one complete reply; the frames must reach the socket back to back. `lent`, when not null,
   * is a pool buffer some frames are views of: it goes back to `pool` once the socket is done with it.
   */
  send(frames: Buffer[], lent: Buffer | null): void;
  /** Where WRITE payloads come from and READ buffers are taken; both are handed back here. */
  readonly pool: PayloadSource;
  /** Called after each request settles (replied or dropped), for backpressure and draining. */
  settled(): void;
  /** When false, no timing is taken and no events are built. */
  wantsEvents(): boolean;
  event(ev: RequestEvent): void;
  isShuttingDown(): boolean;
}

/** A reply, and the pool buffer it carries data from (a READ's), if any. */
interface Reply {
  readonly frames: Buffer[];
  readonly lent: Buffer | null;
}

const fuaOptions = Object.freeze({ fua: true });

function commandName(type: number): CommandName {
  return (commandNames[type] as CommandName | undefined) ?? 'unknown';
}

function flagsAllowed(type: number, tflags: number): number {
  let allowed = (tflags & TFLAG_SEND_FUA) !== 0 ? CMD_FLAG_FUA : 0;
  if (type === CMD_READ && (tflags & TFLAG_SEND_DF) !== 0) allowed |= CMD_FLAG_DF;
  if (type === CMD_WRITE_ZEROES) {
    allowed |= CMD_FLAG_NO_HOLE;
    if ((tflags & TFLAG_SEND_FAST_ZERO) !== 0) allowed |= CMD_FLAG_FAST_ZERO;
  }
  if (type === CMD_BLOCK_STATUS) allowed |= CMD_FLAG_REQ_ONE;
  return allowed;
}

/**
 * Checks a request against the negotiated session before any device work, returning the error the spec
 * assigns, or null when the request may run. DISC is not validated: it has no reply.
 */
export function validateRequest(session: Session, req: Request, shuttingDown: boolean): Error | null {
  const { type, flags, offset, length } = req;
  const tflags = session.transmissionFlags;
  const size = session.export.device.size;
  if (type > CMD_BLOCK_STATUS || type === CMD_DISC) return requestError('EINVAL', `unknown command ${type}`);
  // A read-only export refuses every mutating command with EPERM, whatever flags came with it (the
  // flags a writable export would accept, such as FUA, are not advertised there).
  const writes = type === CMD_WRITE || type === CMD_TRIM || type === CMD_WRITE_ZEROES;
  if (writes && !isWritable(session.export)) return requestError('EPERM', 'export is read-only');
  const bad = flags & ~flagsAllowed(type, tflags);
  if (bad !== 0) return requestError('EINVAL', `flags 0x${bad.toString(16)} not valid for ${commandName(type)}`);
  if (shuttingDown) return requestError('ESHUTDOWN', 'server is shutting down');
  switch (type) {
    case CMD_FLUSH:
      if ((tflags & TFLAG_SEND_FLUSH) === 0) return requestError('EINVAL', 'flush not supported');
      if (offset !== 0 || length !== 0) return requestError('EINVAL', 'flush offset and length must be zero');
      return null;
    case CMD_TRIM:
      if ((tflags & TFLAG_SEND_TRIM) === 0) return requestError('EINVAL', 'trim not supported');
      break;
    case CMD_WRITE_ZEROES:
      if ((tflags & TFLAG_SEND_WRITE_ZEROES) === 0) return requestError('EINVAL', 'write zeroes not supported');
      break;
    case CMD_CACHE:
      if ((tflags & TFLAG_SEND_CACHE) === 0) return requestError('EINVAL', 'cache not supported');
      break;
    case CMD_BLOCK_STATUS:
      if (!session.baseAllocation) return requestError('EINVAL', 'no metadata context negotiated');
      if (length === 0) return requestError('EINVAL', 'block status of zero bytes');
      break;
  }
  if (offset + length > size) {
    const code = type === CMD_WRITE || type === CMD_WRITE_ZEROES ? 'ENOSPC' : 'EINVAL';
    return requestError(code, `range ${offset}+${length} is past the end (size ${size})`);
  }
  if (type === CMD_READ && length > session.payloadBytesMax) {
    if ((flags & CMD_FLAG_DF) !== 0) return requestError('EOVERFLOW', `read of ${length} bytes cannot be unfragmented`);
    return requestError('EINVAL', `read of ${length} bytes exceeds ${session.payloadBytesMax}`);
  }
  if (type === CMD_WRITE && (length > session.payloadBytesMax || req.payload === null)) {
    return requestError('EINVAL', `write of ${length} bytes exceeds ${session.payloadBytesMax}`);
  }
  return null;
}

/**
 * Every request in flight counts at least this much against the connection's in-flight budget, so a
 * flood of small commands (TRIMs queued behind engine backpressure, say) is bounded in number too:
 * 64 MiB / 4 KiB = 16 Ki requests per connection.
 */
export const requestHeldBytesMin = 4096;

export class Transmission {
  private inflight = 0;
  private bytes = 0;
  private dead = false;
  private readonly device: BlockDevice;
  private readonly structured: boolean;

  constructor(
    readonly session: Session,
    private readonly hooks: TransmissionHooks,
  ) {
    this.device = session.export.device;
    this.structured = session.structuredReplies;
  }

  /** Requests started and not yet settled. */
  get inflightCount(): number {
    return this.inflight;
  }

  /** READ buffers and WRITE payloads held by requests in flight. */
  get inflightBytes(): number {
    return this.bytes;
  }

  /** The connection is gone: finish the device work already started, but send nothing more. */
  kill(): void {
    this.dead = true;
  }

  /**
   * Starts one request. DISC must be handled by the caller (no reply, drain then close). Returns false,
   * having started nothing, when a READ's buffer does not fit the memory budget: the caller waits for
   * room and hands the same request in again.
   */
  handle(req: Request): boolean {
    if (req.type === CMD_DISC) throw new Error('DISC reaches Transmission.handle');
    const startNs = this.hooks.wantsEvents() ? process.hrtime.bigint() : 0n;
    const error = validateRequest(this.session, req, this.hooks.isShuttingDown());
    let readBuffer: Buffer | null = null;
    if (error === null && req.type === CMD_READ && req.length > 0) {
      readBuffer = this.hooks.pool.tryAcquire(req.length);
      if (readBuffer === null) return false;
    }
    const carriesData = req.payload !== null || readBuffer !== null;
    const dataBytes = carriesData ? this.hooks.pool.footprint(req.length) : 0;
    const held = Math.max(dataBytes, requestHeldBytesMin);
    this.inflight += 1;
    this.bytes += held;
    if (error !== null) {
      this.finish(req, held, startNs, this.errorReply(req, error), error);
      return true;
    }
    // WRITE is most of the traffic: straight to the device, without run()'s extra promise.
    const work =
      req.type === CMD_WRITE && req.length > 0
        ? this.device.write(req.payload!, req.offset, (req.flags & CMD_FLAG_FUA) !== 0 ? fuaOptions : undefined).then(() => this.ok(req))
        : this.run(req, readBuffer);
    work.then(
      (reply) => this.finish(req, held, startNs, reply, null),
      (err: unknown) => this.finish(req, held, startNs, this.errorReply(req, err), err),
    );
    return true;
  }

  private finish(req: Request, held: number, startNs: bigint, reply: Reply, err: unknown): void {
    // The device is done with the payload (the BlockDevice contract), so it can carry another WRITE.
    if (req.payload !== null) this.hooks.pool.release(req.payload);
    this.inflight -= 1;
    this.bytes -= held;
    if (!this.dead) this.hooks.send(reply.frames, reply.lent);
    else if (reply.lent !== null) this.hooks.pool.release(reply.lent);
    if (startNs !== 0n) {
      const ev: RequestEvent = {
        exportName: this.session.export.name,
        command: commandName(req.type),
        bytes: req.type === CMD_READ || req.type === CMD_WRITE ? req.length : 0,
        durationNs: process.hrtime.bigint() - startNs,
        ...(err === null ? {} : { error: toWireError(err).code }),
      };
      this.hooks.event(ev);
    }
    this.hooks.settled();
  }

  private errorReply(req: Request, err: unknown): Reply {
    const wire = toWireError(err);
    if (this.structured) return { frames: [encodeErrorChunk(req.cookieHi, req.cookieLo, wire.errno, wire.message)], lent: null };
    return { frames: [encodeSimpleReply(wire.errno, req.cookieHi, req.cookieLo)], lent: null };
  }

  private ok(req: Request): Reply {
    return { frames: [encodeSimpleReply(0, req.cookieHi, req.cookieLo)], lent: null };
  }

  private async run(req: Request, readBuffer: Buffer | null): Promise<Reply> {
    const fua = (req.flags & CMD_FLAG_FUA) !== 0 ? fuaOptions : undefined;
    const d = this.device;
    switch (req.type) {
      case CMD_READ:
        return this.readReply(req, readBuffer);
      case CMD_WRITE:
        if (req.length > 0) await d.write(req.payload!, req.offset, fua);
        return this.ok(req);
      case CMD_FLUSH:
        await d.flush();
        return this.ok(req);
      case CMD_TRIM:
        if (req.length > 0) await d.trim(req.offset, req.length, fua);
        return this.ok(req);
      case CMD_CACHE:
        if (req.length > 0) await d.cache(req.offset, req.length);
        return this.ok(req);
      case CMD_WRITE_ZEROES:
        if (req.length > 0) await this.writeZeroes(req);
        return this.ok(req);
      case CMD_BLOCK_STATUS:
        return this.blockStatus(req);
      default:
        throw new Error(`unvalidated command ${req.type} reached the device`);
    }
  }

  private async writeZeroes(req: Request): Promise<void> {
    const caps = this.device.capabilities;
    const fua = (req.flags & CMD_FLAG_FUA) !== 0;
    const noHole = (req.flags & CMD_FLAG_NO_HOLE) !== 0;
    const fastZero = (req.flags & CMD_FLAG_FAST_ZERO) !== 0;
    if (fastZero && !(caps.zero && caps.fastZero)) throw requestError('ENOTSUP', 'fast zeroing not supported');
    // Every device zeroes (writing zero buffers itself if it must): only FAST_ZERO may be refused.
    await this.device.writeZeroes(req.offset, req.length, { fua, noHole, fastZero });
  }

  /** `buf` is the READ's buffer, taken within the memory budget when the request started; null for length 0. */
  private async readReply(req: Request, buf: Buffer | null): Promise<Reply> {
    const { cookieHi, cookieLo } = req;
    if (buf === null) return this.structured ? { frames: [encodeNoneChunk(cookieHi, cookieLo)], lent: null } : this.ok(req);
    try {
      return { frames: await this.read(req, buf), lent: buf };
    } catch (err) {
      this.hooks.pool.release(buf);
      throw err;
    }
  }

  private async read(req: Request, buf: Buffer): Promise<Buffer[]> {
    const { cookieHi, cookieLo, offset, length } = req;
    if (!this.structured) {
      await this.device.read(buf, offset);
      return [encodeSimpleReply(0, cookieHi, cookieLo), buf];
    }
    const df = (req.flags & CMD_FLAG_DF) !== 0;
    if (df || length < holeScanBytesMin || !this.device.capabilities.extents) {
      await this.device.read(buf, offset);
      return [encodeOffsetDataHeader(cookieHi, cookieLo, offset, length, true), buf];
    }
    const segments = await this.readSegments(buf, offset);
    const frames: Buffer[] = [];
    for (let i = 0; i < segments.length; i += 3) {
      const start = segments[i];
      const end = segments[i + 1];
      const done = i + 3 === segments.length;
      if (segments[i + 2] === 1) {
        frames.push(encodeOffsetHoleChunk(cookieHi, cookieLo, offset + start, end - start, done));
      } else {
        frames.push(encodeOffsetDataHeader(cookieHi, cookieLo, offset + start, end - start, done), buf.subarray(start, end));
      }
    }
    return frames;
  }

  /**
   * Splits a read into data and hole ranges by the device's extents and reads the data ranges into
   * their places in `buf`. Returns flat triples (start, end, isHole) relative to the read.
   */
  private async readSegments(buf: Buffer, offset: number): Promise<number[]> {
    const length = buf.length;
    let extents: Extent[] = [];
    try {
      extents = await this.device.extents(offset, length);
    } catch {
      // Extents are only an optimisation here; a failing query means a plain data read.
    }
    const segments: number[] = [];
    let at = 0;
    for (const e of extents) {
      if (at >= length) break;
      if (!(e.length > 0)) break;
      const end = Math.min(length, at + e.length);
      const hole = (e.flags & EXTENT_ZERO) !== 0 && end - at >= holeBytesMin ? 1 : 0;
      const n = segments.length;
      if (n > 0 && segments[n - 1] === hole) segments[n - 2] = end;
      else segments.push(at, end, hole);
      at = end;
    }
    if (at < length) {
      const n = segments.length;
      if (n > 0 && segments[n - 1] === 0) segments[n - 2] = length;
      else segments.push(at, length, 0);
    }
    const reads: Promise<void>[] = [];
    for (let i = 0; i < segments.length; i += 3) {
      if (segments[i + 2] === 0) reads.push(this.device.read(buf.subarray(segments[i], segments[i + 1]), offset + segments[i]));
    }
    await settleAll(reads);
    return segments;
  }

  private async blockStatus(req: Request): Promise<Reply> {
    const { offset, length } = req;
    const extents = await this.device.extents(offset, length);
    const limit = (req.flags & CMD_FLAG_REQ_ONE) !== 0 ? 1 : blockStatusExtentsMax;
    const lengths: number[] = [];
    const flags: number[] = [];
    let at = 0;
    for (const e of extents) {
      if (at >= length) break;
      if (!(Number.isSafeInteger(e.length) && e.length > 0)) {
        throw new Error(`device returned an extent of length ${e.length} at ${offset + at}`);
      }
      // Clipped to the request: every descriptor, the last included, stays within it.
      const n = Math.min(e.length, length - at);
      const last = lengths.length - 1;
      if (last >= 0 && flags[last] === e.flags) lengths[last] += n;
      else if (lengths.length === limit) break;
      else {
        lengths.push(n);
        flags.push(e.flags);
      }
      at += n;
    }
    if (lengths.length === 0) throw new Error(`device returned no extents for ${offset}+${length}`);
    return { frames: [encodeBlockStatusChunk(req.cookieHi, req.cookieLo, baseAllocationContextId, lengths, flags, true)], lent: null };
  }
}

