/**
 * Goal: NbdServer over real sockets: TCP and Unix listeners, pipelined requests, graceful close that
 * drains in-flight work and answers later requests ESHUTDOWN, isolation between connections, request
 * events, and the URIs it hands out. Method: a raw byte-level client over loopback (ephemeral ports,
 * temp socket paths), an in-test memory device with gates; assertions on replies and data.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { connect, createServer, type AddressInfo, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterEach, describe, expect, it } from 'vitest';
import { buildClientFlags, buildGoOption, buildOption, buildRequest } from '../src/protocol/builders.js';
import { CMD_DISC, CMD_FLUSH, CMD_READ, CMD_WRITE, NBD_ESHUTDOWN, REP_ERR_UNSUP } from '../src/protocol/constants.js';
import { NbdClient } from '../src/client.js';
import { adoptWithReceiver } from '../src/server/receive.js';
import { NbdServer, nbdUri, type RequestEvent } from '../src/server/server.js';
import { decodeOptionReplies, Gates, RawClient, TestDevice } from './server-fixtures.js';

const MiB = 1024 * 1024;
const servers: NbdServer[] = [];
const dirs: string[] = [];

afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => s.close({ graceMs: 1000 })));
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

async function serve(device: TestDevice, name = 'vol0/primary') {
  const server = new NbdServer();
  servers.push(server);
  server.addExport(name, device);
  server.setDefaultExport(name);
  return server;
}

describe('NbdServer over sockets', () => {
  it('TCP: pipelined writes then reads on a port-0 listener', async () => {
    const device = new TestDevice(4 * MiB);
    const server = await serve(device);
    const addr = await server.listen({ host: '127.0.0.1', port: 0 });
    expect('port' in addr && addr.port > 0).toBe(true);
    const c = await RawClient.open(addr);
    await c.go('vol0/primary', false);
    const n = 32;
    const writes = Array.from({ length: n }, (_, i) => buildRequest({ type: CMD_WRITE, cookie: i, offset: i * 4096, length: 4096 }, Buffer.alloc(4096, i + 1)));
    c.socket.write(Buffer.concat(writes));
    expect((await c.replies(n)).every((r) => r.kind === 'simple' && r.error === 0)).toBe(true);
    c.start = c.bytes().length;
    const lengths = new Map<bigint, number>();
    const reads = Array.from({ length: n }, (_, i) => {
      lengths.set(BigInt(100 + i), 4096);
      return buildRequest({ type: CMD_READ, cookie: 100 + i, offset: i * 4096, length: 4096 });
    });
    c.socket.write(Buffer.concat(reads));
    const replies = await c.replies(n, lengths);
    for (const r of replies) {
      const i = Number(r.cookie) - 100;
      expect(r.kind === 'simple' && r.data.equals(Buffer.alloc(4096, i + 1))).toBe(true);
    }
    expect(server.connectionCount).toBe(1);
    c.socket.write(buildRequest({ type: CMD_DISC, cookie: 0, offset: 0, length: 0 }));
    await c.until((b) => (c.closed ? b : undefined), 'close').catch(() => undefined);
    expect(c.closed).toBe(true);
  });

  it('Unix socket listener, alongside TCP, with the default export', async () => {
    const device = new TestDevice(MiB);
    const server = await serve(device);
    const dir = mkdtempSync(join(tmpdir(), 'nbd-server-js-'));
    dirs.push(dir);
    const path = join(dir, 'sock');
    const [unixAddr, tcpAddr] = await Promise.all([server.listen({ path }), server.listen({ host: '127.0.0.1', port: 0 })]);
    expect(unixAddr).toEqual({ path });
    expect(nbdUri(unixAddr, 'vol0/primary')).toBe(`nbd+unix:///vol0%2Fprimary?socket=${path}`);
    for (const addr of [unixAddr, tcpAddr]) {
      const c = await RawClient.open(addr);
      await c.go('');
      c.socket.write(buildRequest({ type: CMD_FLUSH, cookie: 9, offset: 0, length: 0 }));
      expect(await c.replies(1)).toEqual([expect.objectContaining({ kind: 'simple', error: 0, cookie: 9n })]);
      c.socket.destroy();
    }
  });

  it('close(): in-flight work finishes and is answered, later requests get ESHUTDOWN, then sockets close', async () => {
    const device = new TestDevice(MiB);
    const gates = new Gates();
    const server = await serve(device);
    const addr = await server.listen({ host: '127.0.0.1', port: 0 });
    const c = await RawClient.open(addr);
    await c.go('vol0/primary');
    device.gate = gates.gate;
    c.socket.write(buildRequest({ type: CMD_WRITE, cookie: 1, offset: 0, length: 3 }, Buffer.from('abc')));
    await gates.until(1);
    const closing = server.close({ graceMs: 30_000 });
    c.socket.write(buildRequest({ type: CMD_FLUSH, cookie: 2, offset: 0, length: 0 }));
    const [refused] = await c.replies(1);
    expect(refused.cookie).toBe(2n);
    expect(refused.kind === 'chunk' && refused.payload.readUInt32BE(0)).toBe(NBD_ESHUTDOWN);
    gates.release('write@0');
    const replies = await c.replies(2);
    expect(replies[1]).toMatchObject({ kind: 'simple', error: 0, cookie: 1n });
    await closing;
    expect(device.data.toString('utf8', 0, 3)).toBe('abc');
    expect(server.connectionCount).toBe(0);
    await expect(RawClient.open(addr)).rejects.toThrow();
  });

  it('betweenBatches runs after each read, once its requests are with the device and before they complete', async () => {
    const device = new TestDevice(MiB);
    const gates = new Gates();
    const dispatched: number[] = [];
    const server = new NbdServer({ betweenBatches: () => dispatched.push(device.calls.length) });
    servers.push(server);
    server.addExport('vol0/primary', device);
    const addr = await server.listen({ host: '127.0.0.1', port: 0 });
    const c = await RawClient.open(addr);
    await c.go('vol0/primary');
    // The handshake's reads are batches too.
    expect(dispatched.length).toBeGreaterThan(0);
    const handshakeCalls = dispatched.length;
    const answered = c.bytes().length;
    device.gate = gates.gate;
    const n = 8;
    const writes = Array.from({ length: n }, (_, i) => buildRequest({ type: CMD_WRITE, cookie: i, offset: i * 512, length: 512 }, Buffer.alloc(512, i + 1)));
    c.socket.write(Buffer.concat(writes));
    await gates.until(n);
    // The read that brought the last request ran the callback before this test could resume.
    expect(dispatched.length).toBeGreaterThan(handshakeCalls);
    expect(dispatched.at(-1)).toBe(n);
    expect(dispatched.slice(handshakeCalls).every((count, i, all) => i === 0 || count >= all[i - 1])).toBe(true);
    expect(c.bytes().length).toBe(answered);
    for (let i = 0; i < n; i++) gates.release(`write@${i * 512}`);
    c.start = answered;
    expect((await c.replies(n)).every((r) => r.kind === 'simple' && r.error === 0)).toBe(true);
  });

  it('one misbehaving connection does not disturb another', async () => {
    const device = new TestDevice(MiB);
    const server = await serve(device);
    const addr = await server.listen({ host: '127.0.0.1', port: 0 });
    const good = await RawClient.open(addr);
    await good.go('vol0/primary');
    const bad = await RawClient.open(addr);
    bad.socket.write(Buffer.concat([buildClientFlags(3), Buffer.alloc(64, 0x41)]));
    await bad.until((b) => (bad.closed ? b : undefined), 'bad closed').catch(() => undefined);
    expect(bad.closed).toBe(true);
    const half = await RawClient.open(addr);
    await half.go('vol0/primary');
    half.socket.write(buildRequest({ type: CMD_WRITE, cookie: 1, offset: 0, length: 4096 }).subarray(0, 100));
    half.socket.destroy();
    good.socket.write(buildRequest({ type: CMD_WRITE, cookie: 7, offset: 10, length: 2 }, Buffer.from('hi')));
    expect(await good.replies(1)).toEqual([expect.objectContaining({ kind: 'simple', error: 0, cookie: 7n })]);
    expect(device.data.toString('utf8', 10, 12)).toBe('hi');
  });

  it("emits a 'request' event per completed command", async () => {
    const device = new TestDevice(MiB);
    const server = await serve(device);
    const events: RequestEvent[] = [];
    server.on('request', (ev: RequestEvent) => events.push(ev));
    const addr = await server.listen({ host: '127.0.0.1', port: 0 });
    const c = await RawClient.open(addr);
    await c.go('vol0/primary');
    c.socket.write(buildRequest({ type: CMD_WRITE, cookie: 1, offset: 0, length: 512 }, Buffer.alloc(512)));
    c.socket.write(buildRequest({ type: CMD_READ, cookie: 2, offset: MiB, length: 512 }));
    await c.replies(2, new Map());
    expect(events.map((e) => [e.exportName, e.command, e.bytes, e.error])).toEqual([
      ['vol0/primary', 'write', 512, undefined],
      ['vol0/primary', 'read', 512, 'EINVAL'],
    ]);
    expect(events.every((e) => typeof e.durationNs === 'bigint')).toBe(true);
  });

  it('closeExportConnections fences the connections of one export and keeps serving it to new ones', async () => {
    const device = new TestDevice(MiB);
    const server = await serve(device);
    server.addExport('other', new TestDevice(MiB));
    const addr = await server.listen({ host: '127.0.0.1', port: 0 });
    const old = await NbdClient.connect(addr, { exportName: 'vol0/primary' });
    const bystander = await NbdClient.connect(addr, { exportName: 'other' });
    await old.write(Buffer.from('old'), 0);
    await server.closeExportConnections('vol0/primary', { graceMs: 1000 });
    expect(server.exportConnectionCount('vol0/primary')).toBe(0);
    await expect(old.write(Buffer.from('late'), 0)).rejects.toMatchObject({ code: expect.stringMatching(/^(EIO|ESHUTDOWN)$/) });
    expect(device.data.toString('utf8', 0, 3)).toBe('old');
    const fresh = await NbdClient.connect(addr, { exportName: 'vol0/primary' });
    await fresh.write(Buffer.from('new'), 0);
    expect(device.data.toString('utf8', 0, 3)).toBe('new');
    await bystander.write(Buffer.from('x'), 0);
    expect(() => server.closeExportConnections('nope')).toThrow(/no export/);
    await Promise.all([fresh.close(), bystander.close()]);
  });

  it('export registry: duplicates and unknown defaults are refused; removed exports vanish', async () => {
    const server = new NbdServer();
    servers.push(server);
    const device = new TestDevice(4096);
    server.addExport('a', device);
    expect(() => server.addExport('a', device)).toThrow();
    expect(() => server.setDefaultExport('b')).toThrow();
    server.removeExport('a');
    const addr = await server.listen({ host: '127.0.0.1', port: 0 });
    const c = await RawClient.open(addr);
    c.socket.write(Buffer.concat([buildClientFlags(3), buildGoOption('a')]));
    const [reply] = await c.until((b) => {
      const r = b.length > 18 ? decodeOptionReplies(b.subarray(18)).replies : [];
      return r.length > 0 ? r : undefined;
    }, 'GO reply');
    expect(reply.type >>> 0).toBe(0x80000006);
    c.socket.destroy();
  });
});

describe('receiving WRITE payloads straight into place', () => {
  /** A prime-length pattern, so bytes landing at a wrong offset within a payload show. */
  const pattern = Buffer.from(Array.from({ length: 251 }, (_, i) => (i * 37 + 11) & 0xff));

  it('WRITEs of every size, sent in arbitrary pieces over TCP and Unix, land intact; large ones skip the copy', async () => {
    const sizeBytes = 8 * MiB;
    const device = new TestDevice(sizeBytes);
    const server = await serve(device);
    const dir = mkdtempSync(join(tmpdir(), 'nbd-server-js-'));
    dirs.push(dir);
    const addrs = [await server.listen({ host: '127.0.0.1', port: 0 }), await server.listen({ path: join(dir, 'sock') })];
    const modes: string[] = [];
    let directBytes = 0;
    server.on('connection', (e: { receiveMode: string }) => modes.push(e.receiveMode));
    const model = Buffer.alloc(sizeBytes);
    const write = fc.record({
      offset: fc.nat(sizeBytes - 1),
      length: fc.oneof(fc.integer({ min: 1, max: 4096 }), fc.integer({ min: 60 * 1024, max: 3 * MiB })),
      shift: fc.nat(250),
    });
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(0, 1),
        fc.array(write, { minLength: 1, maxLength: 10 }),
        // Tiny pieces cut headers apart, which leaves unparsed bytes in the read buffer.
        fc.array(fc.oneof(fc.integer({ min: 1, max: 40 }), fc.integer({ min: 1, max: 400_000 })), { minLength: 1, maxLength: 30 }),
        async (which, writes, pieces) => {
          const c = await RawClient.open(addrs[which]);
          await c.go('', false);
          const frames = writes.map((w, i) => {
            const length = Math.min(w.length, sizeBytes - w.offset);
            const payload = Buffer.alloc(length, pattern.subarray(w.shift));
            payload.copy(model, w.offset);
            return buildRequest({ type: CMD_WRITE, cookie: i, offset: w.offset, length }, payload);
          });
          const stream = Buffer.concat(frames);
          for (let at = 0, i = 0; at < stream.length; i++) {
            const n = pieces[i % pieces.length];
            await new Promise<void>((resolve) => c.socket.write(stream.subarray(at, at + n), () => resolve()));
            at += n;
          }
          const replies = await c.replies(writes.length);
          expect(replies.every((r) => r.kind === 'simple' && r.error === 0)).toBe(true);
          expect(device.data.equals(model)).toBe(true);
          const closed = new Promise<void>((resolve) => server.once('close-connection', (e: { directBytes: number }) => {
            directBytes += e.directBytes;
            resolve();
          }));
          c.socket.destroy();
          await closed;
        },
      ),
      { numRuns: 40 },
    );
    expect(modes.every((m) => m === 'direct'), `receive modes ${modes.join(',')}: this Node's socket internals changed`).toBe(true);
    expect(directBytes).toBeGreaterThan(0);
  });

  it('an adopted socket still counts as the listening server\'s connection until it closes', async () => {
    const listener = createServer({ pauseOnConnect: true });
    await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', resolve));
    const port = (listener.address() as AddressInfo).port;
    const accepted = new Promise<Socket>((resolve) => listener.once('connection', resolve));
    const client = connect(port, '127.0.0.1');
    const received: Buffer[] = [];
    const chunk = Buffer.alloc(1024);
    const adopted = adoptWithReceiver(await accepted, {
      buffer: () => chunk,
      received: (n, buf) => received.push(Buffer.from(buf.subarray(0, n))),
    });
    expect(adopted).not.toBeNull();
    const count = () => new Promise<number>((resolve, reject) => listener.getConnections((err, n) => (err ? reject(err) : resolve(n))));
    expect(await count()).toBe(1);
    let listenerClosed = false;
    const closing = new Promise<void>((resolve) => listener.close(() => {
      listenerClosed = true;
      resolve();
    }));
    const ended = new Promise<void>((resolve) => adopted!.once('end', resolve));
    client.end('hello');
    await ended;
    expect(Buffer.concat(received).toString()).toBe('hello');
    expect(listenerClosed).toBe(false);
    adopted!.destroy();
    await closing;
    expect(await count()).toBe(0);
  });

  it('bytes trickling in one per read do not each hold a read chunk', async () => {
    const server = await serve(new TestDevice(MiB));
    const addr = await server.listen({ host: '127.0.0.1', port: 0 });
    const c = await RawClient.open(addr);
    await c.until((b) => (b.length >= 18 ? true : undefined), 'greeting');
    // Past 4 KiB unparsed, leftovers are no longer copied out, so the read chunks themselves are held.
    const optionBytes = 8000;
    const option = buildOption(999, Buffer.alloc(optionBytes, 7));
    c.socket.write(Buffer.concat([buildClientFlags(3), option.subarray(0, 16)]));
    const before = process.memoryUsage().arrayBuffers;
    let peak = 0;
    for (let i = 16; i < option.length - 1; i++) {
      await new Promise<void>((resolve) => c.socket.write(option.subarray(i, i + 1), () => resolve()));
      await new Promise<void>((resolve) => setImmediate(resolve));
      peak = Math.max(peak, process.memoryUsage().arrayBuffers - before);
    }
    c.socket.write(option.subarray(option.length - 1));
    const replies = await c.until((b) => {
      const { replies } = decodeOptionReplies(b.subarray(18));
      return replies.length >= 1 ? replies : undefined;
    }, 'the option reply');
    expect(replies[0]).toMatchObject({ option: 999, type: REP_ERR_UNSUP });
    // One 64 KiB chunk per byte past the first 4 KiB would be about 250 MiB here.
    expect(peak).toBeLessThan(16 * MiB);
    c.socket.destroy();
  });
});

describe('nbdUri', () => {
  it('encodes export names and brackets IPv6 hosts', () => {
    expect(nbdUri({ host: '127.0.0.1', port: 10809 }, 'vol0/primary')).toBe('nbd://127.0.0.1:10809/vol0%2Fprimary');
    expect(nbdUri({ host: '::1', port: 1 }, '')).toBe('nbd://[::1]:1/');
    expect(nbdUri({ path: '/tmp/a b.sock' }, 'x')).toBe('nbd+unix:///x?socket=/tmp/a%20b.sock');
  });
});
