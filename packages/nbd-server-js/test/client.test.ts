/**
 * Goal: NbdClient speaks NBD correctly as a client and is a faithful BlockDevice.
 * Method: (1) feed the reply parser bytes built by the spec-named builders, split at every byte
 * boundary; (2) script a raw fake server for handshake paths our own server never takes (GO refused,
 * EXPORT_NAME fallback, connection loss); (3) run the BlockDevice conformance suite through the client
 * against NbdServer serving a MemoryDevice, over TCP and a Unix socket, plus pipelining and error tests.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HandshakeReader } from '../src/client/handshake.js';
import type { PendingReply } from '../src/client/reply-parser.js';
import { NbdProtocolError, ReplyParser } from '../src/client/reply-parser.js';
import { NbdClient, NbdHandshakeError, NbdRequestError } from '../src/client.js';
import { runBlockDeviceSuite } from '@gannet/block-device/conformance';
import { BlockDeviceError } from '@gannet/block-device';
import { MemoryDevice } from '@gannet/block-device';
import {
  buildBlockStatusChunk,
  buildErrorChunk,
  buildErrorOffsetChunk,
  buildExportNameReply,
  buildInfoBlockSizePayload,
  buildInfoExportPayload,
  buildMetaContextPayload,
  buildNoneChunk,
  buildOffsetDataChunk,
  buildOffsetHoleChunk,
  buildOptionReply,
  buildServerGreeting,
  buildSimpleReply,
} from '../src/protocol/builders.js';
import {
  CMD_BLOCK_STATUS,
  CMD_FLUSH,
  CMD_READ,
  CMD_WRITE,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOSPC,
  NBD_EPERM,
  OPT_EXPORT_NAME,
  OPT_GO,
  OPT_SET_META_CONTEXT,
  OPT_STRUCTURED_REPLY,
  REP_ACK,
  REP_ERR_UNKNOWN,
  REP_ERR_UNSUP,
  REP_INFO,
  REP_META_CONTEXT,
  REQUEST_HEADER_BYTES,
  TFLAG_HAS_FLAGS,
  TFLAG_SEND_FLUSH,
} from '../src/protocol/constants.js';
import { NbdServer } from '../src/server/server.js';

// ---------------------------------------------------------------------------------------------------
// Reply parser, bytes only

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

interface Expected {
  readonly reply: PendingReply;
  readonly errno: number;
  readonly data?: Buffer;
  readonly extents?: { length: number; flags: number }[];
}

/** A fresh set of requests in flight and the byte stream a server would answer them with. */
function scenario(): { stream: Buffer; expected: Expected[]; pending: Map<number, PendingReply> } {
  const pending = new Map<number, PendingReply>();
  const add = (cookie: number, type: number, offset: number, length: number): PendingReply => {
    const reply: PendingReply = {
      cookie, type, offset, length, errno: 0, message: '', bytesSeen: 0,
      buf: type === CMD_READ ? Buffer.alloc(length, 0xee) : undefined,
    };
    pending.set(cookie, reply);
    return reply;
  };
  const bigCookie = 2 ** 40 + 7; // exercises the high word of the cookie
  const write = add(1, CMD_WRITE, 0, 4096);
  const simpleRead = add(2, CMD_READ, 100, 37);
  const chunkedRead = add(bigCookie, CMD_READ, 1000, 64);
  const status = add(4, CMD_BLOCK_STATUS, 0, 8192);
  const failedRead = add(5, CMD_READ, 0, 16);
  const failedWrite = add(6, CMD_WRITE, 0, 16);
  const simpleData = pattern(37, 1);
  const chunkData = pattern(64, 2);
  const expectedChunked = Buffer.from(chunkData);
  expectedChunked.fill(0, 20, 44);
  const stream = Buffer.concat([
    buildSimpleReply(0, 1),
    // Chunks out of order and interleaved with other replies, as the spec allows.
    buildOffsetDataChunk(bigCookie, 1044, chunkData.subarray(44)),
    buildSimpleReply(0, 2, simpleData),
    buildOffsetHoleChunk(bigCookie, 1020, 24),
    buildBlockStatusChunk(4, 7, [{ length: 4096, flags: 0 }, { length: 8192, flags: 3 }], true),
    buildOffsetDataChunk(bigCookie, 1000, chunkData.subarray(0, 20)),
    buildErrorOffsetChunk(5, NBD_EIO, 8, 'bad sector'),
    buildNoneChunk(bigCookie),
    buildErrorChunk(5, NBD_EINVAL, 'second error is ignored'),
    buildErrorChunk(6, NBD_ENOSPC, 'full'),
  ]);
  return {
    stream,
    pending,
    expected: [
      { reply: write, errno: 0 },
      { reply: simpleRead, errno: 0, data: simpleData },
      { reply: status, errno: 0, extents: [{ length: 4096, flags: 0 }, { length: 8192, flags: 3 }] },
      { reply: chunkedRead, errno: 0, data: expectedChunked },
      { reply: failedRead, errno: NBD_EIO },
      { reply: failedWrite, errno: NBD_ENOSPC },
    ],
  };
}

function parse(chunks: Buffer[], structuredReplies = true) {
  const s = scenario();
  const completed: PendingReply[] = [];
  const parser = new ReplyParser({
    lookup: (cookie) => s.pending.get(cookie),
    complete: (reply) => {
      s.pending.delete(reply.cookie);
      completed.push(reply);
    },
    structuredReplies,
    metaContextId: 7,
    chunkPayloadBytesMax: 1 << 20,
  });
  return { ...s, completed, parser, feed: () => chunks.forEach((c) => parser.push(c)) };
}

function checkScenario(chunksOf: (stream: Buffer) => Buffer[]): void {
  const { stream } = scenario();
  const p = parse(chunksOf(stream));
  p.feed();
  expect(p.parser.idle).toBe(true);
  expect(p.completed.map((r) => r.cookie).sort()).toEqual(p.expected.map((e) => e.reply.cookie).sort());
  for (const e of p.expected) {
    expect(e.reply.errno, `cookie ${e.reply.cookie}`).toBe(e.errno);
    if (e.data) expect(Buffer.from(e.reply.buf!).equals(e.data), `data of cookie ${e.reply.cookie}`).toBe(true);
    if (e.extents) expect(e.reply.extents).toEqual(e.extents);
  }
  expect(p.expected.find((e) => e.reply.cookie === 5)!.reply.message).toBe('bad sector');
}

describe('ReplyParser', () => {
  it('parses a mixed stream delivered in one chunk', () => {
    checkScenario((stream) => [stream]);
  });

  it('parses the stream split into two chunks at every byte boundary', () => {
    const { stream } = scenario();
    for (let cut = 1; cut < stream.length; cut++) {
      checkScenario((s) => [s.subarray(0, cut), s.subarray(cut)]);
    }
  });

  it('parses the stream delivered one byte at a time', () => {
    checkScenario((s) => [...s].map((byte) => Buffer.from([byte])));
  });

  it('parses the stream split into three chunks at every pair of nearby boundaries', () => {
    const { stream } = scenario();
    for (let a = 1; a < stream.length; a += 3) {
      for (let b = a + 1; b < Math.min(stream.length, a + 24); b++) {
        checkScenario((s) => [s.subarray(0, a), s.subarray(a, b), s.subarray(b)]);
      }
    }
  });

  it('streams READ data into the request buffer without buffering the payload', () => {
    const p = parse([]);
    const data = pattern(37, 1);
    const bytes = buildSimpleReply(0, 2, data);
    p.parser.push(bytes.subarray(0, 16 + 10));
    const read = p.pending.get(2)!;
    expect(Buffer.from(read.buf!.subarray(0, 10)).equals(data.subarray(0, 10))).toBe(true);
    expect(p.completed).toEqual([]);
    p.parser.push(bytes.subarray(16 + 10));
    expect(p.completed.map((r) => r.cookie)).toEqual([2]);
  });

  it('fails a READ whose chunks do not cover the whole range with EIO', () => {
    const p = parse([Buffer.concat([buildOffsetDataChunk(2, 100, pattern(30, 0)), buildNoneChunk(2)])]);
    p.feed();
    expect(p.completed.map((r) => [r.cookie, r.errno])).toEqual([[2, NBD_EIO]]);
  });

  const protocolErrors: [string, Buffer, boolean?][] = [
    ['an unknown cookie', buildSimpleReply(0, 99)],
    ['a bad magic', Buffer.from('deadbeefdeadbeefdeadbeef', 'hex')],
    ['data before the request range', buildOffsetDataChunk(2, 99, pattern(4, 0), true)],
    ['data past the request range', buildOffsetDataChunk(2, 134, pattern(4, 0), true)],
    ['a hole past the request range', buildOffsetHoleChunk(2, 130, 8, true)],
    ['data for a WRITE', buildOffsetDataChunk(1, 0, pattern(4, 0), true)],
    ['block status for an unnegotiated context', buildBlockStatusChunk(4, 8, [{ length: 1, flags: 0 }], true)],
    ['an error chunk whose message overruns it', Buffer.from(buildErrorChunk(6, NBD_EIO, 'abc').fill(0xff, 24, 26))],
    ['a structured reply without negotiation', buildNoneChunk(1), false],
  ];
  for (const [what, bytes, structured] of protocolErrors) {
    it(`rejects ${what} as a protocol error, and stays failed`, () => {
      const p = parse([bytes], structured ?? true);
      expect(() => p.feed()).toThrow(NbdProtocolError);
      expect(() => p.parser.push(buildSimpleReply(0, 1))).toThrow(NbdProtocolError);
      expect(p.completed).toEqual([]);
    });
  }
});

// ---------------------------------------------------------------------------------------------------
// Fake server: scripted handshakes our own server never produces

/** Serves one connection with `script`, which reads client bytes with a HandshakeReader. */
async function fakeServer(script: (socket: net.Socket, r: HandshakeReader) => Promise<void>) {
  const errors: unknown[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
    script(socket, new HandshakeReader(socket)).catch((err) => errors.push(err));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  return {
    address: { host: '127.0.0.1', port },
    errors,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** Reads one option from the client: returns its number and payload. */
async function readOption(r: HandshakeReader): Promise<{ option: number; payload: Buffer }> {
  const h = await r.read(16);
  return { option: h.readUInt32BE(8), payload: await r.read(h.readUInt32BE(12)) };
}

describe('NbdClient handshake against a scripted server', () => {
  it('falls back to EXPORT_NAME when GO is unsupported, and reads the padded reply', async () => {
    const seen: number[] = [];
    const fake = await fakeServer(async (socket, r) => {
      socket.write(buildServerGreeting(FLAG_FIXED_NEWSTYLE)); // no NO_ZEROES: expect 124 bytes of padding
      expect((await r.read(4)).readUInt32BE(0)).toBe(1);
      for (;;) {
        const { option, payload } = await readOption(r);
        seen.push(option);
        if (option === OPT_EXPORT_NAME) {
          expect(payload.toString()).toBe('disk');
          socket.write(buildExportNameReply(12345, TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH, false));
          const h = await r.read(REQUEST_HEADER_BYTES);
          expect(h.readUInt16BE(6)).toBe(CMD_FLUSH);
          socket.write(buildSimpleReply(0, h.readBigUInt64BE(8)));
          return;
        }
        socket.write(buildOptionReply(option, REP_ERR_UNSUP));
      }
    });
    try {
      const client = await NbdClient.connect(fake.address, { exportName: 'disk' });
      expect(seen).toEqual([OPT_STRUCTURED_REPLY, OPT_GO, OPT_EXPORT_NAME]);
      expect(client.size).toBe(12345);
      expect(client.structuredReplies).toBe(false);
      expect(client.capabilities.flush).toBe(true);
      expect(client.capabilities.extents).toBe(false);
      expect(await client.extents(0, 100)).toEqual([{ length: 100, flags: 0 }]);
      await client.flush();
      client.destroy();
      expect(fake.errors).toEqual([]);
    } finally {
      await fake.close();
    }
  });

  /** Greets with NO_ZEROES, accepts structured replies and base:allocation, answers GO with `go`. */
  async function negotiatingServer(go: (socket: net.Socket, payload: Buffer) => void, transmission?: (socket: net.Socket, r: HandshakeReader) => Promise<void>) {
    return fakeServer(async (socket, r) => {
      socket.write(buildServerGreeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
      expect((await r.read(4)).readUInt32BE(0)).toBe(3);
      for (;;) {
        const { option, payload } = await readOption(r);
        if (option === OPT_STRUCTURED_REPLY) socket.write(buildOptionReply(option, REP_ACK));
        else if (option === OPT_SET_META_CONTEXT) {
          socket.write(buildOptionReply(option, REP_META_CONTEXT, buildMetaContextPayload(42, 'base:allocation')));
          socket.write(buildOptionReply(option, REP_ACK));
        } else if (option === OPT_GO) {
          go(socket, payload);
          break;
        } else socket.write(buildOptionReply(option, REP_ERR_UNSUP));
      }
      await transmission?.(socket, r);
    });
  }

  it('an aborted signal abandons a handshake the server never answers, and closes the socket', async () => {
    let accepted!: () => void;
    const seen = new Promise<void>((resolve) => (accepted = resolve));
    let serverSocket: net.Socket | undefined;
    const fake = await fakeServer(async (socket) => {
      serverSocket = socket;
      accepted();
    });
    try {
      const controller = new AbortController();
      const connecting = NbdClient.connect(fake.address, { signal: controller.signal });
      await seen;
      const closed = new Promise<void>((resolve) => serverSocket!.once('close', () => resolve()));
      controller.abort(new Error('gave up'));
      await expect(connecting).rejects.toThrow('gave up');
      await closed;
      await expect(NbdClient.connect(fake.address, { signal: controller.signal })).rejects.toThrow('gave up');
    } finally {
      await fake.close();
    }
  });

  it('rejects connect with the server message when GO names an unknown export', async () => {
    const fake = await negotiatingServer((socket) => {
      socket.write(buildOptionReply(OPT_GO, REP_ERR_UNKNOWN, Buffer.from('no export named "nope"')));
    });
    try {
      const err = await NbdClient.connect(fake.address, { exportName: 'nope' }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(NbdHandshakeError);
      expect((err as NbdHandshakeError).replyType).toBe(REP_ERR_UNKNOWN);
      expect((err as Error).message).toMatch(/NBD_REP_ERR_UNKNOWN: no export named "nope"/);
    } finally {
      await fake.close();
    }
  });

  it('takes size, flags and block sizes from GO and rejects pending requests when the connection drops', async () => {
    const fake = await negotiatingServer(
      (socket, payload) => {
        expect(payload.readUInt16BE(4 + payload.readUInt32BE(0))).toBe(1); // one info request: BLOCK_SIZE
        socket.write(buildOptionReply(OPT_GO, REP_INFO, buildInfoBlockSizePayload(512, 65536, 1 << 20)));
        socket.write(buildOptionReply(OPT_GO, REP_INFO, buildInfoExportPayload(1 << 30, TFLAG_HAS_FLAGS)));
        socket.write(buildOptionReply(OPT_GO, REP_ACK));
      },
      async (socket, r) => {
        // Answer the first READ, then drop the connection with two more in flight.
        const h = await r.read(REQUEST_HEADER_BYTES);
        socket.write(buildSimpleReply(0, h.readBigUInt64BE(8), pattern(h.readUInt32BE(24), 9)));
        await r.read(2 * REQUEST_HEADER_BYTES);
        socket.destroy();
      },
    );
    try {
      const client = await NbdClient.connect(fake.address);
      expect(client.size).toBe(1 << 30);
      expect(client.blockSizes).toEqual({ minimum: 512, preferred: 65536, maximum: 1 << 20 });
      expect(client.structuredReplies).toBe(true);
      expect(client.capabilities.extents).toBe(true);
      expect(client.capabilities.flush).toBe(false);
      expect((await client.readBytes(0, 512)).equals(pattern(512, 9))).toBe(true);
      const results = await Promise.allSettled([client.readBytes(0, 512), client.readBytes(512, 512)]);
      for (const r of results) {
        expect(r.status).toBe('rejected');
        expect(((r as PromiseRejectedResult).reason as BlockDeviceError).code).toBe('EIO');
      }
      await expect(client.readBytes(0, 512)).rejects.toMatchObject({ code: 'EIO' });
      await client.close();
      expect(fake.errors).toEqual([]);
    } finally {
      await fake.close();
    }
  });

  it('splits reads larger than the advertised maximum payload', async () => {
    const lengths: number[] = [];
    const fake = await negotiatingServer(
      (socket) => {
        socket.write(buildOptionReply(OPT_GO, REP_INFO, buildInfoBlockSizePayload(1, 4096, 4096)));
        socket.write(buildOptionReply(OPT_GO, REP_INFO, buildInfoExportPayload(1 << 20, TFLAG_HAS_FLAGS)));
        socket.write(buildOptionReply(OPT_GO, REP_ACK));
      },
      async (socket, r) => {
        for (let i = 0; i < 3; i++) {
          const h = await r.read(REQUEST_HEADER_BYTES);
          const offset = Number(h.readBigUInt64BE(16));
          lengths.push(h.readUInt32BE(24));
          socket.write(buildOffsetDataChunk(h.readBigUInt64BE(8), offset, pattern(h.readUInt32BE(24), offset), true));
        }
      },
    );
    try {
      const client = await NbdClient.connect(fake.address);
      const buf = await client.readBytes(4096, 10000);
      expect(lengths).toEqual([4096, 4096, 1808]);
      expect(buf.equals(Buffer.concat([pattern(4096, 4096), pattern(4096, 8192), pattern(1808, 12288)]))).toBe(true);
      client.destroy();
      expect(fake.errors).toEqual([]);
    } finally {
      await fake.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------------
// Against NbdServer serving MemoryDevice

const unixDir = mkdtempSync(join(tmpdir(), 'nbd-client-test-'));
afterAll(() => rmSync(unixDir, { recursive: true, force: true }));

/**
 * A server with one MemoryDevice export per factory call, reached over `transport`. A read-only export
 * comes pre-filled, so the suite can tell refused mutations from silently applied ones.
 */
function servedMemory(transport: 'tcp' | 'unix', readOnly = false) {
  let counter = 0;
  return async (sizeBytes: number) => {
    const server = new NbdServer();
    const exportName = `mem${counter++}`;
    const memory = new MemoryDevice(sizeBytes);
    if (readOnly) await memory.write(pattern(sizeBytes, 77), 0);
    server.addExport(exportName, memory, { readOnly });
    const address = await server.listen(transport === 'tcp' ? { host: '127.0.0.1', port: 0 } : { path: join(unixDir, `${exportName}.sock`) });
    const device = await NbdClient.connect(address as never, { exportName });
    return {
      device,
      cleanup: async () => {
        await device.close();
        await server.close();
      },
    };
  };
}

runBlockDeviceSuite({ name: 'NbdClient over TCP to NbdServer(MemoryDevice)', factory: servedMemory('tcp') });
runBlockDeviceSuite({ name: 'NbdClient over a Unix socket to NbdServer(MemoryDevice)', factory: servedMemory('unix') });
runBlockDeviceSuite({
  name: 'NbdClient to a read-only NbdServer export',
  factory: servedMemory('tcp', true),
  readOnly: true,
  capabilities: { trim: false, zero: false, fastZero: false },
});

describe('NbdClient against NbdServer', () => {
  const sizeBytes = 4 * 1024 * 1024;
  let server: NbdServer;
  let address: { host: string; port: number };

  beforeAll(async () => {
    server = new NbdServer();
    server.addExport('data', new MemoryDevice(sizeBytes), { description: 'scratch disk' });
    server.addExport('vol0/primary', new MemoryDevice(65536), { readOnly: true });
    server.setDefaultExport('data');
    address = (await server.listen({ host: '127.0.0.1', port: 0 })) as { host: string; port: number };
  });
  afterAll(async () => {
    await server.close();
  });

  it('lists exports with descriptions', async () => {
    const list = await NbdClient.list(address);
    expect(list.map((e) => e.name).sort()).toEqual(['data', 'vol0/primary']);
    expect(list.find((e) => e.name === 'data')!.description).toBe('scratch disk');
  });

  it('attaches the default export with the empty name and negotiates everything', async () => {
    const client = await NbdClient.connect(address);
    try {
      expect(client.size).toBe(sizeBytes);
      expect(client.structuredReplies).toBe(true);
      expect(client.capabilities).toMatchObject({ readOnly: false, flush: true, fua: true, extents: true });
    } finally {
      await client.close();
    }
  });

  it('rejects connect to an unknown export with a clear message', async () => {
    await expect(NbdClient.connect(address, { exportName: 'missing' })).rejects.toThrow(/missing.*NBD_REP_ERR_UNKNOWN/);
  });

  it('works without structured replies (simple replies only)', async () => {
    const client = await NbdClient.connect(address, { exportName: 'data', structuredReplies: false });
    try {
      expect(client.structuredReplies).toBe(false);
      const data = pattern(10000, 5);
      await client.write(data, 3333);
      expect((await client.readBytes(3333, 10000)).equals(data)).toBe(true);
      await expect(client.readBytes(sizeBytes - 1, 2)).rejects.toMatchObject({ code: 'EINVAL' });
    } finally {
      await client.close();
    }
  });

  it('keeps 100 mixed requests in flight and matches every reply to its request', async () => {
    const client = await NbdClient.connect(address, { exportName: 'data' });
    try {
      const slot = 8192;
      const ops: Promise<unknown>[] = [];
      let maxInflight = 0;
      // Slots 50..99 are written first; then 50 writes to slots 0..49 and 50 reads of slots 50..99
      // go out together, so every reply must land in its own request's buffer.
      for (let i = 0; i < 50; i++) await client.write(pattern(slot, 100 + i), (50 + i) * slot);
      const reads: Promise<Buffer>[] = [];
      for (let i = 0; i < 100; i++) {
        if (i % 2 === 0) ops.push(client.write(pattern(slot, i), i * slot, { fua: i % 4 === 0 }));
        else reads.push(client.readBytes((50 + ((i - 1) >> 1)) * slot, slot));
        maxInflight = Math.max(maxInflight, client.inflightCount);
      }
      ops.push(client.flush());
      await Promise.all(ops);
      const got = await Promise.all(reads);
      expect(maxInflight).toBe(100);
      got.forEach((b, k) => expect(b.equals(pattern(slot, 100 + k)), `read ${k}`).toBe(true));
      for (let i = 0; i < 100; i += 2) {
        expect((await client.readBytes(i * slot, slot)).equals(pattern(slot, i)), `write ${i}`).toBe(true);
      }
    } finally {
      await client.close();
    }
  });

  it('maps wire errors to NbdRequestError codes (non-strict client)', async () => {
    const client = await NbdClient.connect(address, { exportName: 'data', strict: false });
    try {
      const read = await client.readBytes(sizeBytes, 1).catch((e: unknown) => e);
      expect(read).toBeInstanceOf(NbdRequestError);
      expect(read).toMatchObject({ code: 'EINVAL', errno: NBD_EINVAL });
      await expect(client.write(Buffer.alloc(2), sizeBytes - 1)).rejects.toMatchObject({ code: 'ENOSPC', errno: NBD_ENOSPC });
      await expect(client.writeZeroes(sizeBytes, 10)).rejects.toMatchObject({ code: 'ENOSPC' });
      await expect(client.trim(sizeBytes - 1, 2)).rejects.toMatchObject({ code: 'EINVAL' });
      // The connection survives errors.
      await client.write(Buffer.from('ok'), 0);
      expect((await client.readBytes(0, 2)).toString()).toBe('ok');
    } finally {
      await client.close();
    }
  });

  it('refuses writes to a read-only export: client-side when strict, EPERM from the server otherwise', async () => {
    const strict = await NbdClient.connect(address, { exportName: 'vol0/primary' });
    const loose = await NbdClient.connect(address, { exportName: 'vol0/primary', strict: false });
    try {
      expect(strict.capabilities.readOnly).toBe(true);
      await expect(strict.write(Buffer.alloc(1), 0)).rejects.toMatchObject({ code: 'EPERM' });
      const err = await loose.write(Buffer.alloc(512), 0).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(NbdRequestError);
      expect(err).toMatchObject({ code: 'EPERM', errno: NBD_EPERM });
      expect((await strict.readBytes(0, 512)).equals(Buffer.alloc(512))).toBe(true);
    } finally {
      await strict.close();
      await loose.close();
    }
  });

  it('reads with DF in a single chunk and reports extents after a write', async () => {
    const client = await NbdClient.connect(address, { exportName: 'data' });
    try {
      const base = 2 * 1024 * 1024;
      await client.writeZeroes(base, 1024 * 1024);
      await client.write(pattern(4096, 3), base + 8192);
      expect((await client.readBytes(base + 8192, 4096, { df: true })).equals(pattern(4096, 3))).toBe(true);
      const extents = await client.extents(base, 65536);
      expect(extents.reduce((n, e) => n + e.length, 0)).toBeLessThanOrEqual(65536);
      let at = base;
      for (const e of extents) {
        if (at < base + 8192 + 4096 && at + e.length > base + 8192) expect(e.flags & 2).toBe(0);
        at += e.length;
      }
      const one = await client.extents(base, 65536, { reqOne: true });
      expect(one).toHaveLength(1);
    } finally {
      await client.close();
    }
  });

  it('close() waits for requests in flight, then later requests reject with ESHUTDOWN', async () => {
    const client = await NbdClient.connect(address, { exportName: 'data' });
    const reads = [client.readBytes(0, 65536), client.readBytes(65536, 65536)];
    const closing = client.close();
    await expect(client.readBytes(0, 1)).rejects.toMatchObject({ code: 'ESHUTDOWN' });
    expect((await Promise.all(reads)).map((b) => b.length)).toEqual([65536, 65536]);
    await closing;
  });

  it('destroy() rejects requests in flight', async () => {
    const client = await NbdClient.connect(address, { exportName: 'data' });
    const reads = [client.readBytes(0, 1 << 20), client.readBytes(1 << 20, 1 << 20)];
    client.destroy();
    for (const r of await Promise.allSettled(reads)) {
      expect(r.status).toBe('rejected');
      expect((r as PromiseRejectedResult).reason).toMatchObject({ code: 'ESHUTDOWN' });
    }
  });
});
