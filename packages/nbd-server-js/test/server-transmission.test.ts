/**
 * Goal: every request is validated at the edge with the errno the spec assigns, replies carry the right
 * chunks and data, complete out of order without interleaving, and a dead or backpressured connection
 * behaves. Method: call `validateRequest` on a table of requests; run `Transmission` on an in-test
 * memory device with gates that hold operations open; drive whole connections with bytes for the
 * stream-level cases (oversized WRITE, DISC, backpressure). Assertions are on errnos, reply bytes and
 * data read back.
 */
import { describe, expect, it } from 'vitest';
import { buildClientFlags, buildGoOption, buildOption, buildRequest, buildSetMetaContext } from '../src/protocol/builders.js';
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
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOTSUP,
  OPT_STRUCTURED_REPLY,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_ERROR,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_OFFSET_HOLE,
  SIMPLE_REPLY_MAGIC,
} from '../src/protocol/constants.js';
import { BlockDeviceError, defaultBlockSizes, type BlockDevice } from '@gannet/block-device';
import { baseAllocationContextId, payloadBytesMaxFor, transmissionFlagsFor, type ExportEntry, type Session } from '../src/server/handshake.js';
import type { Request } from '../src/server/parser.js';
import { PayloadPool } from '../src/server/payload-pool.js';
import { requestHeldBytesMin, Transmission, validateRequest, type RequestEvent } from '../src/server/transmission.js';
import { allCaps, decodeOptionReplies, decodeReplies, entry, Gates, harness, registryOf, TestDevice, type Reply } from './server-fixtures.js';

const MiB = 1024 * 1024;

class RecordingPool extends PayloadPool {
  constructor(private readonly onRelease: (b: Buffer) => void) {
    super();
  }

  override release(buf: Buffer): void {
    this.onRelease(buf);
    super.release(buf);
  }
}

function session(e: ExportEntry, structured = true, baseAllocation = structured): Session {
  return {
    export: e,
    structuredReplies: structured,
    baseAllocation,
    transmissionFlags: transmissionFlagsFor(e, structured),
    payloadBytesMax: payloadBytesMaxFor(e, 32 * MiB),
  };
}

let nextCookie = 1;
function req(type: number, offset: number, length: number, flags = 0, payload: Buffer | null = null): Request {
  return {
    kind: 'request',
    type,
    flags,
    cookieHi: 0,
    cookieLo: nextCookie++,
    offset,
    length,
    payload: type === CMD_WRITE && payload === null && length <= 32 * MiB ? Buffer.alloc(length) : payload,
    payloadSkipped: type === CMD_WRITE && length > 32 * MiB,
  };
}

/** A device that only has a size and capabilities: for validation, which must never touch it. */
function stubDevice(size: number, caps = allCaps): BlockDevice {
  const no = () => Promise.reject(new Error('validation touched the device'));
  return { size, capabilities: caps, blockSizes: defaultBlockSizes, read: no, write: no, flush: no, trim: no, writeZeroes: no, cache: no, extents: no, close: no };
}

describe('validateRequest', () => {
  const big = entry('big', stubDevice(2 ** 40));
  const ro = entry('ro', stubDevice(MiB), { readOnly: true });
  const noFua = entry('nofua', stubDevice(MiB, { ...allCaps, fua: false, trim: false, cache: false }));
  const code = (s: Session, r: Request, shuttingDown = false) => (validateRequest(s, r, shuttingDown) as BlockDeviceError | null)?.code ?? null;
  const cases: [string, Session, Request, string | null, boolean?][] = [
    ['READ in range', session(big), req(CMD_READ, 2 ** 40 - 4096, 4096), null],
    ['zero-length READ at the end', session(big), req(CMD_READ, 2 ** 40, 0), null],
    ['unknown command', session(big), req(9, 0, 0), 'EINVAL'],
    ['RESIZE (not negotiated)', session(big), req(8, 0, 0), 'EINVAL'],
    ['READ with NO_HOLE', session(big), req(CMD_READ, 0, 1, CMD_FLAG_NO_HOLE), 'EINVAL'],
    ['READ with an undefined flag bit', session(big), req(CMD_READ, 0, 1, 1 << 9), 'EINVAL'],
    ['WRITE with REQ_ONE', session(big), req(CMD_WRITE, 0, 1, CMD_FLAG_REQ_ONE), 'EINVAL'],
    ['DF without structured replies', session(big, false), req(CMD_READ, 0, 1, CMD_FLAG_DF), 'EINVAL'],
    ['FUA not advertised', session(noFua), req(CMD_WRITE, 0, 1, CMD_FLAG_FUA), 'EINVAL'],
    ['TRIM not advertised', session(noFua), req(CMD_TRIM, 0, 1), 'EINVAL'],
    ['CACHE not advertised', session(noFua), req(CMD_CACHE, 0, 1), 'EINVAL'],
    ['WRITE on read-only', session(ro), req(CMD_WRITE, 0, 1), 'EPERM'],
    ['TRIM on read-only', session(ro), req(CMD_TRIM, 0, 1), 'EPERM'],
    ['WRITE_ZEROES on read-only', session(ro), req(CMD_WRITE_ZEROES, 0, 1), 'EPERM'],
    ['READ on read-only', session(ro), req(CMD_READ, 0, 1), null],
    ['WRITE past the end', session(big), req(CMD_WRITE, 2 ** 40 - 1, 2), 'ENOSPC'],
    ['WRITE_ZEROES past the end', session(big), req(CMD_WRITE_ZEROES, 2 ** 40, 1), 'ENOSPC'],
    ['READ past the end', session(big), req(CMD_READ, 2 ** 40, 1), 'EINVAL'],
    ['TRIM past the end', session(big), req(CMD_TRIM, 2 ** 40 - 1, 2), 'EINVAL'],
    ['BLOCK_STATUS past the end', session(big), req(CMD_BLOCK_STATUS, 2 ** 40 - 1, 2), 'EINVAL'],
    ['offset near 2^64', session(big), req(CMD_READ, 2 ** 64 - 512, 512), 'EINVAL'],
    ['READ over the payload maximum', session(big), req(CMD_READ, 0, 32 * MiB + 1), 'EINVAL'],
    ['DF READ over the payload maximum', session(big), req(CMD_READ, 0, 32 * MiB + 1, CMD_FLAG_DF), 'EOVERFLOW'],
    ['READ at the payload maximum', session(big), req(CMD_READ, 0, 32 * MiB), null],
    ['WRITE whose payload was skipped', session(big), req(CMD_WRITE, 0, 32 * MiB + 1), 'EINVAL'],
    ['TRIM of 1 GiB', session(big), req(CMD_TRIM, 0, 1024 * MiB), null],
    ['WRITE_ZEROES of 4 GiB - 1', session(big), req(CMD_WRITE_ZEROES, 0, 2 ** 32 - 1, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO), null],
    ['BLOCK_STATUS of 4 GiB - 1', session(big), req(CMD_BLOCK_STATUS, 0, 2 ** 32 - 1, CMD_FLAG_REQ_ONE), null],
    ['BLOCK_STATUS without a context', session(big, true, false), req(CMD_BLOCK_STATUS, 0, 512), 'EINVAL'],
    ['zero-length BLOCK_STATUS', session(big), req(CMD_BLOCK_STATUS, 0, 0), 'EINVAL'],
    ['FLUSH with an offset', session(big), req(CMD_FLUSH, 512, 0), 'EINVAL'],
    ['FLUSH', session(big), req(CMD_FLUSH, 0, 0, CMD_FLAG_FUA), null],
    ['READ while shutting down', session(big), req(CMD_READ, 0, 1), 'ESHUTDOWN', true],
  ];
  for (const [name, s, r, expected, shuttingDown] of cases) {
    it(`${name}: ${expected ?? 'accepted'}`, () => {
      expect(code(s, r, shuttingDown)).toBe(expected);
    });
  }
});

interface Run {
  readonly t: Transmission;
  readonly sent: Buffer[][];
  readonly events: RequestEvent[];
  /** Buffers handed back to the pool, in order. */
  readonly released: Buffer[];
  /** The pool buffer each reply was sent with, in the order of `sent`. */
  readonly lent: (Buffer | null)[];
  /** Where large WRITE payloads must come from, as the parser takes them. */
  readonly pool: PayloadPool;
  settledCount: number;
  /** Resolves once `n` replies have been sent. */
  replies(n: number): Promise<Reply[]>;
}

function run(device: BlockDevice, options: { structured?: boolean; readOnly?: boolean } = {}): Run {
  const structured = options.structured ?? true;
  const sent: Buffer[][] = [];
  const events: RequestEvent[] = [];
  const waiters: (() => void)[] = [];
  const r: Run = {
    t: undefined as unknown as Transmission,
    sent,
    events,
    released: [],
    lent: [],
    pool: new RecordingPool((b) => r.released.push(b)),
    settledCount: 0,
    async replies(n) {
      while (sent.length < n) await new Promise<void>((resolve) => waiters.push(resolve));
      return sent.map((frames) => {
        const decoded = decodeReplies(Buffer.concat(frames), readLengths);
        expect(decoded.rest.length).toBe(0);
        return decoded.replies;
      }).flat();
    },
  };
  const readLengths = new Map<bigint, number>();
  (r as { t: Transmission }).t = new Transmission(session(entry('e', device, { readOnly: options.readOnly }), structured), {
    send: (frames, lent) => {
      sent.push(frames);
      r.lent.push(lent);
      for (const w of waiters.splice(0)) w();
    },
    settled: () => {
      r.settledCount += 1;
    },
    wantsEvents: () => true,
    event: (ev) => events.push(ev),
    isShuttingDown: () => false,
    pool: r.pool,
  });
  const handle = r.t.handle.bind(r.t);
  r.t.handle = (q: Request) => {
    if (q.type === CMD_READ) readLengths.set(BigInt(q.cookieLo), q.length);
    handle(q);
  };
  return r;
}

function chunks(replies: Reply[]) {
  return replies.map((x) => {
    if (x.kind !== 'chunk') throw new Error('expected a structured chunk');
    return x;
  });
}

/** Reassembles a structured READ reply into bytes, checking chunk rules on the way. */
function reassemble(replies: Reply[], offset: number, length: number): Buffer {
  const out = Buffer.alloc(length, 0xee);
  const covered = new Uint8Array(length);
  const cs = chunks(replies);
  cs.forEach((c, i) => expect(c.flags & REPLY_FLAG_DONE).toBe(i === cs.length - 1 ? REPLY_FLAG_DONE : 0));
  for (const c of cs) {
    if (c.type === REPLY_TYPE_NONE) continue;
    const at = Number(c.payload.readBigUInt64BE(0)) - offset;
    const n = c.type === REPLY_TYPE_OFFSET_DATA ? c.payload.length - 8 : c.payload.readUInt32BE(8);
    expect(c.type === REPLY_TYPE_OFFSET_DATA || c.type === REPLY_TYPE_OFFSET_HOLE).toBe(true);
    expect(n).toBeGreaterThan(0);
    expect(at >= 0 && at + n <= length).toBe(true);
    expect(covered.subarray(at, at + n).every((b) => b === 0)).toBe(true);
    covered.fill(1, at, at + n);
    if (c.type === REPLY_TYPE_OFFSET_DATA) c.payload.copy(out, at, 8);
    else out.fill(0, at, at + n);
  }
  expect(covered.every((b) => b === 1)).toBe(true);
  return out;
}

describe('Transmission: READ', () => {
  it('structured: zero ranges of a large read go out as holes, the rest as data, DONE on the last', async () => {
    const d = new TestDevice(MiB);
    d.data.fill(0x5a, 8192, 12288);
    d.allocated[2] = 1;
    d.data.fill(0x6b, 200_000, 200_100);
    d.allocated[Math.floor(200_000 / 4096)] = 1;
    const r = run(d);
    r.t.handle(req(CMD_READ, 4096, 256 * 1024));
    const replies = await r.replies(1);
    const types = chunks(replies).map((c) => c.type);
    expect(types).toContain(REPLY_TYPE_OFFSET_HOLE);
    expect(types).toContain(REPLY_TYPE_OFFSET_DATA);
    expect(reassemble(replies, 4096, 256 * 1024).equals(d.data.subarray(4096, 4096 + 256 * 1024))).toBe(true);
  });

  it('DF: exactly one data chunk with the zeroes present', async () => {
    const d = new TestDevice(MiB);
    d.data.fill(0x11, 0, 10);
    d.allocated[0] = 1;
    const r = run(d);
    r.t.handle(req(CMD_READ, 0, 128 * 1024, CMD_FLAG_DF));
    const cs = chunks(await r.replies(1));
    expect(cs.map((c) => [c.type, c.flags])).toEqual([[REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE]]);
    expect(cs[0].payload.subarray(8).equals(d.data.subarray(0, 128 * 1024))).toBe(true);
  });

  it('simple: header then exactly the data; an error sends no data', async () => {
    const d = new TestDevice(MiB);
    d.data.write('hello', 100);
    const r = run(d, { structured: false });
    r.t.handle(req(CMD_READ, 100, 5));
    const [ok] = await r.replies(1);
    expect(ok).toMatchObject({ kind: 'simple', error: 0 });
    expect(ok.kind === 'simple' && ok.data.toString()).toBe('hello');
    expect(r.sent[0][1].length).toBe(5);
    d.fail.read = new BlockDeviceError('EIO', 'media error');
    r.t.handle(req(CMD_READ, 0, 4096));
    const all = await r.replies(2);
    expect(all[1]).toMatchObject({ kind: 'simple', error: NBD_EIO });
    expect(Buffer.concat(r.sent[1]).length).toBe(16);
  });

  it('structured error: one ERROR chunk, flagged DONE, with the errno and message', async () => {
    const d = new TestDevice(MiB);
    d.fail.read = new BlockDeviceError('EIO', 'media error');
    const r = run(d);
    r.t.handle(req(CMD_READ, 0, 4096));
    const [c] = chunks(await r.replies(1));
    expect([c.type, c.flags, c.payload.readUInt32BE(0)]).toEqual([REPLY_TYPE_ERROR, REPLY_FLAG_DONE, NBD_EIO]);
    expect(c.payload.toString('utf8', 6, 6 + c.payload.readUInt16BE(4))).toBe('media error');
    expect(r.events.map((e) => [e.command, e.error])).toEqual([['read', 'EIO']]);
  });

  it('zero-length: answered without touching the device', async () => {
    const d = new TestDevice(MiB);
    const r = run(d);
    r.t.handle(req(CMD_READ, 0, 0));
    expect(chunks(await r.replies(1)).map((c) => [c.type, c.flags])).toEqual([[REPLY_TYPE_NONE, REPLY_FLAG_DONE]]);
    expect(d.calls).toEqual([]);
  });
});

describe('Transmission: writes, zeroes, block status', () => {
  it('WRITE then READ returns the data; FUA reaches the device', async () => {
    const d = new TestDevice(MiB);
    const r = run(d);
    r.t.handle(req(CMD_WRITE, 777, 3, CMD_FLAG_FUA, Buffer.from('xyz')));
    await r.replies(1);
    expect(d.data.toString('utf8', 777, 780)).toBe('xyz');
    expect(d.calls[0]).toMatchObject({ verb: 'write', offset: 777, length: 3, options: { fua: true } });
  });

  it('WRITE_ZEROES: NO_HOLE passes through; FAST_ZERO on a device that cannot is ENOTSUP without device work', async () => {
    const slow = new TestDevice(MiB, { ...allCaps, fastZero: false });
    const r = run(slow);
    const plain = req(CMD_WRITE_ZEROES, 0, 4096, CMD_FLAG_NO_HOLE);
    const fast = req(CMD_WRITE_ZEROES, 0, 4096, CMD_FLAG_FAST_ZERO);
    r.t.handle(plain);
    r.t.handle(fast);
    const replies = new Map((await r.replies(2)).map((x) => [x.cookie, x]));
    expect(slow.calls).toEqual([{ verb: 'zero', offset: 0, length: 4096, options: { fua: false, noHole: true, fastZero: false } }]);
    expect(replies.get(BigInt(plain.cookieLo))).toMatchObject({ kind: 'simple', error: 0 });
    expect(chunks([replies.get(BigInt(fast.cookieLo))!])[0].payload.readUInt32BE(0)).toBe(NBD_ENOTSUP);
  });

  it('BLOCK_STATUS: one chunk for base:allocation, extents merged and clipped to the request', async () => {
    const d = new TestDevice(MiB);
    d.allocated[1] = 1;
    d.allocated[2] = 1;
    const r = run(d);
    r.t.handle(req(CMD_BLOCK_STATUS, 100, 3 * 4096));
    r.t.handle(req(CMD_BLOCK_STATUS, 100, 3 * 4096, CMD_FLAG_REQ_ONE));
    const cs = chunks(await r.replies(2));
    const descriptors = (c: (typeof cs)[number]) => {
      const out: number[][] = [];
      for (let at = 4; at < c.payload.length; at += 8) out.push([c.payload.readUInt32BE(at), c.payload.readUInt32BE(at + 4)]);
      return out;
    };
    for (const c of cs) expect([c.type, c.flags, c.payload.readUInt32BE(0)]).toEqual([REPLY_TYPE_BLOCK_STATUS, REPLY_FLAG_DONE, baseAllocationContextId]);
    expect(descriptors(cs[0])).toEqual([
      [4096 - 100, 3],
      [8192, 0],
      [100, 3],
    ]);
    expect(descriptors(cs[1])).toEqual([[4096 - 100, 3]]);
  });

  it('a device returning a bad extent is an EIO error reply, not a crash', async () => {
    const d = new TestDevice(MiB);
    d.extents = async () => [{ length: 0, flags: 0 }];
    const r = run(d);
    r.t.handle(req(CMD_BLOCK_STATUS, 0, 4096));
    expect(chunks(await r.replies(1))[0].payload.readUInt32BE(0)).toBe(NBD_EIO);
  });
});

describe('Transmission: concurrency', () => {
  it('replies complete out of order, each whole', async () => {
    const d = new TestDevice(MiB);
    d.data.fill(0x22, 0, 4096);
    d.data.fill(0x33, 4096, 8192);
    const gates = new Gates();
    d.gate = gates.gate;
    const r = run(d, { structured: false });
    const first = req(CMD_READ, 0, 4096);
    const second = req(CMD_READ, 4096, 4096);
    r.t.handle(first);
    r.t.handle(second);
    await gates.until(2);
    expect(r.t.inflightCount).toBe(2);
    expect(r.t.inflightBytes).toBe(8192);
    gates.release('read@4096');
    gates.release('read@0');
    const replies = await r.replies(2);
    expect(replies.map((x) => x.cookie)).toEqual([BigInt(second.cookieLo), BigInt(first.cookieLo)]);
    expect(replies.map((x) => x.kind === 'simple' && x.data[0])).toEqual([0x33, 0x22]);
    expect(r.t.inflightBytes).toBe(0);
  });

  it('a WRITE payload is handed back for reuse only once the device write has settled, failed ones too', async () => {
    const d = new TestDevice(MiB);
    const gates = new Gates();
    d.gate = gates.gate;
    const r = run(d);
    const payload = r.pool.acquire(8192).fill(0x5a);
    r.t.handle(req(CMD_WRITE, 0, 8192, 0, payload));
    await gates.until(1);
    expect(r.released).toEqual([]);
    gates.release('write@0');
    await r.replies(1);
    expect(r.released).toHaveLength(1);
    expect(r.released[0]).toBe(payload);
    expect(d.data.subarray(0, 8192).equals(payload)).toBe(true);
    const refused = Buffer.alloc(512);
    r.t.handle(req(CMD_WRITE, MiB, 512, 0, refused));
    await r.replies(2);
    expect(r.released[1]).toBe(refused);
  });

  it('a large READ sends its pooled buffer along, to be handed back after the socket write; a failed one hands it back at once', async () => {
    const d = new TestDevice(MiB);
    d.data.fill(0x77, 0, 256 * 1024);
    const r = run(d, { structured: false });
    r.t.handle(req(CMD_READ, 0, 256 * 1024));
    const [reply] = await r.replies(1);
    expect(reply.kind === 'simple' && reply.data.equals(Buffer.alloc(256 * 1024, 0x77))).toBe(true);
    expect(r.released).toEqual([]);
    expect(r.lent[0]?.length).toBe(256 * 1024);
    expect(r.sent[0][1]).toBe(r.lent[0]);
    d.fail.read = new BlockDeviceError('EIO', 'media error');
    r.t.handle(req(CMD_READ, 0, 128 * 1024));
    await r.replies(2);
    expect(r.lent[1]).toBeNull();
    expect(r.released.map((b) => b.length)).toEqual([128 * 1024]);
  });

  it('in-flight bytes count what pooled buffers really hold, a whole power-of-two class', async () => {
    const d = new TestDevice(4 * MiB);
    const gates = new Gates();
    d.gate = gates.gate;
    const r = run(d, { structured: false });
    r.t.handle(req(CMD_WRITE, 0, MiB + 1, 0, r.pool.acquire(MiB + 1)));
    r.t.handle(req(CMD_READ, 2 * MiB, 64 * 1024 + 1));
    r.t.handle(req(CMD_WRITE, 3 * MiB, 100, 0, Buffer.alloc(100)));
    await gates.until(3);
    expect(r.t.inflightBytes).toBe(2 * MiB + 128 * 1024 + requestHeldBytesMin);
    for (const key of [...gates.parked]) gates.release(key);
    await r.replies(3);
    expect(r.t.inflightBytes).toBe(0);
  });

  it('a split READ with a failed piece keeps its buffer until every piece has settled', async () => {
    const d = new TestDevice(MiB);
    d.allocated.fill(1, 0, 16);
    d.allocated.fill(1, 48, 64);
    const gates = new Gates();
    const r = run(d);
    r.t.handle(req(CMD_READ, 0, 256 * 1024));
    // After the extents query (already under way), before the two data reads start.
    d.gate = gates.gate;
    await gates.until(2);
    expect(gates.parked).toEqual(['read@0', 'read@196608']);
    d.fail.read = new BlockDeviceError('EIO', 'media error');
    gates.release('read@0');
    for (let i = 0; i < 10; i++) await new Promise<void>((resolve) => setImmediate(resolve));
    expect(r.sent).toEqual([]);
    expect(r.released).toEqual([]);
    gates.release('read@196608');
    const [reply] = await r.replies(1);
    expect(reply).toMatchObject({ kind: 'chunk', type: REPLY_TYPE_ERROR });
    expect(r.released.map((b) => b.length)).toEqual([256 * 1024]);
  });

  it('after kill, finished work sends nothing but still settles', async () => {
    const d = new TestDevice(MiB);
    const gates = new Gates();
    d.gate = gates.gate;
    const r = run(d);
    r.t.handle(req(CMD_FLUSH, 0, 0));
    await gates.until(1);
    r.t.kill();
    gates.release('flush@0');
    await new Promise<void>((resolve) => setImmediate(resolve));
    expect(r.sent).toEqual([]);
    expect(r.settledCount).toBe(1);
  });
});

describe('Connection: stream-level behaviour', () => {
  async function connect(device: TestDevice, limits = {}) {
    const h = harness(registryOf([entry('', device)]), limits);
    h.push(Buffer.concat([buildClientFlags(3), buildOption(OPT_STRUCTURED_REPLY), buildSetMetaContext('', ['base:allocation']), buildGoOption('')]));
    for (;;) {
      const out = await h.waitBytes(h.output().length + 1);
      const { replies } = decodeOptionReplies(out.subarray(18));
      if (replies.length >= 6) return { h, start: out.length };
    }
  }

  it('an oversized WRITE is refused EINVAL and the next request still works', async () => {
    const d = new TestDevice(MiB);
    const { h, start } = await connect(d, { requestBytesMax: 64 * 1024, writeSkipBytesMax: 128 * 1024 });
    const big = 64 * 1024 + 1;
    h.push(buildRequest({ type: CMD_WRITE, cookie: 1, offset: 0, length: big }, Buffer.alloc(big, 7)));
    h.push(buildRequest({ type: CMD_WRITE, cookie: 2, offset: 0, length: 2 }, Buffer.from('ok')));
    let replies: Reply[] = [];
    while (replies.length < 2) replies = decodeReplies((await h.waitBytes(h.output().length + 1)).subarray(start)).replies;
    const byCookie = new Map(replies.map((x) => [x.cookie, x]));
    const refused = byCookie.get(1n)!;
    expect(refused.kind === 'chunk' && refused.payload.readUInt32BE(0)).toBe(NBD_EINVAL);
    expect(byCookie.get(2n)).toMatchObject({ kind: 'simple', error: 0 });
    expect(d.data.toString('utf8', 0, 2)).toBe('ok');
  });

  it('DISC: in-flight requests finish and are answered, then the connection closes', async () => {
    const d = new TestDevice(MiB);
    const gates = new Gates();
    const { h, start } = await connect(d);
    d.gate = gates.gate;
    h.push(buildRequest({ type: CMD_WRITE, cookie: 1, offset: 0, length: 1 }, Buffer.from('a')));
    h.push(buildRequest({ type: CMD_DISC, cookie: 2, offset: 0, length: 0 }));
    await gates.until(1);
    expect(h.socket.ended).toBe(false);
    gates.release('write@0');
    await h.connection.closed;
    const { replies } = decodeReplies(h.output().subarray(start));
    expect(replies).toEqual([expect.objectContaining({ kind: 'simple', error: 0, cookie: 1n })]);
  });

  it('stops reading while in-flight bytes exceed the bound, and resumes when they drain', async () => {
    const d = new TestDevice(MiB);
    const gates = new Gates();
    const { h } = await connect(d, { inflightBytesMax: 64 * 1024 });
    d.gate = gates.gate;
    for (let i = 0; i < 8; i++) h.push(buildRequest({ type: CMD_READ, cookie: 10 + i, offset: i * 32 * 1024, length: 32 * 1024 }));
    await gates.until(2);
    // Two 32 KiB reads fill the 64 KiB budget; the other six wait unparsed.
    await new Promise<void>((resolve) => setImmediate(resolve));
    expect(d.calls.filter((c) => c.verb === 'read').length).toBe(2);
    for (let i = 0; i < 8; i++) {
      await gates.until(1);
      gates.release(gates.parked[0]);
    }
    for (;;) {
      const out = h.output();
      if (d.calls.filter((c) => c.verb === 'read').length === 8 && gates.parked.length === 0) break;
      await h.waitBytes(out.length + 1);
    }
    expect(d.calls.filter((c) => c.verb === 'read').length).toBe(8);
  });

  it('counts every request against the in-flight bound, so payload-free requests are bounded in number too', async () => {
    const d = new TestDevice(MiB);
    const gates = new Gates();
    const { h } = await connect(d, { inflightBytesMax: 16 * requestHeldBytesMin });
    d.gate = gates.gate;
    for (let i = 0; i < 40; i++) h.push(buildRequest({ type: CMD_TRIM, cookie: 100 + i, offset: i * 512, length: 512 }));
    await gates.until(16);
    await new Promise<void>((resolve) => setImmediate(resolve));
    expect(d.calls.filter((c) => c.verb === 'trim').length).toBe(16);
    for (let released = 0; released < 40; released++) {
      await gates.until(1);
      gates.release(gates.parked[0]);
    }
    for (;;) {
      const out = h.output();
      if (d.calls.filter((c) => c.verb === 'trim').length === 40 && gates.parked.length === 0) break;
      await h.waitBytes(out.length + 1);
    }
    expect(d.calls.filter((c) => c.verb === 'trim').length).toBe(40);
  });

  it('a bad magic mid-stream disconnects', async () => {
    const d = new TestDevice(MiB);
    const { h } = await connect(d);
    h.push(Buffer.alloc(28, 0xff));
    await h.connection.closed;
    expect(d.calls).toEqual([]);
  });

  it('simple replies when structured replies were not negotiated', async () => {
    const d = new TestDevice(MiB);
    const h = harness(registryOf([entry('', d)]));
    h.push(Buffer.concat([buildClientFlags(3), buildGoOption('')]));
    let out = await h.waitBytes(18 + 1);
    while (decodeOptionReplies(out.subarray(18)).replies.length < 3) out = await h.waitBytes(out.length + 1);
    const start = out.length;
    h.push(buildRequest({ type: CMD_FLUSH, cookie: 3, offset: 0, length: 0 }));
    out = await h.waitBytes(start + 16);
    expect(out.readUInt32BE(start)).toBe(SIMPLE_REPLY_MAGIC);
  });
});
