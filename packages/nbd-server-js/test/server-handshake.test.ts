/**
 * Goal: the server negotiates exactly as doc/proto.md says, including the points servers get wrong
 * (NBD.md). Method: drive a real Connection over an in-memory duplex with bytes from the spec-named
 * builders, decode what comes back with an independent decoder, and assert on reply types, payload
 * bytes, and whether the connection closed. A few cases use the Handshake state machine directly.
 */
import { describe, expect, it } from 'vitest';
import {
  buildClientFlags,
  buildGoOption,
  buildInfoOption,
  buildListMetaContext,
  buildOption,
  buildRequest,
  buildSetMetaContext,
} from '../src/protocol/builders.js';
import {
  CMD_BLOCK_STATUS,
  CMD_DISC,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  INFO_BLOCK_SIZE,
  INFO_DESCRIPTION,
  INFO_NAME,
  NBDMAGIC,
  NBD_EINVAL,
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
  REP_ERR_UNKNOWN,
  REP_ERR_UNSUP,
  REP_INFO,
  REP_META_CONTEXT,
  REP_SERVER,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_ERROR,
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
} from '../src/protocol/constants.js';
import { Handshake, optionCountMax, optionCountPerListedExport } from '../src/server/handshake.js';
import { allCaps, decodeOptionReplies, decodeReplies, entry, harness, registryOf, TestDevice, type Harness } from './server-fixtures.js';

const size = 1024 * 1024 + 512 + 3;
const greetingBytes = 18;

function setup(options: { readOnly?: boolean } = {}) {
  const device = new TestDevice(size);
  const other = new TestDevice(4096);
  const registry = registryOf([entry('vol0/primary', device, { description: 'the primary', readOnly: options.readOnly }), entry('other', other)], 'vol0/primary');
  return { device, other, h: harness(registry) };
}

/** Sends the client flags and options; waits for `replies` option replies (after the greeting). */
async function negotiate(h: Harness, messages: Buffer[], replies: number) {
  for (const m of messages) h.push(m);
  for (let i = 0; i < 1000; i++) {
    const out = await h.waitBytes(greetingBytes + 1);
    const decoded = decodeOptionReplies(out.subarray(greetingBytes));
    if (decoded.replies.length >= replies || h.socket.ended) return decoded.replies;
    await h.waitBytes(out.length + 1);
  }
  throw new Error('no replies');
}

const fixed = buildClientFlags(1);
const fixedNoZeroes = buildClientFlags(3);

describe('greeting and client flags', () => {
  it('greets with NBDMAGIC, IHAVEOPT and FIXED_NEWSTYLE|NO_ZEROES', async () => {
    const { h } = setup();
    const g = await h.waitBytes(greetingBytes);
    expect(g.readBigUInt64BE(0)).toBe(NBDMAGIC);
    expect(g.readBigUInt64BE(8)).toBe(IHAVEOPT);
    expect(g.readUInt16BE(16)).toBe(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
  });

  it('disconnects on an unknown client flag', async () => {
    const { h } = setup();
    h.push(buildClientFlags(1 | 4));
    await h.connection.closed;
    expect(h.output().length).toBe(greetingBytes);
  });
});

describe('options', () => {
  it('answers an unknown option ERR_UNSUP after consuming its payload, then keeps negotiating', async () => {
    const { h } = setup();
    const replies = await negotiate(h, [fixed, buildOption(0x1234, Buffer.from('payload-bytes')), buildOption(OPT_STRUCTURED_REPLY)], 2);
    expect(replies.map((r) => [r.option, r.type])).toEqual([
      [0x1234, REP_ERR_UNSUP],
      [OPT_STRUCTURED_REPLY, REP_ACK],
    ]);
  });

  it('refuses STARTTLS by policy and STRUCTURED_REPLY with data as invalid', async () => {
    const { h } = setup();
    const replies = await negotiate(h, [fixed, buildOption(OPT_STARTTLS), buildOption(OPT_STRUCTURED_REPLY, Buffer.from([1]))], 2);
    expect(replies.map((r) => r.type)).toEqual([REP_ERR_POLICY, REP_ERR_INVALID]);
  });

  it('ABORT: ACK, then close', async () => {
    const { h } = setup();
    const replies = await negotiate(h, [fixed, buildOption(OPT_ABORT)], 1);
    expect(replies.map((r) => [r.option, r.type])).toEqual([[OPT_ABORT, REP_ACK]]);
    await h.connection.closed;
  });

  it('ABORT from a client that closes without reading: no crash, connection closes', async () => {
    const { h } = setup();
    h.push(Buffer.concat([fixed, buildOption(OPT_ABORT)]));
    h.socket.push(null);
    await h.connection.closed;
  });

  it('LIST: one REP_SERVER per export with its description, then ACK; LIST with data is invalid', async () => {
    const { h } = setup();
    const replies = await negotiate(h, [fixed, buildOption(OPT_LIST), buildOption(OPT_LIST, Buffer.from('x'))], 4);
    expect(replies.map((r) => r.type)).toEqual([REP_SERVER, REP_SERVER, REP_ACK, REP_ERR_INVALID]);
    const first = replies[0].data;
    const nameLength = first.readUInt32BE(0);
    expect(first.toString('utf8', 4, 4 + nameLength)).toBe('vol0/primary');
    expect(first.toString('utf8', 4 + nameLength)).toBe('the primary');
  });

  it('INFO: EXPORT, NAME, DESCRIPTION, BLOCK_SIZE each in its own REP_INFO, then ACK; stays in negotiation', async () => {
    const { h } = setup();
    const replies = await negotiate(
      h,
      [fixed, buildInfoOption('', [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 999]), buildOption(OPT_STRUCTURED_REPLY)],
      6,
    );
    expect(replies.map((r) => [r.option, r.type])).toEqual([
      [OPT_INFO, REP_INFO],
      [OPT_INFO, REP_INFO],
      [OPT_INFO, REP_INFO],
      [OPT_INFO, REP_INFO],
      [OPT_INFO, REP_ACK],
      [OPT_STRUCTURED_REPLY, REP_ACK],
    ]);
    const [exp, name, desc, bs] = replies.map((r) => r.data);
    expect(exp.length).toBe(12);
    expect(exp.readUInt16BE(0)).toBe(0);
    expect(Number(exp.readBigUInt64BE(2))).toBe(size);
    expect(exp.readUInt16BE(10)).toBe(
      TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO | TFLAG_CAN_MULTI_CONN | TFLAG_SEND_CACHE,
    );
    expect([name.readUInt16BE(0), name.toString('utf8', 2)]).toEqual([INFO_NAME, 'vol0/primary']);
    expect([desc.readUInt16BE(0), desc.toString('utf8', 2)]).toEqual([INFO_DESCRIPTION, 'the primary']);
    expect(bs.length).toBe(14);
    expect([bs.readUInt16BE(0), bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)]).toEqual([INFO_BLOCK_SIZE, 1, 4096, 32 * 1024 * 1024]);
  });

  it('INFO for an unknown export: ERR_UNKNOWN with a message; malformed INFO: ERR_INVALID', async () => {
    const { h } = setup();
    const malformed = buildInfoOption('other', []);
    const truncated = buildOption(OPT_INFO, malformed.subarray(16, malformed.length - 1));
    const replies = await negotiate(h, [fixed, buildInfoOption('nope'), truncated], 2);
    expect(replies.map((r) => r.type)).toEqual([REP_ERR_UNKNOWN, REP_ERR_INVALID]);
    expect(replies[0].data.toString()).toContain('nope');
  });

  it('GO on a read-only export with structured replies: READ_ONLY and DF set, no write flags, no padding', async () => {
    const { h } = setup({ readOnly: true });
    const replies = await negotiate(h, [fixed, buildOption(OPT_STRUCTURED_REPLY), buildGoOption('vol0/primary')], 4);
    expect(replies.map((r) => [r.option, r.type])).toEqual([
      [OPT_STRUCTURED_REPLY, REP_ACK],
      [OPT_GO, REP_INFO],
      [OPT_GO, REP_INFO],
      [OPT_GO, REP_ACK],
    ]);
    expect(replies[1].data.readUInt16BE(10)).toBe(
      TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_DF | TFLAG_CAN_MULTI_CONN | TFLAG_SEND_CACHE,
    );
    const total = h.output().length;
    h.push(buildRequest({ type: CMD_DISC, cookie: 1, offset: 0, length: 0 }));
    await h.connection.closed;
    expect(h.output().length).toBe(total);
  });

  it('EXPORT_NAME: size and flags then 124 zero bytes, or none with NO_ZEROES', async () => {
    for (const [flags, padding] of [
      [fixed, 124],
      [fixedNoZeroes, 0],
    ] as const) {
      const { h } = setup();
      h.push(Buffer.concat([flags, buildOption(OPT_EXPORT_NAME, Buffer.from('other'))]));
      const out = await h.waitBytes(greetingBytes + 10 + padding);
      expect(out.length).toBe(greetingBytes + 10 + padding);
      expect(Number(out.readBigUInt64BE(greetingBytes))).toBe(4096);
      expect(out.readUInt16BE(greetingBytes + 8) & TFLAG_HAS_FLAGS).toBe(TFLAG_HAS_FLAGS);
      expect(out.subarray(greetingBytes + 10).every((b) => b === 0)).toBe(true);
    }
  });

  it('EXPORT_NAME for an unknown export: closes without a reply', async () => {
    const { h } = setup();
    h.push(Buffer.concat([fixed, buildOption(OPT_EXPORT_NAME, Buffer.from('missing'))]));
    await h.connection.closed;
    expect(h.output().length).toBe(greetingBytes);
  });

  it('a client without fixed newstyle may only send EXPORT_NAME', async () => {
    const { h } = setup();
    h.push(Buffer.concat([buildClientFlags(0), buildOption(OPT_LIST)]));
    await h.connection.closed;
    expect(h.output().length).toBe(greetingBytes);
  });

  it('disconnects past the option count limit', async () => {
    const { h } = setup();
    const many = Array.from({ length: optionCountMax + 1 }, () => buildOption(OPT_STRUCTURED_REPLY));
    h.push(Buffer.concat([fixed, ...many]));
    await h.connection.closed;
    expect(decodeOptionReplies(h.output().subarray(greetingBytes)).replies).toHaveLength(optionCountMax);
  });

  it('repeated LISTs do not lift the option count limit', async () => {
    const { h } = setup();
    // setup() serves two exports; only the first LIST grants their INFO/GO allowance.
    const lists = Array.from({ length: optionCountMax + 2 * optionCountPerListedExport + 1 }, () => buildOption(OPT_LIST));
    h.push(Buffer.concat([fixed, ...lists]));
    await h.connection.closed;
    const acks = decodeOptionReplies(h.output().subarray(greetingBytes)).replies.filter((r) => r.type === REP_ACK);
    expect(acks).toHaveLength(optionCountMax + 2 * optionCountPerListedExport);
  });

  it('disconnects on an option longer than the limit', async () => {
    const { h } = setup();
    const header = buildOption(OPT_GO).subarray(0, 16);
    header.writeUInt32BE(64 * 1024 + 1, 12);
    h.push(Buffer.concat([fixed, header]));
    await h.connection.closed;
    expect(h.output().length).toBe(greetingBytes);
  });

  it('while shutting down: options get ERR_SHUTDOWN, ABORT still gets ACK', async () => {
    const { h } = setup();
    h.shuttingDown = true;
    const replies = await negotiate(h, [fixed, buildGoOption(''), buildOption(OPT_ABORT)], 2);
    expect(replies.map((r) => r.type)).toEqual([REP_ERR_SHUTDOWN, REP_ACK]);
  });
});

describe('meta contexts', () => {
  it('requires structured replies first', async () => {
    const { h } = setup();
    const replies = await negotiate(h, [fixed, buildSetMetaContext('', ['base:allocation'])], 1);
    expect(replies[0].type).toBe(REP_ERR_INVALID);
  });

  it('LIST with no queries lists base:allocation; "base:" too; unknown namespaces are ignored', async () => {
    const { h } = setup();
    const replies = await negotiate(
      h,
      [
        fixed,
        buildOption(OPT_STRUCTURED_REPLY),
        buildListMetaContext('', []),
        buildListMetaContext('', ['base:']),
        buildListMetaContext('', ['qemu:dirty-bitmap:x']),
      ],
      6,
    );
    expect(replies.map((r) => [r.option, r.type])).toEqual([
      [OPT_STRUCTURED_REPLY, REP_ACK],
      [OPT_LIST_META_CONTEXT, REP_META_CONTEXT],
      [OPT_LIST_META_CONTEXT, REP_ACK],
      [OPT_LIST_META_CONTEXT, REP_META_CONTEXT],
      [OPT_LIST_META_CONTEXT, REP_ACK],
      [OPT_LIST_META_CONTEXT, REP_ACK],
    ]);
    expect(replies[1].data.toString('utf8', 4)).toBe('base:allocation');
  });

  it('SET selects base:allocation, a later SET without it replaces the set, so BLOCK_STATUS is EINVAL', async () => {
    const { h } = setup();
    const replies = await negotiate(
      h,
      [
        fixed,
        buildOption(OPT_STRUCTURED_REPLY),
        buildSetMetaContext('', ['x-unknown:thing', 'base:allocation']),
        buildSetMetaContext('', ['x-unknown:thing']),
        buildGoOption(''),
      ],
      7,
    );
    expect(replies.map((r) => [r.option, r.type])).toEqual([
      [OPT_STRUCTURED_REPLY, REP_ACK],
      [OPT_SET_META_CONTEXT, REP_META_CONTEXT],
      [OPT_SET_META_CONTEXT, REP_ACK],
      [OPT_SET_META_CONTEXT, REP_ACK],
      [OPT_GO, REP_INFO],
      [OPT_GO, REP_INFO],
      [OPT_GO, REP_ACK],
    ]);
    const before = h.output().length;
    h.push(buildRequest({ type: CMD_BLOCK_STATUS, cookie: 5, offset: 0, length: 4096 }));
    const out = await h.waitBytes(before + 1);
    const [reply] = decodeReplies(out.subarray(before)).replies;
    expect(reply).toMatchObject({ kind: 'chunk', type: REPLY_TYPE_ERROR, cookie: 5n });
    expect(reply.kind === 'chunk' && reply.payload.readUInt32BE(0)).toBe(NBD_EINVAL);
  });

  it('SET then GO gives BLOCK_STATUS with the context id from SET', async () => {
    const { h } = setup();
    const replies = await negotiate(h, [fixed, buildOption(OPT_STRUCTURED_REPLY), buildSetMetaContext('', ['base:allocation']), buildGoOption('')], 6);
    const id = replies[1].data.readUInt32BE(0);
    expect(id).not.toBe(0);
    const before = h.output().length;
    h.push(buildRequest({ type: CMD_BLOCK_STATUS, cookie: 6, offset: 0, length: 8192 }));
    const out = await h.waitBytes(before + 1);
    const [reply] = decodeReplies(out.subarray(before)).replies;
    expect(reply).toMatchObject({ kind: 'chunk', type: REPLY_TYPE_BLOCK_STATUS, cookie: 6n, flags: 1 });
    expect(reply.kind === 'chunk' && reply.payload.readUInt32BE(0)).toBe(id);
  });

  it('SET for an unknown export is refused and clears the set', () => {
    const device = new TestDevice(4096, allCaps);
    const hs = new Handshake({ exports: registryOf([entry('a', device)]), requestBytesMax: 32 << 20, isShuttingDown: () => false });
    hs.clientFlags(1);
    hs.option(OPT_STRUCTURED_REPLY, Buffer.alloc(0));
    hs.option(OPT_SET_META_CONTEXT, buildSetMetaContext('a', ['base:allocation']).subarray(16));
    const refused = hs.option(OPT_SET_META_CONTEXT, buildSetMetaContext('b', ['base:allocation']).subarray(16));
    expect(decodeOptionReplies(Buffer.concat(refused.frames)).replies.map((r) => r.type)).toEqual([REP_ERR_UNKNOWN]);
    const go = hs.option(OPT_GO, buildGoOption('a').subarray(16));
    expect(go.next === 'transmission' && go.session.baseAllocation).toBe(false);
  });
});
