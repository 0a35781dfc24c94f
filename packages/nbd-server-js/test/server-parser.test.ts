/**
 * Goal: the server's framing survives any chunking of the client's byte stream and never hands out
 * memory it does not own. Method: build each client message with the spec-named builders, feed it split
 * at every byte boundary (and one byte at a time), and compare what comes out; mutate source chunks
 * after parsing to prove WRITE payloads are copies; feed hostile lengths and magics.
 */
import { describe, expect, it } from 'vitest';
import {
  buildClientFlags,
  buildGoOption,
  buildOption,
  buildRequest,
  buildSetMetaContext,
} from '../src/protocol/builders.js';
import { CMD_BLOCK_STATUS, CMD_READ, CMD_WRITE, CMD_FLAG_FUA, OPT_GO, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY } from '../src/protocol/constants.js';
import { ChunkQueue, ClientStreamParser, type ClientMessage, type Request } from '../src/server/parser.js';
import { splits } from './server-fixtures.js';

const limits = { optionBytesMax: 64 * 1024, requestBytesMax: 1024 * 1024, writeSkipBytesMax: 2 * 1024 * 1024 };

function parserIn(phase: 'options' | 'transmission'): ClientStreamParser {
  const p = new ClientStreamParser(limits);
  p.push(buildClientFlags(3));
  expect(p.next()).toEqual({ kind: 'client-flags', flags: 3 });
  if (phase === 'transmission') p.enterTransmission();
  return p;
}

function drain(p: ClientStreamParser, pieces: Buffer[]): ClientMessage[] {
  const out: ClientMessage[] = [];
  for (const piece of pieces) {
    p.push(piece);
    for (let m = p.next(); m !== undefined; m = p.next()) {
      // Option data is a view valid until the next push: keep a copy, as the handshake does by decoding.
      out.push(m.kind === 'option' ? { ...m, data: Buffer.from(m.data) } : m);
    }
  }
  return out;
}

function plain(m: ClientMessage): unknown {
  if (m.kind === 'request') return { ...m, payload: m.payload === null ? null : [...m.payload] };
  if (m.kind === 'option') return { ...m, data: [...m.data] };
  return m;
}

describe('ChunkQueue', () => {
  it('reads across chunks, returning views within one chunk and copies across', () => {
    const q = new ChunkQueue();
    const a = Buffer.from([1, 2, 3]);
    const b = Buffer.from([4, 5, 6, 7]);
    q.push(a);
    q.push(b);
    expect(q.available).toBe(7);
    const within = q.read(2);
    expect([...within]).toEqual([1, 2]);
    expect(within.buffer).toBe(a.buffer);
    const across = q.read(3);
    expect([...across]).toEqual([3, 4, 5]);
    a[2] = 99;
    expect([...across]).toEqual([3, 4, 5]);
    expect(q.available).toBe(2);
    const dst = Buffer.alloc(4);
    expect(q.take(dst, 1, 10)).toBe(2);
    expect([...dst]).toEqual([0, 6, 7, 0]);
    expect(q.available).toBe(0);
  });

  it('refuses to read more than it holds', () => {
    const q = new ChunkQueue();
    q.push(Buffer.alloc(3));
    expect(() => q.read(4)).toThrow(RangeError);
    expect(() => q.skip(4)).toThrow(RangeError);
  });
});

describe('ClientStreamParser: every message at every split', () => {
  it('client flags', () => {
    for (const pieces of splits(buildClientFlags(0x3))) {
      expect(drain(new ClientStreamParser(limits), pieces)).toEqual([{ kind: 'client-flags', flags: 3 }]);
    }
  });

  const options: [string, Buffer, number][] = [
    ['STRUCTURED_REPLY', buildOption(OPT_STRUCTURED_REPLY), OPT_STRUCTURED_REPLY],
    ['GO', buildGoOption('vol0/primary', [3]), OPT_GO],
    ['SET_META_CONTEXT', buildSetMetaContext('x', ['base:allocation']), OPT_SET_META_CONTEXT],
  ];
  for (const [name, bytes, option] of options) {
    it(`option ${name}`, () => {
      const expected = { kind: 'option', option, data: [...bytes.subarray(16)] };
      for (const pieces of splits(bytes)) {
        expect(drain(parserIn('options'), pieces).map(plain)).toEqual([expected]);
      }
    });
  }

  const requests: [string, Buffer, Partial<Request>][] = [
    [
      'READ with a 64-bit cookie and offset',
      buildRequest({ type: CMD_READ, flags: CMD_FLAG_FUA, cookie: 0xfedcba9876543210n, offset: 2 ** 40 + 5, length: 4096 }),
      { type: CMD_READ, flags: CMD_FLAG_FUA, cookieHi: 0xfedcba98, cookieLo: 0x76543210, offset: 2 ** 40 + 5, length: 4096, payload: null },
    ],
    [
      'WRITE with payload',
      buildRequest({ type: CMD_WRITE, cookie: 7, offset: 512, length: 5 }, Buffer.from('hello')),
      { type: CMD_WRITE, cookieHi: 0, cookieLo: 7, offset: 512, length: 5, payload: Buffer.from('hello') },
    ],
    [
      'zero-length WRITE',
      buildRequest({ type: CMD_WRITE, cookie: 8, offset: 0, length: 0 }),
      { type: CMD_WRITE, length: 0, payload: Buffer.alloc(0) },
    ],
    [
      'BLOCK_STATUS over 4 GiB - 1',
      buildRequest({ type: CMD_BLOCK_STATUS, cookie: 9, offset: 0, length: 0xffffffff }),
      { type: CMD_BLOCK_STATUS, length: 0xffffffff, payload: null },
    ],
  ];
  for (const [name, bytes, fields] of requests) {
    it(`request ${name}`, () => {
      for (const pieces of splits(bytes)) {
        const out = drain(parserIn('transmission'), pieces);
        expect(out).toHaveLength(1);
        expect(plain(out[0])).toMatchObject(plain({ kind: 'request', payloadSkipped: false, ...fields } as Request) as object);
      }
    });
  }

  it('three pipelined messages in one chunk, then the next split anywhere', () => {
    const a = buildRequest({ type: CMD_WRITE, cookie: 1, offset: 0, length: 3 }, Buffer.from('abc'));
    const b = buildRequest({ type: CMD_READ, cookie: 2, offset: 0, length: 3 });
    const c = buildRequest({ type: CMD_WRITE, cookie: 3, offset: 3, length: 2 }, Buffer.from('de'));
    const all = Buffer.concat([a, b, c]);
    for (const pieces of splits(all)) {
      const out = drain(parserIn('transmission'), pieces) as Request[];
      expect(out.map((r) => r.cookieLo)).toEqual([1, 2, 3]);
      expect(out[0].payload?.toString()).toBe('abc');
      expect(out[2].payload?.toString()).toBe('de');
    }
  });
});

describe('ClientStreamParser: ownership and limits', () => {
  it('copies WRITE payloads: reusing the socket chunk does not change them', () => {
    const chunk = buildRequest({ type: CMD_WRITE, cookie: 1, offset: 0, length: 4 }, Buffer.from('good'));
    const p = parserIn('transmission');
    p.push(chunk);
    const req = p.next() as Request;
    chunk.fill(0x58);
    expect(req.payload?.toString()).toBe('good');
    expect(req.payload?.buffer).not.toBe(chunk.buffer);
  });

  it('skips the payload of a WRITE over requestBytesMax and stays in step', () => {
    const length = limits.requestBytesMax + 1;
    const big = buildRequest({ type: CMD_WRITE, cookie: 1, offset: 0, length }, Buffer.alloc(length, 1));
    const next = buildRequest({ type: CMD_READ, cookie: 2, offset: 0, length: 1 });
    const out = drain(parserIn('transmission'), [big.subarray(0, 1000), big.subarray(1000), next]) as Request[];
    expect(out.map((r) => [r.cookieLo, r.payload, r.payloadSkipped])).toEqual([
      [1, null, true],
      [2, null, false],
    ]);
  });

  it('fails the stream on a WRITE longer than writeSkipBytesMax', () => {
    const out = drain(parserIn('transmission'), [buildRequest({ type: CMD_WRITE, cookie: 1, offset: 0, length: limits.writeSkipBytesMax + 1 })]);
    expect(out).toEqual([{ kind: 'protocol-error', reason: expect.stringContaining('exceeds') }]);
  });

  it('fails the stream on a bad request magic, and stays failed', () => {
    const bad = buildRequest({ type: CMD_READ, cookie: 1, offset: 0, length: 1 });
    bad.writeUInt32BE(0x12345678, 0);
    const p = parserIn('transmission');
    expect(drain(p, [bad])).toEqual([{ kind: 'protocol-error', reason: 'bad request magic' }]);
    expect(drain(p, [buildRequest({ type: CMD_READ, cookie: 2, offset: 0, length: 1 })])).toEqual([]);
  });

  it('fails on a bad option magic and on an option over optionBytesMax, before its payload arrives', () => {
    const bad = buildOption(OPT_STRUCTURED_REPLY);
    bad[0] ^= 1;
    expect(drain(parserIn('options'), [bad])).toEqual([{ kind: 'protocol-error', reason: 'bad option magic' }]);
    const header = buildOption(OPT_GO).subarray(0, 16);
    header.writeUInt32BE(limits.optionBytesMax + 1, 12);
    expect(drain(parserIn('options'), [header])[0]).toMatchObject({ kind: 'protocol-error' });
  });

  it('switches phase only on request', () => {
    const p = new ClientStreamParser(limits);
    expect(() => p.enterTransmission()).toThrow();
  });
});

describe('ClientStreamParser: direct receive', () => {
  it('names the rest of a large WRITE payload as the receive target, and the request completes from bytes put there', () => {
    const p = parserIn('transmission');
    const payload = Buffer.alloc(256 * 1024);
    for (let i = 0; i < payload.length; i++) payload[i] = (i * 7) & 0xff;
    const wire = buildRequest({ type: CMD_WRITE, cookie: 5, offset: 4096, length: payload.length }, payload);
    expect(p.receiveTarget(64 * 1024)).toBeNull();
    p.push(wire.subarray(0, 28 + 1000));
    expect(p.next()).toBeUndefined();
    const target = p.receiveTarget(64 * 1024)!;
    expect(target.length).toBe(payload.length - 1000);
    const firstPart = 70_000;
    wire.copy(target, 0, 28 + 1000, 28 + 1000 + firstPart);
    p.receivedDirect(firstPart);
    expect(p.next()).toBeUndefined();
    const rest = p.receiveTarget(64 * 1024)!;
    expect(rest.length).toBe(payload.length - 1000 - firstPart);
    wire.copy(rest, 0, 28 + 1000 + firstPart);
    p.receivedDirect(rest.length);
    const req = p.next() as Request;
    expect(req).toMatchObject({ kind: 'request', type: CMD_WRITE, offset: 4096, length: payload.length });
    expect(req.payload!.equals(payload)).toBe(true);
    expect(p.receiveTarget(1)).toBeNull();
  });

  it('names no target while other bytes are buffered ahead, or when less than the minimum is left', () => {
    const p = parserIn('transmission');
    const wire = buildRequest({ type: CMD_WRITE, cookie: 1, offset: 0, length: 100_000 }, Buffer.alloc(100_000, 3));
    p.push(wire.subarray(0, 28 + 10));
    expect(p.next()).toBeUndefined();
    expect(p.receiveTarget(100_000 - 10)?.length).toBe(100_000 - 10);
    expect(p.receiveTarget(100_000 - 9)).toBeNull();
    expect(() => p.receivedDirect(100_000)).toThrow(/without a matching receive target/);
    const held = parserIn('transmission');
    held.push(wire.subarray(0, 28 + 10));
    expect(held.next()).toBeUndefined();
    expect(held.receiveTarget(1)).not.toBeNull();
    held.push(wire.subarray(28 + 10, 28 + 20));
    expect(held.receiveTarget(1)).toBeNull();
  });

  it('compact copies unparsed bytes out, so the buffer they arrived in may be reused', () => {
    const p = parserIn('transmission');
    const chunk = Buffer.from(buildRequest({ type: CMD_READ, cookie: 9, offset: 512, length: 4096 }));
    p.push(chunk.subarray(0, 20));
    expect(p.next()).toBeUndefined();
    p.compact();
    chunk.fill(0xee, 0, 20);
    p.push(chunk.subarray(20));
    expect(p.next()).toMatchObject({ kind: 'request', type: CMD_READ, cookieLo: 9, offset: 512, length: 4096 });
  });
});
