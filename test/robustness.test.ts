/**
 * Goal: no client can crash the CLI, grow its memory without bound, or disturb another client. Each
 * hostile input gets the answer the protocol prescribes (an error reply that keeps the stream in step,
 * or a clean close), while a well-behaved NbdClient on its own connection keeps reading back exactly
 * what it wrote, and the server process stays alive.
 * Method: one CLI with a memory disk per file (a read-only one where needed); hostile connections speak
 * raw bytes built with the package's builders; a "monitor" NbdClient owns a disjoint region of the disk
 * and is checked after every case. fast-check drives random garbage and random valid-but-hostile
 * request sequences (bounded runs, bounded sizes); a last test reads the server's VmRSS around ~250 MiB
 * of hostile traffic.
 *
 * Disk layout (memory disk, 64 MiB): [0, 16 MiB) hostile writes land here; [32 MiB, 48 MiB) belongs to
 * the monitor; hostile requests never address anything else except past the end.
 */
import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import {
  buildClientFlags,
  buildGoOption,
  buildInfoOption,
  buildOption,
  buildRequest,
  CMD_BLOCK_STATUS,
  CMD_FLAG_DF,
  CMD_FLAG_FUA,
  CMD_FLAG_NO_HOLE,
  CMD_FLAG_REQ_ONE,
  CMD_FLUSH,
  CMD_READ,
  CMD_TRIM,
  CMD_WRITE,
  CMD_WRITE_ZEROES,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  INFO_EXPORT,
  NBD_EINVAL,
  NBD_ENOSPC,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NbdClient,
  OPT_STRUCTURED_REPLY,
  REP_ACK,
  REP_ERR_UNSUP,
  REP_INFO,
} from 'nbd-server-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startNbdCli, type NbdCli } from './helpers/nbd-cli.js';
import { ClosedError, negotiate, RawConn, readGreeting, readOptionReply, readReply, type Reply } from './helpers/raw-nbd.js';
import { rssBytes, stopAllProcesses } from './helpers/process.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const diskBytes = 64 * MiB;
const hostileRegionBytes = 16 * MiB;
const monitorOffset = 32 * MiB;
const monitorSlotBytes = 64 * KiB;
const monitorSlots = 256; // 16 MiB
/** Errors the spec allows on the wire. */
const wireErrnos = new Set([1, 5, 12, 22, 28, 75, 95, 108]);
/** How long the server gets to close a connection it must close. */
const closeTimeoutMs = 5_000;

let cli: NbdCli;
let roCli: NbdCli;
let monitor: NbdClient;
let roMonitor: NbdClient;
const monitorModel = new Map<number, Buffer>();
let monitorChecks = 0;

/**
 * The well-behaved client's check: write a fresh pattern into the next slot, read it back, and re-read
 * a few earlier slots; plus the server process is alive.
 */
async function checkMonitor(): Promise<void> {
  expect(cli.proc.alive(), `server died:\n${cli.proc.stderr()}`).toBe(true);
  const slot = monitorChecks++ % monitorSlots;
  const data = randomBytes(monitorSlotBytes);
  const offset = monitorOffset + slot * monitorSlotBytes;
  await monitor.write(data, offset);
  monitorModel.set(slot, data);
  const back = await monitor.readBytes(offset, monitorSlotBytes);
  expect(back.equals(data), `monitor slot ${slot} reads back`).toBe(true);
  const slots = [...monitorModel.keys()];
  for (let i = 0; i < 3 && slots.length > 0; i++) {
    const s = slots[Math.floor(Math.random() * slots.length)];
    const got = await monitor.readBytes(monitorOffset + s * monitorSlotBytes, monitorSlotBytes);
    expect(got.equals(monitorModel.get(s)!), `monitor slot ${s} intact`).toBe(true);
  }
}

async function checkAll(): Promise<void> {
  await checkMonitor();
  expect(roCli.proc.alive(), `read-only server died:\n${roCli.proc.stderr()}`).toBe(true);
  const b = await roMonitor.readBytes(0, 4096);
  expect(b.equals(Buffer.alloc(4096)), 'read-only disk unchanged').toBe(true);
}

async function connected(target: NbdCli = cli, options: Parameters<typeof negotiate>[1] = {}) {
  const c = await RawConn.connect(target.address);
  const n = await negotiate(c, options);
  return { c, n };
}

/** Expects the server to close this connection (without us closing first). */
async function expectClosed(c: RawConn, why: string): Promise<void> {
  expect(await c.waitClosed(closeTimeoutMs), `server should close the connection: ${why}`).toBe(true);
}

const readLookup = (reqs: Map<bigint, { offset: number; length: number }>) => (cookie: bigint) => reqs.get(cookie);

/** Sends one request and returns its reply; READs are looked up by cookie. */
async function roundTrip(c: RawConn, header: Parameters<typeof buildRequest>[0], payload?: Uint8Array): Promise<Reply> {
  const reads = new Map<bigint, { offset: number; length: number }>();
  if (header.type === CMD_READ) reads.set(BigInt(header.cookie), { offset: Number(header.offset), length: header.length });
  await c.write(buildRequest(header, payload));
  const r = await readReply(c, readLookup(reads));
  expect(r.cookie).toBe(BigInt(header.cookie));
  return r;
}

/** A READ of hostile-region bytes that must succeed: proves the stream is still in step. */
async function expectInStep(c: RawConn, cookie: number, expected?: Buffer): Promise<void> {
  const r = await roundTrip(c, { type: CMD_READ, cookie, offset: 0, length: 4096 });
  expect(r.error).toBe(0);
  expect(r.data).toHaveLength(4096);
  if (expected) expect(r.data!.equals(expected)).toBe(true);
}

beforeAll(async () => {
  cli = await startNbdCli({ memory: diskBytes });
  roCli = await startNbdCli({ memory: MiB, readOnly: true });
  monitor = await NbdClient.connect(cli.address);
  roMonitor = await NbdClient.connect(roCli.address);
  await checkAll();
});

afterAll(async () => {
  try {
    if (monitor) {
      // Every slot the monitor wrote is intact at the end.
      for (const [slot, data] of monitorModel) {
        const got = await monitor.readBytes(monitorOffset + slot * monitorSlotBytes, monitorSlotBytes);
        expect(got.equals(data), `monitor slot ${slot} intact at the end`).toBe(true);
      }
      await monitor.close();
    }
    await roMonitor?.close();
  } finally {
    await stopAllProcesses();
  }
});

describe('handshake abuse', () => {
  it('closes on unknown client flags', async () => {
    const c = await RawConn.connect(cli.address);
    await readGreeting(c);
    await c.write(buildClientFlags(FLAG_C_FIXED_NEWSTYLE | 0x4000_0000));
    await expectClosed(c, 'unknown client flag');
    await checkAll();
  });

  it('closes on a bad option magic', async () => {
    const c = await RawConn.connect(cli.address);
    await readGreeting(c);
    await c.write(buildClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES));
    const opt = buildOption(OPT_STRUCTURED_REPLY);
    opt.write('NOTMAGIC', 0, 'latin1');
    await c.write(opt);
    await expectClosed(c, 'bad IHAVEOPT');
    await checkAll();
  });

  it('closes on an oversized option length without waiting for the payload', async () => {
    for (const length of [256 * MiB, 0xffff_ffff]) {
      const c = await RawConn.connect(cli.address);
      await readGreeting(c);
      await c.write(buildClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES));
      const opt = buildOption(0x1234);
      opt.writeUInt32BE(length, 12);
      await c.write(opt);
      await expectClosed(c, `option length ${length}`);
    }
    await checkAll();
  });

  it('closes after too many options (bounded: 100k options)', async () => {
    const c = await RawConn.connect(cli.address);
    await readGreeting(c);
    await c.write(buildClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES));
    const perBatch = 1000;
    const batch = Buffer.concat(Array.from({ length: perBatch }, () => buildOption(0x1234, Buffer.alloc(8))));
    const batchesMax = 100;
    // Count the answers while sending, so neither side's buffers fill up.
    let answered = 0;
    const counting = (async () => {
      for (;;) {
        const r = await readOptionReply(c);
        expect(r.type).toBe(REP_ERR_UNSUP);
        answered++;
      }
    })().catch((err: unknown) => {
      if (!(err instanceof ClosedError)) throw err;
    });
    for (let i = 0; i < batchesMax && !c.isClosed; i++) {
      if (!(await c.write(batch))) break;
    }
    await expectClosed(c, 'too many options');
    await counting;
    // Some options were answered (the cap is not "close on the first unknown option"), far from all.
    expect(answered).toBeGreaterThan(0);
    expect(answered, 'the server must cap the option count').toBeLessThan(batchesMax * perBatch);
    await checkAll();
  });

  it('answers an unknown option with ERR_UNSUP, consumes its payload, and GO still works', async () => {
    const c = await RawConn.connect(cli.address);
    await readGreeting(c);
    await c.write(buildClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES));
    // The payload looks like another option header: a server that skips it wrongly gets out of step.
    await c.write(buildOption(0x1234, buildOption(OPT_STRUCTURED_REPLY)));
    const unsup = await readOptionReply(c);
    expect(unsup.option).toBe(0x1234);
    expect(unsup.type).toBe(REP_ERR_UNSUP);
    await c.write(buildOption(OPT_STRUCTURED_REPLY));
    expect((await readOptionReply(c)).type).toBe(REP_ACK);
    // INFO on an unknown export, then GO on the default one.
    await c.write(buildInfoOption('no-such-export', [INFO_EXPORT]));
    const unknown = await readOptionReply(c);
    expect(unknown.type & 0x8000_0000).not.toBe(0);
    await c.write(buildGoOption(''));
    let size = -1;
    for (;;) {
      const r = await readOptionReply(c);
      if (r.type === REP_ACK) break;
      expect(r.type).toBe(REP_INFO);
      if (r.payload.readUInt16BE(0) === INFO_EXPORT) size = Number(r.payload.readBigUInt64BE(2));
    }
    expect(size).toBe(diskBytes);
    await expectInStep(c, 7);
    c.destroy();
    await checkAll();
  });

  it('survives frames truncated at every stage, then a close', async () => {
    const stages: ((c: RawConn) => Promise<void>)[] = [
      async (c) => {
        await c.write(Buffer.from([0, 0]));
      },
      async (c) => {
        await readGreeting(c);
        await c.write(buildClientFlags(FLAG_C_FIXED_NEWSTYLE).subarray(0, 3));
      },
      async (c) => {
        await readGreeting(c);
        await c.write(buildClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES));
        await c.write(buildGoOption('').subarray(0, 11));
      },
      async (c) => {
        await readGreeting(c);
        await c.write(buildClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES));
        await c.write(buildGoOption('').subarray(0, 21));
      },
      async (c) => {
        await negotiate(c);
        await c.write(buildRequest({ type: CMD_READ, cookie: 1, offset: 0, length: 512 }).subarray(0, 13));
      },
      async (c) => {
        await negotiate(c);
        await c.write(buildRequest({ type: CMD_WRITE, cookie: 1, offset: 0, length: 512 }, Buffer.alloc(100, 1)));
      },
    ];
    for (const stage of stages) {
      const c = await RawConn.connect(cli.address);
      await stage(c);
      c.socket.end();
      await expectClosed(c, 'client half-closed mid-frame');
      await checkMonitor();
    }
    await checkAll();
  });

  it('cuts a WRITE mid-payload without applying any of it', async () => {
    const { c } = await connected();
    const target = 8 * MiB;
    await c.write(buildRequest({ type: CMD_WRITE, cookie: 1, offset: target, length: MiB }, Buffer.alloc(512 * KiB, 0xee)));
    c.destroy();
    await c.closed;
    await checkMonitor();
    const { c: c2 } = await connected();
    const r = await roundTrip(c2, { type: CMD_READ, cookie: 2, offset: target, length: MiB });
    expect(r.error).toBe(0);
    expect(r.data!.equals(Buffer.alloc(MiB)), 'a write whose payload never arrived must not be applied').toBe(true);
    c2.destroy();
  });
});

describe('transmission abuse', () => {
  it('closes on a bad request magic', async () => {
    const { c } = await connected();
    const req = buildRequest({ type: CMD_READ, cookie: 1, offset: 0, length: 512 });
    req.writeUInt32BE(0xdeadbeef, 0);
    await c.write(req);
    await expectClosed(c, 'bad request magic');
    await checkAll();
  });

  it('answers an unknown command with EINVAL and keeps the connection', async () => {
    for (const structured of [true, false]) {
      const { c } = await connected(cli, { structured });
      for (const type of [9, 42, 0xffff]) {
        const r = await roundTrip(c, { type, cookie: type, offset: 0, length: 0 });
        expect(r.error, `command ${type}`).toBe(NBD_EINVAL);
      }
      await expectInStep(c, 100);
      c.destroy();
    }
    await checkAll();
  });

  it('answers unknown and inapplicable flags with EINVAL, consuming WRITE payloads', async () => {
    const { c } = await connected(cli, { structured: true });
    const payload = Buffer.alloc(4096, 0x5c);
    const cases: [string, number, number, Buffer | undefined][] = [
      ['READ with an unknown flag', CMD_READ, 1 << 14, undefined],
      ['READ with NO_HOLE', CMD_READ, CMD_FLAG_NO_HOLE, undefined],
      ['READ with REQ_ONE', CMD_READ, CMD_FLAG_REQ_ONE, undefined],
      ['WRITE with an unknown flag', CMD_WRITE, 1 << 14, payload],
      ['WRITE with DF', CMD_WRITE, CMD_FLAG_DF, payload],
      ['WRITE with REQ_ONE', CMD_WRITE, CMD_FLAG_REQ_ONE, payload],
      ['FLUSH with an unknown flag', CMD_FLUSH, 1 << 13, undefined],
      ['TRIM with DF', CMD_TRIM, CMD_FLAG_DF, undefined],
    ];
    let cookie = 1;
    for (const [what, type, flags, data] of cases) {
      const r = await roundTrip(c, { type, flags, cookie: cookie++, offset: 0, length: data?.length ?? 4096 }, data);
      expect(r.error, what).toBe(NBD_EINVAL);
    }
    // None of the rejected writes landed, and the stream is in step.
    await expectInStep(c, cookie++, Buffer.alloc(4096));
    c.destroy();
    await checkAll();
  });

  // The server documents (NbdServer.writeSkipBytesMax): READ over the maximum payload -> EINVAL (EOVERFLOW
  // with DF); WRITE over it -> EINVAL with the payload read and dropped, up to twice the maximum; a WRITE
  // longer than that closes the connection instead of reading gigabytes.
  it('rejects oversized READ and WRITE lengths as documented: EINVAL in step, or close past 2x', async () => {
    const { c, n } = await connected();
    expect(n.blockSizes, 'GO with INFO_BLOCK_SIZE returns block sizes').toBeDefined();
    const maximum = n.blockSizes!.maximum;
    const tooBig = maximum + 1;
    const big = await roundTrip(c, { type: CMD_READ, cookie: 1, offset: 0, length: tooBig });
    expect(big.error).toBe(NBD_EINVAL);
    const df = await roundTrip(c, { type: CMD_READ, flags: CMD_FLAG_DF, cookie: 2, offset: 0, length: tooBig });
    expect(df.error).toBe(NBD_EOVERFLOW);
    await expectInStep(c, 3, Buffer.alloc(4096));

    // The rejected payload starts like a READ request: a server that does not drop it all gets confused.
    const payload = Buffer.alloc(tooBig, 0x77);
    buildRequest({ type: CMD_READ, cookie: 99, offset: 0, length: 512 }).copy(payload, 0);
    void c.write(buildRequest({ type: CMD_WRITE, cookie: 4, offset: 0, length: tooBig }, payload));
    const w = await readReply(c, () => undefined);
    expect(w.cookie).toBe(4n);
    expect(w.error).toBe(NBD_EINVAL);
    await expectInStep(c, 5, Buffer.alloc(4096));

    // Past twice the maximum the header alone ends the connection.
    await c.write(buildRequest({ type: CMD_WRITE, cookie: 6, offset: 0, length: 0xffff_ffff }));
    await expectClosed(c, 'WRITE length 4 GiB - 1');
    await checkAll();
  });

  it('answers a WRITE to a read-only export with EPERM and stays in step', async () => {
    const { c, n } = await connected(roCli);
    expect(n.transmissionFlags & 2).toBe(2);
    const data = Buffer.alloc(8192, 0x99);
    const r = await roundTrip(c, { type: CMD_WRITE, cookie: 1, offset: 0, length: data.length }, data);
    expect(r.error).toBe(NBD_EPERM);
    const z = await roundTrip(c, { type: CMD_WRITE_ZEROES, cookie: 2, offset: 0, length: 4096 });
    expect(z.error).toBe(NBD_EPERM);
    const t = await roundTrip(c, { type: CMD_TRIM, cookie: 3, offset: 0, length: 4096 });
    expect(t.error).toBe(NBD_EPERM);
    await expectInStep(c, 4, Buffer.alloc(4096));
    c.destroy();
    await checkAll();
  });

  it('answers out-of-range requests with ENOSPC/EINVAL and BLOCK_STATUS without a context with EINVAL', async () => {
    const { c } = await connected(cli, { structured: true, metaContext: false });
    const w = await roundTrip(c, { type: CMD_WRITE, cookie: 1, offset: diskBytes - 100, length: 512 }, Buffer.alloc(512, 1));
    expect(w.error).toBe(NBD_ENOSPC);
    const far = await roundTrip(c, { type: CMD_WRITE_ZEROES, cookie: 2, offset: 0xffff_ffff_ffff_fe00n, length: 512 });
    expect(far.error).toBe(NBD_ENOSPC);
    const rd = await roundTrip(c, { type: CMD_READ, cookie: 3, offset: diskBytes, length: 1 });
    expect(rd.error).toBe(NBD_EINVAL);
    const bs = await roundTrip(c, { type: CMD_BLOCK_STATUS, cookie: 4, offset: 0, length: 4096 });
    expect(bs.error).toBe(NBD_EINVAL);
    const monitorTail = await monitor.readBytes(diskBytes - 100, 100);
    expect(monitorTail.equals(Buffer.alloc(100)), 'a rejected write past the end wrote nothing').toBe(true);
    await expectInStep(c, 5);
    c.destroy();
    await checkAll();
  });
});

/** A hostile but well-framed request: WRITEs carry exactly their payload; nothing addresses the monitor. */
interface HostileRequest {
  type: number;
  flags: number;
  offset: bigint;
  length: number;
}

const hostileOffset = fc.oneof(
  fc.bigInt({ min: 0n, max: BigInt(hostileRegionBytes - 1) }),
  fc.constantFrom(BigInt(diskBytes - 1), BigInt(diskBytes), BigInt(diskBytes + 1), 2n ** 63n - 1n, 2n ** 63n, 2n ** 64n - 1n),
  fc.bigInt({ min: BigInt(diskBytes), max: 2n ** 64n - 1n }),
);
const hostileLength = fc.oneof(
  fc.constantFrom(0, 1, 511, 512, 4096, 65536, MiB),
  fc.integer({ min: 0, max: 256 * KiB }),
);
const hostileFlags = fc.oneof(
  fc.constant(0),
  fc.constantFrom(CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_DF, CMD_FLAG_REQ_ONE, 1 << 4, 1 << 5, 1 << 15),
  fc.integer({ min: 0, max: 0xffff }),
);
const hostileRequest: fc.Arbitrary<HostileRequest> = fc
  .record({
    type: fc.oneof(fc.constantFrom(0, 1, 3, 4, 5, 6, 7), fc.integer({ min: 8, max: 0xffff })),
    flags: hostileFlags,
    offset: hostileOffset,
    length: hostileLength,
    bigRead: fc.constantFrom(0, 32 * MiB + 1, 0xffff_ffff),
  })
  .map(({ type, flags, offset, length, bigRead }) => {
    // Oversized lengths only on non-payload commands: a WRITE carries exactly `length` bytes.
    const len = type !== CMD_WRITE && bigRead !== 0 ? bigRead : length;
    // Requests that would reach past the hostile region (into the monitor's) move past the end instead.
    const end = offset + BigInt(len);
    const leavesHostileRegion = offset < BigInt(diskBytes) && end > BigInt(hostileRegionBytes);
    const o = leavesHostileRegion ? BigInt(diskBytes) + offset : offset;
    return { type, flags, offset: o, length: len };
  });

function inRange(r: HostileRequest): boolean {
  return r.offset + BigInt(r.length) <= BigInt(diskBytes);
}

/**
 * Sends the sequence pipelined, then a sentinel READ; reads replies until every request has exactly one
 * answer or the server closes. Checks each error is a wire errno and the outcomes the spec fixes.
 */
async function runHostile(seq: HostileRequest[], structured: boolean, metaContext: boolean): Promise<void> {
  const { c } = await connected(cli, { structured, metaContext });
  const reads = new Map<bigint, { offset: number; length: number }>();
  const byCookie = new Map<bigint, HostileRequest>();
  const frames: Buffer[] = [];
  seq.forEach((r, i) => {
    const cookie = BigInt(i + 1);
    byCookie.set(cookie, r);
    if (r.type === CMD_READ && inRange(r) && r.length <= 32 * MiB) reads.set(cookie, { offset: Number(r.offset), length: r.length });
    const payload = r.type === CMD_WRITE ? randomBytes(r.length) : undefined;
    frames.push(buildRequest({ type: r.type, flags: r.flags, cookie, offset: r.offset, length: r.length }, payload));
  });
  const sentinel = 0xffff_0000n;
  reads.set(sentinel, { offset: 0, length: 4096 });
  frames.push(buildRequest({ type: CMD_READ, cookie: sentinel, offset: 0, length: 4096 }));
  void c.write(Buffer.concat(frames));

  const partial = new Map<bigint, Reply>();
  const seen = new Set<bigint>();
  try {
    // Replies may come in any order: read until every request, sentinel included, has its answer.
    while (seen.size < seq.length + 1) {
      const r = await readReply(c, (ck) => reads.get(ck), partial);
      expect(seen.has(r.cookie), `cookie ${r.cookie} answered twice`).toBe(false);
      seen.add(r.cookie);
      if (r.cookie === sentinel) {
        expect(r.error).toBe(0);
        continue;
      }
      const req = byCookie.get(r.cookie);
      expect(req, `reply for unknown cookie ${r.cookie}`).toBeDefined();
      if (r.error !== 0) expect(wireErrnos.has(r.error), `errno ${r.error}`).toBe(true);
      if (req!.type > 7) expect(r.error, `unknown command ${req!.type}`).toBe(NBD_EINVAL);
      if ([CMD_READ, CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM].includes(req!.type) && !inRange(req!)) {
        expect(r.error, `out-of-range ${JSON.stringify(req, (_k, v) => (typeof v === 'bigint' ? String(v) : v))}`).not.toBe(0);
      }
      if ((req!.type === CMD_READ || req!.type === CMD_WRITE) && (req!.flags & ~CMD_FLAG_FUA) === 0 && inRange(req!) && req!.length > 0 && req!.length <= MiB) {
        expect(r.error, 'a plain in-range READ/WRITE succeeds').toBe(0);
      }
    }
  } catch (err) {
    // A clean close is an allowed answer to hostile input (e.g. oversized lengths); anything else fails.
    if (!(err instanceof ClosedError)) throw err;
  } finally {
    c.destroy();
  }
}

describe('property: hostile input never crashes the server nor disturbs another client', () => {
  it('random garbage at any handshake or transmission stage', async () => {
    await fc.assert(
      fc.asyncProperty(fc.constantFrom('greeting', 'options', 'transmission'), fc.uint8Array({ minLength: 1, maxLength: 4096 }), async (stage, garbage) => {
        const c = await RawConn.connect(cli.address);
        if (stage === 'options') {
          await readGreeting(c);
          await c.write(buildClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES));
        } else if (stage === 'transmission') {
          await negotiate(c, { structured: garbage[0] % 2 === 0 });
        }
        c.discardIncoming();
        await c.write(garbage);
        c.socket.end();
        // After our EOF the server must not hang on to the connection.
        expect(await c.waitClosed(closeTimeoutMs), 'server closes after client EOF').toBe(true);
        await checkMonitor();
      }),
      { numRuns: 60, interruptAfterTimeLimit: 20_000 },
    );
    await checkAll();
  });

  it('random valid-but-hostile request sequences', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(hostileRequest, { minLength: 1, maxLength: 40 }), fc.boolean(), fc.boolean(), async (seq, structured, metaContext) => {
        await runHostile(seq, structured, metaContext && structured);
        await checkMonitor();
      }),
      { numRuns: 60, interruptAfterTimeLimit: 25_000 },
    );
    await checkAll();
  });
});

describe('memory stays bounded under hostile traffic', () => {
  it('~250 MiB of rejected writes and unread reads grow RSS by less than 96 MiB', async () => {
    const rssGrowthBytesMax = 96 * MiB;
    const before = await rssBytes(cli.pid);
    let peak = before;
    const sample = async () => {
      peak = Math.max(peak, await rssBytes(cli.pid));
    };

    // 1. 100 x 1 MiB WRITEs past the end: every payload must be read and dropped, not buffered.
    const { c: w } = await connected();
    const payload = Buffer.alloc(MiB, 0x42);
    const writesCount = 100;
    const pending = new Map<bigint, Reply>();
    const replies = (async () => {
      let errors = 0;
      for (let i = 0; i < writesCount; i++) {
        const r = await readReply(w, () => undefined, pending);
        if (r.error === NBD_ENOSPC) errors++;
      }
      return errors;
    })();
    for (let i = 0; i < writesCount; i++) {
      await w.write(buildRequest({ type: CMD_WRITE, cookie: i + 1, offset: diskBytes + i * MiB, length: MiB }, payload));
      if (i % 10 === 0) await sample();
    }
    expect(await replies).toBe(writesCount);
    w.destroy();
    await sample();

    // 2. A client asks for 150 x 1 MiB READs and never reads a byte of the replies: the server must stop
    // reading requests (backpressure) rather than queue 150 MiB of replies.
    const { c: r } = await connected();
    r.socket.pause();
    const readsCount = 150;
    for (let i = 0; i < readsCount; i++) {
      r.socket.write(buildRequest({ type: CMD_READ, cookie: i + 1, offset: (i % 60) * MiB, length: MiB }));
    }
    // The monitor still gets served while that connection is stuck.
    await checkMonitor();
    for (let i = 0; i < 10; i++) {
      await sample();
      await checkMonitor();
    }
    r.destroy();
    await checkMonitor();
    await sample();

    const growth = peak - before;
    expect(growth, `RSS before ${before} peak ${peak}`).toBeLessThan(rssGrowthBytesMax);
    await checkAll();
  });
});
