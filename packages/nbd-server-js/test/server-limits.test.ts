/**
 * Goal: what a client can make the server hold is bounded, and a well-behaved client keeps working at
 * the bounds. The memory budget (shared by every connection, with a reserve for connections holding
 * little), the watchdog (handshake timeout, budget held without progress), the connection caps, and
 * the payload pool giving memory back after a burst.
 * Method: MemoryBudget and PayloadPool on their own (grants are observed as they are made; the pool's
 * collection timer runs under fake timers), then an NbdServer on loopback with a memory device, driven
 * by raw connections (server-fixtures.ts) whose requests are built with the spec-named builders. Where
 * a test must know the server has reached a state it does not announce (a connection waiting for
 * memory), it polls `server.memory` until a deadline.
 */
import { connect } from 'node:net';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { MemoryDevice } from '@gannet/block-device';
import { buildClientFlags, buildGoOption, buildInfoOption, buildRequest } from '../src/protocol/builders.js';
import { CMD_READ, CMD_WRITE, OPT_GO, OPT_INFO, REP_ACK, REP_ERR_POLICY, REP_INFO } from '../src/protocol/constants.js';
import { NbdClient } from '../src/client.js';
import { MemoryAccount, MemoryBudget, reserveHolderBytesMax } from '../src/server/memory-budget.js';
import { collectAfterDroppedBytes, collectIntervalMsMin, PayloadPool } from '../src/server/payload-pool.js';
import { memoryBytesMinFor, NbdServer, type DroppedEvent, type NbdServerOptions, type RefusedEvent } from '../src/server/server.js';
import type { ListenAddress } from '../src/server/uri.js';
import { decodeOptionReplies, RawClient } from './server-fixtures.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const deadlineMs = 10_000;
const servers: NbdServer[] = [];
const raws: RawClient[] = [];

afterEach(async () => {
  vi.useRealTimers();
  for (const r of raws.splice(0)) r.socket.destroy();
  await Promise.all(servers.splice(0).map((s) => s.close({ graceMs: 100 })));
});

async function until(check: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + deadlineMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

const microtasks = () => new Promise<void>((resolve) => setImmediate(resolve));

describe('MemoryBudget', () => {
  it('bulk holders stop short of the reserve; connections holding little may use it', () => {
    const budget = new MemoryBudget(64 * MiB);
    expect(budget.reserveBytes).toBe(8 * MiB);
    const big = new MemoryAccount();
    expect(budget.take(big, 32 * MiB)).toBe(true);
    expect(budget.take(big, 24 * MiB)).toBe(true);
    // The bulk part (56 MiB) is full: more than a small holder's share must wait.
    expect(budget.take(new MemoryAccount(), reserveHolderBytesMax + 1)).toBe(false);
    const small = [new MemoryAccount(), new MemoryAccount()];
    expect(budget.take(small[0], reserveHolderBytesMax)).toBe(true);
    expect(budget.take(small[1], reserveHolderBytesMax)).toBe(true);
    expect(budget.usedBytes).toBe(64 * MiB);
    expect(budget.take(new MemoryAccount(), 1)).toBe(false);
  });

  it('waiters are granted in order, the bytes counted before they are told, and newcomers do not overtake them', async () => {
    const budget = new MemoryBudget(64 * MiB);
    const holder = new MemoryAccount();
    expect(budget.take(holder, 40 * MiB)).toBe(true);
    const first = new MemoryAccount();
    const second = new MemoryAccount();
    const granted: string[] = [];
    budget.wait(first, 24 * MiB, () => granted.push('first'));
    // 16 bulk MiB are free: enough for the second waiter, but it may not pass the first, nor may a newcomer.
    budget.wait(second, 8 * MiB, () => granted.push('second'));
    expect(budget.take(new MemoryAccount(), 8 * MiB)).toBe(false);
    await microtasks();
    expect(granted).toEqual([]);
    budget.give(holder, 8 * MiB);
    expect(first.granted).toBe(24 * MiB);
    expect(granted).toEqual([]);
    await microtasks();
    expect(granted).toEqual(['first']);
    budget.give(holder, 32 * MiB);
    await microtasks();
    expect(granted).toEqual(['first', 'second']);
    expect(budget.usedBytes).toBe(32 * MiB);
    expect(budget.waitingCount).toBe(0);
  });

  it("a bulk waiter that gives back its own memory joins the reserve's queue; cancel returns an unclaimed grant", async () => {
    const budget = new MemoryBudget(64 * MiB);
    const hog = new MemoryAccount();
    expect(budget.take(hog, 56 * MiB)).toBe(true);
    const client = new MemoryAccount();
    expect(budget.take(client, 4 * MiB)).toBe(true);
    let granted = false;
    budget.wait(client, MiB, () => (granted = true));
    await microtasks();
    expect(granted).toBe(false);
    // The client's own request completes: holding 3 MiB, the next 1 MiB fits the reserve.
    budget.give(client, MiB);
    await microtasks();
    expect(granted).toBe(true);
    budget.cancel(client);
    expect(client.granted).toBe(0);
    expect(client.held).toBe(3 * MiB);
  });
});

describe('PayloadPool', () => {
  it('asks for a collection once it has dropped enough, no more often than the interval allows', () => {
    vi.useFakeTimers();
    const pool = new PayloadPool(4 * MiB);
    const bufs = Array.from({ length: collectAfterDroppedBytes / (4 * MiB) + 1 }, () => pool.acquire(4 * MiB));
    for (const b of bufs) pool.release(b);
    expect(pool.retainedBytes).toBe(4 * MiB);
    expect(pool.droppedBytes).toBe(collectAfterDroppedBytes);
    vi.advanceTimersByTime(collectIntervalMsMin);
    expect(pool.droppedBytes).toBe(0);
    pool.close();
  });
});

async function serve(options: NbdServerOptions, exports: string[] = ['d']) {
  const server = new NbdServer(options);
  servers.push(server);
  for (const name of exports) server.addExport(name, new MemoryDevice(128 * MiB));
  const address = await server.listen({ host: '127.0.0.1', port: 0 });
  const refused: RefusedEvent[] = [];
  const dropped: DroppedEvent[] = [];
  server.on('refused', (e: RefusedEvent) => refused.push(e));
  server.on('dropped', (e: DroppedEvent) => dropped.push(e));
  return { server, address, refused, dropped };
}

/** A raw connection in transmission, with simple replies (READ data always sent whole). */
async function transmission(address: ListenAddress, name = 'd'): Promise<RawClient> {
  const c = await RawClient.open(address);
  raws.push(c);
  await c.go(name, false);
  return c;
}

function closedBy(c: RawClient): Promise<void> {
  return c.until((_b) => (c.closed ? true : undefined), 'close').then(() => undefined, () => undefined);
}

describe('NbdServer memory budget over sockets', () => {
  const budget = memoryBytesMinFor(32 * MiB) + 2 * MiB;

  it('a WRITE that does not fit waits unread while a small client carries on; it runs once memory is back', async () => {
    const { server, address } = await serve({ memoryBytesMax: budget });
    const stalled = await transmission(address);
    stalled.socket.write(buildRequest({ type: CMD_WRITE, cookie: 1, offset: 0, length: 32 * MiB }));
    stalled.socket.write(Buffer.alloc(31 * MiB, 1));
    await until(() => server.memory.usedBytes === 32 * MiB, 'the first payload taking its budget');

    const waiting = await transmission(address);
    const second = Buffer.alloc(32 * MiB, 2);
    waiting.socket.write(Buffer.concat([buildRequest({ type: CMD_WRITE, cookie: 2, offset: 32 * MiB, length: 32 * MiB }), second]));
    await until(() => server.memory.waitingConnections === 1, 'the second WRITE waiting for memory');
    expect(server.memory.usedBytes).toBe(32 * MiB);

    const small = await NbdClient.connect(address, { exportName: 'd' });
    for (let i = 0; i < 20; i++) {
      const data = Buffer.alloc(256 * KiB, i);
      await small.write(data, 96 * MiB);
      expect((await small.readBytes(96 * MiB, 256 * KiB)).equals(data)).toBe(true);
    }
    expect(server.memory.waitingConnections).toBe(1);

    stalled.socket.write(Buffer.alloc(MiB, 1));
    expect(await stalled.replies(1)).toEqual([expect.objectContaining({ kind: 'simple', error: 0, cookie: 1n })]);
    expect(await waiting.replies(1)).toEqual([expect.objectContaining({ kind: 'simple', error: 0, cookie: 2n })]);
    expect((await small.readBytes(32 * MiB, 32 * MiB)).equals(second)).toBe(true);
    await small.close();
    await until(() => server.memory.usedBytes === 0, 'budget returned');
  });

  it('a client that stops sending a WRITE payload is dropped after the stall timeout, and its memory returns', async () => {
    const { server, address, dropped } = await serve({ memoryBytesMax: budget, stallTimeoutMs: 200 });
    const c = await transmission(address);
    c.socket.write(buildRequest({ type: CMD_WRITE, cookie: 1, offset: 0, length: 8 * MiB }));
    c.socket.write(Buffer.alloc(4 * MiB));
    await closedBy(c);
    expect(dropped).toEqual([expect.objectContaining({ reason: 'stalled' })]);
    await until(() => server.memory.usedBytes === 0, 'budget returned');
  });

  it('a client that does not read its READ replies is dropped after the stall timeout', async () => {
    const { server, address, dropped } = await serve({ memoryBytesMax: budget, stallTimeoutMs: 200 });
    const c = await transmission(address);
    c.socket.pause();
    c.socket.write(Buffer.concat([1, 2].map((cookie) => buildRequest({ type: CMD_READ, cookie, offset: 0, length: 32 * MiB }))));
    await until(() => dropped.length === 1, 'the drop');
    expect(dropped[0].reason).toBe('stalled');
    await until(() => server.memory.usedBytes === 0, 'budget returned');
  });

  it('a slow client that keeps moving its payload is not dropped', async () => {
    const { address, dropped } = await serve({ memoryBytesMax: budget, stallTimeoutMs: 200 });
    const c = await transmission(address);
    const length = 16 * MiB;
    c.socket.write(buildRequest({ type: CMD_WRITE, cookie: 1, offset: 0, length }));
    const piece = 2 * MiB;
    for (let at = 0; at < length; at += piece) {
      // 2 MiB every 100 ms: twice the 1 MiB per stall timeout a holder must move.
      await new Promise((resolve) => setTimeout(resolve, 100));
      c.socket.write(Buffer.alloc(piece, 7));
    }
    expect(await c.replies(1)).toEqual([expect.objectContaining({ error: 0, cookie: 1n })]);
    expect(dropped).toEqual([]);
  });

  it('refuses a budget that could never hold the largest request', () => {
    expect(() => new NbdServer({ memoryBytesMax: 32 * MiB })).toThrow(/memoryBytesMax must be at least/);
  });
});

describe('NbdServer connection limits', () => {
  it('past connectionsMax a connection is closed without a greeting, and reported', async () => {
    const { address, refused } = await serve({ connectionsMax: 2 });
    await transmission(address);
    await transmission(address);
    const third = await RawClient.open(address);
    raws.push(third);
    await closedBy(third);
    expect(third.bytes().length).toBe(0);
    expect(refused).toEqual([expect.objectContaining({ reason: 'connections-max' })]);
  });

  it('a handshake that does not finish in time is dropped', async () => {
    const { address, dropped } = await serve({ handshakeTimeoutMs: 100 });
    const idle = await RawClient.open(address);
    raws.push(idle);
    await closedBy(idle);
    expect(dropped).toEqual([expect.objectContaining({ reason: 'handshake-timeout' })]);
    // Transmission is not subject to it.
    const busy = await transmission(address);
    busy.socket.write(buildRequest({ type: CMD_READ, cookie: 5, offset: 0, length: 4096 }));
    expect(await busy.replies(1, new Map([[5n, 4096]]))).toEqual([expect.objectContaining({ error: 0, cookie: 5n })]);
  });

  it('past exportConnectionsMax, GO is refused with NBD_REP_ERR_POLICY while INFO and other exports still work', async () => {
    const { address, refused } = await serve({ exportConnectionsMax: 1 }, ['a', 'b']);
    await transmission(address, 'a');
    const c = await RawClient.open(address);
    raws.push(c);
    c.socket.write(Buffer.concat([buildClientFlags(3), buildInfoOption('a'), buildGoOption('a')]));
    const replies = await c.until((b) => {
      if (b.length < 18) return undefined;
      const r = decodeOptionReplies(b.subarray(18)).replies;
      return r.length >= 4 ? r : undefined;
    }, 'INFO and GO replies');
    expect(replies.filter((r) => r.option === OPT_INFO).map((r) => r.type)).toEqual([REP_INFO, REP_INFO, REP_ACK]);
    expect(replies.find((r) => r.option === OPT_GO)?.type).toBe(REP_ERR_POLICY);
    expect(refused).toEqual([expect.objectContaining({ reason: 'export-connections-max', exportName: 'a' })]);
    await transmission(address, 'b');
  });

  it('a closed transmission connection frees its export slot', async () => {
    const { server, address } = await serve({ exportConnectionsMax: 1 });
    const first = await NbdClient.connect(address, { exportName: 'd' });
    await first.close();
    await until(() => server.connectionCount === 0, 'the first connection gone');
    const second = await NbdClient.connect(address, { exportName: 'd' });
    await second.close();
  });

  it('refused sockets are not counted as connections', async () => {
    const { server, address } = await serve({ connectionsMax: 1 });
    const held = await transmission(address);
    const { host, port } = address as { host: string; port: number };
    const sockets = Array.from({ length: 20 }, () => connect(port, host).on('error', () => {}));
    await Promise.all(sockets.map((s) => new Promise((resolve) => s.once('close', resolve))));
    expect(server.connectionCount).toBe(1);
    held.socket.write(buildRequest({ type: CMD_READ, cookie: 9, offset: 0, length: 512 }));
    expect(await held.replies(1, new Map([[9n, 512]]))).toEqual([expect.objectContaining({ error: 0, cookie: 9n })]);
  });
});
