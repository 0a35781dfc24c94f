/**
 * Goal: NbdClient interoperates with a server we did not write.
 * Method: start `nbdkit memory` on a free loopback port (ready when its --run command prints), drive
 * it through NbdClient with structured and simple replies, and check the bytes read back.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '../src/client.js';
import { EXTENT_HOLE, EXTENT_ZERO } from '@gannet/block-device';

const sizeBytes = 64 * 1024 * 1024;
const readyMsMax = 10_000;

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = (i * 7 + seed) & 0xff;
  return b;
}

async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/** Runs nbdkit until stdin closes: its --run command is `cat`, and nbdkit exits when that does. */
async function startNbdkit(): Promise<{ child: ChildProcess; port: number }> {
  const probe = spawnSync('nbdkit', ['--version'], { encoding: 'utf8' });
  if (probe.error || probe.status !== 0) {
    throw new Error(`nbdkit is required for this test and was not found on PATH (${probe.error?.message ?? probe.stderr})`);
  }
  const port = await freePort();
  const child = spawn('nbdkit', ['--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), 'memory', String(sizeBytes), '--run', 'echo ready; cat >/dev/null'], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`nbdkit not ready within ${readyMsMax} ms: ${stderr}`)), readyMsMax);
    child.stdout!.on('data', (d: Buffer) => {
      if (d.toString().includes('ready')) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`nbdkit exited early with code ${code}: ${stderr}`));
    });
  });
  return { child, port };
}

describe('NbdClient against nbdkit memory', () => {
  let nbdkit: { child: ChildProcess; port: number };
  let address: { host: string; port: number };

  beforeAll(async () => {
    nbdkit = await startNbdkit();
    address = { host: '127.0.0.1', port: nbdkit.port };
  });
  afterAll(async () => {
    const { child } = nbdkit;
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.stdin!.end();
    child.kill('SIGTERM');
    await exited;
  });

  it('negotiates structured replies, base:allocation and the export size', async () => {
    const client = await NbdClient.connect(address);
    try {
      expect(client.size).toBe(sizeBytes);
      expect(client.structuredReplies).toBe(true);
      expect(client.capabilities).toMatchObject({ readOnly: false, flush: true, trim: true, zero: true, extents: true });
    } finally {
      await client.close();
    }
  });

  it('writes, reads back, zeroes, trims and reports extents', async () => {
    const client = await NbdClient.connect(address);
    try {
      const base = 1024 * 1024;
      const data = pattern(200_000, 3);
      await client.write(data, base + 5, { fua: true });
      expect((await client.readBytes(base + 5, data.length)).equals(data)).toBe(true);
      expect((await client.readBytes(base + 5, 4096, { df: true })).equals(data.subarray(0, 4096))).toBe(true);

      await client.writeZeroes(base + 4096, 8192);
      const expected = Buffer.from(data);
      expected.fill(0, 4096 - 5, 4096 - 5 + 8192);
      expect((await client.readBytes(base + 5, data.length)).equals(expected)).toBe(true);

      await client.trim(base, 1024 * 1024);
      await client.flush();
      expect((await client.readBytes(base, 1024 * 1024)).equals(Buffer.alloc(1024 * 1024))).toBe(true);

      // A far region never written is a hole that reads as zeroes.
      const extents = await client.extents(32 * 1024 * 1024, 1024 * 1024);
      expect(extents.length).toBeGreaterThan(0);
      expect(extents[0].flags).toBe(EXTENT_HOLE | EXTENT_ZERO);
      await client.write(pattern(65536, 1), 40 * 1024 * 1024);
      const written = await client.extents(40 * 1024 * 1024, 65536, { reqOne: true });
      expect(written).toHaveLength(1);
      expect(written[0].flags & EXTENT_ZERO).toBe(0);
    } finally {
      await client.close();
    }
  });

  it('pipelines 64 mixed requests', async () => {
    const client = await NbdClient.connect(address);
    try {
      const slot = 16384;
      const writes = Array.from({ length: 32 }, (_, i) => client.write(pattern(slot, i), 8 * 1024 * 1024 + i * slot));
      const reads = Array.from({ length: 32 }, (_, i) => client.readBytes(16 * 1024 * 1024 + i * slot, slot));
      expect(client.inflightCount).toBe(64);
      await Promise.all(writes);
      for (const b of await Promise.all(reads)) expect(b.equals(Buffer.alloc(slot))).toBe(true);
      const back = await Promise.all(Array.from({ length: 32 }, (_, i) => client.readBytes(8 * 1024 * 1024 + i * slot, slot)));
      back.forEach((b, i) => expect(b.equals(pattern(slot, i)), `slot ${i}`).toBe(true));
    } finally {
      await client.close();
    }
  });

  it('works with simple replies only', async () => {
    const client = await NbdClient.connect(address, { structuredReplies: false });
    try {
      expect(client.structuredReplies).toBe(false);
      const data = pattern(10_000, 9);
      await client.write(data, 12345);
      expect((await client.readBytes(12345, data.length)).equals(data)).toBe(true);
    } finally {
      await client.close();
    }
  });

  it('maps server-side range errors to codes when not strict', async () => {
    const client = await NbdClient.connect(address, { strict: false });
    try {
      await expect(client.readBytes(sizeBytes - 1, 2)).rejects.toMatchObject({ code: 'EINVAL' });
      await expect(client.write(Buffer.alloc(2), sizeBytes - 1)).rejects.toMatchObject({ code: 'ENOSPC' });
      expect((await client.readBytes(0, 1)).length).toBe(1);
    } finally {
      await client.close();
    }
  });

  it('lists the export', async () => {
    const list = await NbdClient.list(address);
    expect(list.length).toBeGreaterThanOrEqual(1);
  });
});
