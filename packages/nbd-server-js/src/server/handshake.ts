/**
 * The server side of fixed newstyle negotiation as a synchronous state machine: client flags and
 * options go in, reply frames and a decision (keep negotiating, close, start TLS, enter transmission)
 * come out. With TLS, the modes of the spec's TLS section: 'require' is FORCEDTLS, 'on' SELECTIVETLS.
 * No I/O and no device calls, so every path is testable with bytes alone.
 */
import type { BlockDevice } from '@gannet/block-device';
import {
  BASE_ALLOCATION,
  CLIENT_FLAGS_KNOWN,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  INFO_DESCRIPTION,
  INFO_NAME,
  OPT_ABORT,
  OPT_EXPORT_NAME,
  OPT_GO,
  OPT_INFO,
  OPT_LIST,
  OPT_LIST_META_CONTEXT,
  OPT_SET_META_CONTEXT,
  OPT_STARTTLS,
  OPT_STRUCTURED_REPLY,
  REP_ACK,
  REP_ERR_INVALID,
  REP_ERR_POLICY,
  REP_ERR_SHUTDOWN,
  REP_ERR_TLS_REQD,
  REP_ERR_UNKNOWN,
  REP_ERR_UNSUP,
  REP_INFO,
  REP_META_CONTEXT,
  REP_SERVER,
  TFLAG_CAN_MULTI_CONN,
  TFLAG_HAS_FLAGS,
  TFLAG_READ_ONLY,
  TFLAG_SEND_CACHE,
  TFLAG_SEND_DF,
  TFLAG_SEND_FAST_ZERO,
  TFLAG_SEND_FLUSH,
  TFLAG_SEND_FUA,
  TFLAG_SEND_TRIM,
  TFLAG_SEND_WRITE_ZEROES,
} from '../protocol/constants.js';
import {
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContext,
  encodeOptionError,
  encodeOptionReply,
  encodeRepServer,
  stringBytesMax,
} from './replies.js';

/** Options a client may send before we take it as hostile and disconnect. */
export const optionCountMax = 64;
/** Extra options allowed per export after a LIST (a client may ask INFO and LIST_META_CONTEXT of each). */
export const optionCountPerListedExport = 4;
/** Metadata context id of base:allocation, the only context served. */
export const baseAllocationContextId = 1;

export interface ExportEntry {
  readonly name: string;
  readonly device: BlockDevice;
  readonly description: string;
  readonly readOnly: boolean;
  /** Served only over TLS (a server in TLS mode 'require' treats every export so). */
  readonly tlsRequired?: boolean;
}

export interface ExportRegistry {
  /** Resolves a name as the client gives it; '' selects the default export. */
  lookup(name: string): ExportEntry | undefined;
  list(): readonly ExportEntry[];
}

export interface HandshakeContext {
  readonly exports: ExportRegistry;
  /** Largest READ/WRITE payload, advertised as the BLOCK_SIZE maximum (capped by the device's). */
  readonly requestBytesMax: number;
  isShuttingDown(): boolean;
  /**
   * 'off': STARTTLS is refused (the spec's NOTLS). 'on': clients may upgrade, and exports marked
   * `tlsRequired` are refused until they do (SELECTIVETLS). 'require': every option but STARTTLS and
   * ABORT is refused until TLS is up (FORCEDTLS). Default 'off'.
   */
  readonly tls?: 'off' | 'on' | 'require';
  /** True when the export has as many connections as it may: GO and EXPORT_NAME are then refused. */
  exportFull?(entry: ExportEntry): boolean;
}

/** What transmission needs to know about the negotiation. */
export interface Session {
  readonly export: ExportEntry;
  readonly structuredReplies: boolean;
  /** True when base:allocation was selected for this export. */
  readonly baseAllocation: boolean;
  readonly transmissionFlags: number;
  /** The BLOCK_SIZE maximum advertised: READ and WRITE above it are refused. */
  readonly payloadBytesMax: number;
}

export type HandshakeStep =
  | { readonly frames: Buffer[]; readonly next: 'continue' }
  | { readonly frames: Buffer[]; readonly next: 'close'; readonly reason: string }
  /** The frames (the ACK) go out, then the TLS handshake; `tlsStarted` is called once it succeeds. */
  | { readonly frames: Buffer[]; readonly next: 'starttls' }
  | { readonly frames: Buffer[]; readonly next: 'transmission'; readonly session: Session };

export function isWritable(entry: ExportEntry): boolean {
  return !entry.readOnly && !entry.device.capabilities.readOnly;
}

export function transmissionFlagsFor(entry: ExportEntry, structuredReplies: boolean): number {
  const caps = entry.device.capabilities;
  const writable = isWritable(entry);
  let flags = TFLAG_HAS_FLAGS;
  if (!writable) flags |= TFLAG_READ_ONLY;
  if (caps.flush) flags |= TFLAG_SEND_FLUSH;
  if (caps.fua) flags |= TFLAG_SEND_FUA;
  if (writable && caps.trim) flags |= TFLAG_SEND_TRIM;
  // WRITE_ZEROES is always served on a writable export: a device without efficient zeroing gets
  // zero-filled writes, and FAST_ZERO is then refused quickly with ENOTSUP, as the spec intends.
  if (writable) flags |= TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
  if (structuredReplies) flags |= TFLAG_SEND_DF;
  if (caps.multiConn) flags |= TFLAG_CAN_MULTI_CONN;
  if (caps.cache) flags |= TFLAG_SEND_CACHE;
  return flags;
}

export function payloadBytesMaxFor(entry: ExportEntry, requestBytesMax: number): number {
  return Math.min(entry.device.blockSizes.maximum, requestBytesMax);
}

/** Reads the length-prefixed strings of option payloads; any overrun marks the payload invalid. */
class PayloadReader {
  private at = 0;
  invalid = false;
  constructor(private readonly data: Buffer) {}

  get remaining(): number {
    return this.data.length - this.at;
  }

  u32(): number {
    if (this.remaining < 4) {
      this.invalid = true;
      return 0;
    }
    const v = this.data.readUInt32BE(this.at);
    this.at += 4;
    return v;
  }

  u16(): number {
    if (this.remaining < 2) {
      this.invalid = true;
      return 0;
    }
    const v = this.data.readUInt16BE(this.at);
    this.at += 2;
    return v;
  }

  string(length: number): string {
    if (length > stringBytesMax || this.remaining < length) {
      this.invalid = true;
      return '';
    }
    const s = this.data.toString('utf8', this.at, this.at + length);
    this.at += length;
    return s;
  }
}

const optionNames: Readonly<Record<number, string>> = {
  [OPT_EXPORT_NAME]: 'EXPORT_NAME',
  [OPT_ABORT]: 'ABORT',
  [OPT_LIST]: 'LIST',
  [OPT_STARTTLS]: 'STARTTLS',
  [OPT_INFO]: 'INFO',
  [OPT_GO]: 'GO',
  [OPT_STRUCTURED_REPLY]: 'STRUCTURED_REPLY',
  [OPT_LIST_META_CONTEXT]: 'LIST_META_CONTEXT',
  [OPT_SET_META_CONTEXT]: 'SET_META_CONTEXT',
};

export class Handshake {
  private fixedNewstyle = false;
  private noZeroes = false;
  private structuredReplies = false;
  /** The export named by the last SET_META_CONTEXT, and whether it selected base:allocation. */
  private metaExportName: string | null = null;
  private baseAllocation = false;
  private optionsLeft = optionCountMax;
  /** LIST grants its INFO/GO allowance once. */
  private listed = false;
  private done = false;
  private tlsActive = false;
  private readonly tlsMode: 'off' | 'on' | 'require';

  constructor(private readonly context: HandshakeContext) {
    this.tlsMode = context.tls ?? 'off';
  }

  /**
   * The TLS handshake after STARTTLS succeeded. What was negotiated before it is forgotten (the spec:
   * a man in the middle could have chosen it); the client flags stay, they are not sent again.
   */
  tlsStarted(): void {
    this.tlsActive = true;
    this.structuredReplies = false;
    this.metaExportName = null;
    this.baseAllocation = false;
  }

  /** Whether `entry` may be used on this connection yet: TLS-only exports need TLS to be up. */
  private needsTls(entry: ExportEntry): boolean {
    if (this.tlsActive || this.tlsMode === 'off') return false;
    return this.tlsMode === 'require' || entry.tlsRequired === true;
  }

  clientFlags(flags: number): HandshakeStep {
    if ((flags & ~CLIENT_FLAGS_KNOWN) !== 0) {
      return this.close(`unknown client flags 0x${(flags >>> 0).toString(16)}`);
    }
    this.fixedNewstyle = (flags & FLAG_C_FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (flags & FLAG_C_NO_ZEROES) !== 0;
    return { frames: [], next: 'continue' };
  }

  option(option: number, data: Buffer): HandshakeStep {
    if (this.done) throw new Error('option after the handshake ended');
    this.optionsLeft -= 1;
    if (this.optionsLeft < 0) return this.close(`more than ${optionCountMax} options`);
    if (option === OPT_EXPORT_NAME) return this.exportName(data);
    if (!this.fixedNewstyle) return this.close(`option ${option} from a client without fixed newstyle`);
    const shuttingDown = this.context.isShuttingDown();
    if (shuttingDown && option !== OPT_ABORT) {
      return this.reply([encodeOptionError(option, REP_ERR_SHUTDOWN, 'server is shutting down')]);
    }
    if (this.tlsMode === 'require' && !this.tlsActive && option !== OPT_STARTTLS && option !== OPT_ABORT) {
      return this.reply([encodeOptionError(option, REP_ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first')]);
    }
    switch (option) {
      case OPT_ABORT:
        return this.close('client aborted', [encodeOptionReply(option, REP_ACK)]);
      case OPT_LIST:
        return this.list(data);
      case OPT_STARTTLS:
        return this.startTls(data);
      case OPT_INFO:
      case OPT_GO:
        return this.infoOrGo(option, data);
      case OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return this.invalid(option, 'STRUCTURED_REPLY carries no data');
        this.structuredReplies = true;
        return this.reply([encodeOptionReply(option, REP_ACK)]);
      case OPT_LIST_META_CONTEXT:
      case OPT_SET_META_CONTEXT:
        return this.metaContext(option, data);
      default:
        return this.reply([encodeOptionError(option, REP_ERR_UNSUP, `option ${option} is not supported`)]);
    }
  }

  private reply(frames: Buffer[]): HandshakeStep {
    return { frames, next: 'continue' };
  }

  private invalid(option: number, message: string): HandshakeStep {
    return this.reply([encodeOptionError(option, REP_ERR_INVALID, message)]);
  }

  private close(reason: string, frames: Buffer[] = []): HandshakeStep {
    this.done = true;
    return { frames, next: 'close', reason };
  }

  private enter(entry: ExportEntry, frames: Buffer[]): HandshakeStep {
    this.done = true;
    const session: Session = {
      export: entry,
      structuredReplies: this.structuredReplies,
      baseAllocation: this.baseAllocation && this.metaExportName !== null && this.context.exports.lookup(this.metaExportName) === entry,
      transmissionFlags: transmissionFlagsFor(entry, this.structuredReplies),
      payloadBytesMax: payloadBytesMaxFor(entry, this.context.requestBytesMax),
    };
    return { frames, next: 'transmission', session };
  }

  private startTls(data: Buffer): HandshakeStep {
    if (this.tlsMode === 'off') return this.reply([encodeOptionError(OPT_STARTTLS, REP_ERR_POLICY, 'TLS is not configured on this server')]);
    if (data.length !== 0) return this.invalid(OPT_STARTTLS, 'STARTTLS carries no data');
    if (this.tlsActive) return this.invalid(OPT_STARTTLS, 'TLS is already running');
    return { frames: [encodeOptionReply(OPT_STARTTLS, REP_ACK)], next: 'starttls' };
  }

  private exportName(data: Buffer): HandshakeStep {
    // EXPORT_NAME cannot carry an error: refusing means closing.
    if (this.context.isShuttingDown()) return this.close('server is shutting down');
    if (this.tlsMode === 'require' && !this.tlsActive) return this.close('EXPORT_NAME before STARTTLS on a server that requires TLS');
    if (data.length > stringBytesMax) return this.close('export name too long');
    const name = data.toString('utf8');
    const entry = this.context.exports.lookup(name);
    if (entry === undefined) return this.close(`unknown export ${JSON.stringify(name)}`);
    if (this.needsTls(entry)) return this.close(`export ${JSON.stringify(name)} requires TLS`);
    if (this.context.exportFull?.(entry) === true) return this.close(`export ${JSON.stringify(name)} has as many connections as it may`);
    const flags = transmissionFlagsFor(entry, this.structuredReplies);
    return this.enter(entry, [encodeExportNameReply(entry.device.size, flags, this.noZeroes)]);
  }

  private list(data: Buffer): HandshakeStep {
    if (data.length !== 0) return this.invalid(OPT_LIST, 'LIST carries no data');
    // TLS-only exports are not named to a client that has not started TLS (the spec allows leaving them out).
    const exports = this.context.exports.list().filter((e) => !this.needsTls(e));
    // The allowance for INFO/GO on the listed exports is granted once, or repeated LISTs would lift
    // the option cap for ever.
    if (!this.listed) this.optionsLeft += optionCountPerListedExport * exports.length;
    this.listed = true;
    const frames = exports.map((e) => encodeRepServer(OPT_LIST, REP_SERVER, e.name, e.description));
    frames.push(encodeOptionReply(OPT_LIST, REP_ACK));
    return this.reply(frames);
  }

  private infoOrGo(option: number, data: Buffer): HandshakeStep {
    const r = new PayloadReader(data);
    const name = r.string(r.u32());
    const count = r.u16();
    const requests = new Set<number>();
    for (let i = 0; i < count && !r.invalid; i++) requests.add(r.u16());
    if (r.invalid || r.remaining !== 0) return this.invalid(option, `malformed ${optionNames[option]} request`);
    const entry = this.context.exports.lookup(name);
    if (entry === undefined) {
      return this.reply([encodeOptionError(option, REP_ERR_UNKNOWN, `unknown export ${JSON.stringify(name)}`)]);
    }
    if (this.needsTls(entry)) {
      return this.reply([encodeOptionError(option, REP_ERR_TLS_REQD, `export ${JSON.stringify(name)} requires TLS: send NBD_OPT_STARTTLS first`)]);
    }
    if (option === OPT_GO && this.context.exportFull?.(entry) === true) {
      return this.reply([encodeOptionError(option, REP_ERR_POLICY, `export ${JSON.stringify(name)} has as many connections as it may; try again later`)]);
    }
    const flags = transmissionFlagsFor(entry, this.structuredReplies);
    const frames = [encodeOptionReply(option, REP_INFO, encodeInfoExport(entry.device.size, flags))];
    if (requests.has(INFO_NAME)) frames.push(encodeOptionReply(option, REP_INFO, encodeInfoString(INFO_NAME, entry.name)));
    if (requests.has(INFO_DESCRIPTION) && entry.description !== '') {
      frames.push(encodeOptionReply(option, REP_INFO, encodeInfoString(INFO_DESCRIPTION, entry.description)));
    }
    // Block sizes go out even unasked: clients that did not ask may ignore them, and every client
    // here honours them, which keeps requests within what we accept.
    const sizes = entry.device.blockSizes;
    const maximum = payloadBytesMaxFor(entry, this.context.requestBytesMax);
    frames.push(encodeOptionReply(option, REP_INFO, encodeInfoBlockSize(sizes.minimum, sizes.preferred, maximum)));
    frames.push(encodeOptionReply(option, REP_ACK));
    if (option === OPT_INFO) return this.reply(frames);
    return this.enter(entry, frames);
  }

  private metaContext(option: number, data: Buffer): HandshakeStep {
    const isSet = option === OPT_SET_META_CONTEXT;
    // SET replaces the selection even when it fails.
    if (isSet) {
      this.metaExportName = null;
      this.baseAllocation = false;
    }
    if (!this.structuredReplies) return this.invalid(option, 'negotiate STRUCTURED_REPLY first');
    const r = new PayloadReader(data);
    const name = r.string(r.u32());
    const count = r.u32();
    const queries: string[] = [];
    for (let i = 0; i < count && !r.invalid; i++) queries.push(r.string(r.u32()));
    if (r.invalid || r.remaining !== 0) return this.invalid(option, `malformed ${optionNames[option]} request`);
    const metaEntry = this.context.exports.lookup(name);
    // Only INFO, GO and EXPORT_NAME may answer TLS_REQD; a TLS-only export is as unknown here as in LIST.
    if (metaEntry === undefined || this.needsTls(metaEntry)) {
      return this.reply([encodeOptionError(option, REP_ERR_UNKNOWN, `unknown export ${JSON.stringify(name)}`)]);
    }
    // LIST with no queries lists everything; "base:" lists the namespace. SET selects by full name only.
    const selected = isSet
      ? queries.includes(BASE_ALLOCATION)
      : queries.length === 0 || queries.some((q) => q === BASE_ALLOCATION || q === 'base:');
    const frames: Buffer[] = [];
    if (selected) {
      frames.push(encodeOptionReply(option, REP_META_CONTEXT, encodeMetaContext(isSet ? baseAllocationContextId : 0, BASE_ALLOCATION)));
    }
    frames.push(encodeOptionReply(option, REP_ACK));
    if (isSet) {
      this.metaExportName = name;
      this.baseAllocation = selected;
    }
    return this.reply(frames);
  }
}
