/**
 * Goal: a flood of idle NBD connections cannot take the daemon's descriptors, its control API or its
 * NBD service away (issue 11, item 2: 20,000 idle sockets left the control API unable to answer and
 * new clients failing at the greeting). At the connection cap, new connections are closed at once and
 * counted; checkpoint and failover still work through the control API; once the flood ends, a new
 * client is served. Idle handshakes are dropped after the handshake timeout, and the descriptor limit
 * is raised to the hard limit at start (or the cap fitted below it when it cannot be). The control
 * API's own cap bounds a flood of its port, and a second listener (its Unix socket) keeps answering.
 *
 * Method: real daemons. The flood is plain TCP connections from this process that never send a byte
 * (so they sit in the handshake); we wait on events (sockets the daemon closed, counters in /metrics),
 * never on time. Descriptor limits are set with util-linux's prlimit, which execs the daemon.
 */
import { readdir } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { NbdClient } from 'nbd-server-js';
import { api, gannet, makeTempDir, startDaemon, stopAll, type DaemonHandle } from './helpers/daemon.js';
import { subscribe } from './helpers/events.js';
import { requireTool } from './helpers/process.js';

const connectionsMax = 5_000;
const floodSockets = 8_000;
/** Sockets opened at once while flooding: enough to be quick, few enough for the listen backlog. */
const connectBatch = 200;
const waitMsMax = 30_000;
const MiB = 1024 * 1024;

afterEach(stopAll);

interface Flood {
  readonly sockets: Socket[];
  /** Sockets the daemon closed on us. */
  closedByServer(): number;
  end(): Promise<void>;
}

async function flood(address: { host: string; port: number }, count: number): Promise<Flood> {
  const sockets: Socket[] = [];
  let closed = 0;
  let ending = false;
  const open = () =>
    new Promise<void>((resolve, reject) => {
      const s = connect(address.port, address.host);
      s.once('connect', () => resolve());
      s.once('error', (error: NodeJS.ErrnoException) => {
        // A reset of a refused connection is the refusal; anything before connecting is a failure.
        if (!s.connecting) return;
        reject(error);
      });
      s.once('close', () => {
        if (!ending) closed += 1;
      });
      // The greeting is read and ignored: these clients never answer it.
      s.on('data', () => {});
      sockets.push(s);
    });
  for (let i = 0; i < count; i += connectBatch) {
    await Promise.all(Array.from({ length: Math.min(connectBatch, count - i) }, open));
  }
  return {
    sockets,
    closedByServer: () => closed,
    async end() {
      ending = true;
      await Promise.all(sockets.map((s) => new Promise<void>((resolve) => {
        if (s.destroyed) resolve();
        else {
          s.once('close', () => resolve());
          s.destroy();
        }
      })));
    },
  };
}

async function metric(daemon: DaemonHandle, line: RegExp): Promise<number> {
  const { text } = await api(daemon, 'GET', '/metrics');
  const match = line.exec(text);
  if (!match) throw new Error(`no ${line} in /metrics`);
  return Number(match[1]);
}

/** Polls `read` until `done` holds; the answer comes from the daemon, the loop only paces the asking. */
async function until<T>(read: () => Promise<T>, done: (value: T) => boolean, what: string): Promise<T> {
  const deadline = Date.now() + waitMsMax;
  for (;;) {
    const value = await read();
    if (done(value)) return value;
    if (Date.now() > deadline) throw new Error(`${what}: still ${JSON.stringify(value)} after ${waitMsMax} ms`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

const refusedAtCap = /^gannet_nbd_connections_refused_total\{reason="connections-max"\} (\d+)$/m;
const openConnections = /^gannet_nbd_connections (\d+)$/m;
const droppedHandshake = /^gannet_nbd_connections_dropped_total\{reason="handshake-timeout"\} (\d+)$/m;

async function roundTrip(daemon: DaemonHandle, exportName: string): Promise<void> {
  const client = await NbdClient.connect(daemon.nbd, { exportName });
  const data = Buffer.alloc(MiB, 0x5c);
  await client.write(data, 0);
  expect((await client.readBytes(0, MiB)).equals(data)).toBe(true);
  await client.close();
}

describe('NBD connection limits', () => {
  it(`${floodSockets} idle sockets against a cap of ${connectionsMax}: control calls succeed, extra clients are refused, and the flood's end frees the cap`, async () => {
    const daemon = await startDaemon({
      volumes: ['vol0:64M', 'vol1:64M'],
      // Idle handshakes are kept for the whole test: the flood must hold the cap, not time out.
      args: ['--nbd-connections-max', String(connectionsMax), '--nbd-handshake-timeout-ms', '600000'],
    });
    const f = await flood(daemon.nbd, floodSockets);
    await until(async () => f.closedByServer(), (n) => n >= floodSockets - connectionsMax, 'flood sockets refused');
    expect(await metric(daemon, openConnections)).toBe(connectionsMax);
    expect(await metric(daemon, refusedAtCap)).toBe(floodSockets - connectionsMax);

    // The control API answers: checkpoints (one volume, then the group) and a failover.
    const startMs = Date.now();
    const one = await api(daemon, 'POST', '/v1/volumes/vol0/checkpoint');
    expect(one.status, one.text).toBe(200);
    const group = await api(daemon, 'POST', '/v1/checkpoint', {});
    expect(group.status, group.text).toBe(200);
    const failover = await api(daemon, 'POST', '/v1/volumes/vol1/failover', { to: 'secondary' });
    expect(failover.status, failover.text).toBe(200);
    expect(failover.json.state).toMatch(/fail/);
    process.stdout.write(`nbd flood: ${connectionsMax} held, ${floodSockets - connectionsMax} refused; checkpoint, group checkpoint and failover took ${Date.now() - startMs} ms\n`);

    // A new client at the cap is turned away cleanly, and counted.
    await expect(NbdClient.connect(daemon.nbd, { exportName: 'vol0/primary' })).rejects.toThrow(/closed|ECONNRESET/);
    expect(await metric(daemon, refusedAtCap)).toBe(floodSockets - connectionsMax + 1);

    await f.end();
    await until(() => metric(daemon, openConnections), (n) => n === 0, 'flood connections closed');
    await roundTrip(daemon, 'vol0/primary');
    await roundTrip(daemon, 'vol1/secondary');
    expect(daemon.child.exitCode, daemon.stderr()).toBeNull();
  }, 120_000);

  it('idle handshakes are dropped after the handshake timeout, and counted', async () => {
    const idle = 50;
    const daemon = await startDaemon({ args: ['--nbd-handshake-timeout-ms', '300'] });
    const events = await subscribe(daemon);
    const f = await flood(daemon.nbd, idle);
    await until(async () => f.closedByServer(), (n) => n === idle, 'idle handshakes dropped');
    expect(await metric(daemon, droppedHandshake)).toBe(idle);
    // The event stream says so too, batched: every drop is in an nbd-limits event's counts.
    let dropped = 0;
    while (dropped < idle) {
      const event = await events.next((e) => e.event === 'nbd-limits');
      expect(event.data.volume).toBe('');
      dropped += event.data.counts['dropped:handshake-timeout'] ?? 0;
    }
    expect(dropped).toBe(idle);
    await events.close();
    // A client that does its handshake in time is not affected.
    await roundTrip(daemon, 'vol0/primary');
    await f.end();
  });

  it('per-export cap: GO beyond it is refused with NBD_REP_ERR_POLICY, other exports still open', async () => {
    const daemon = await startDaemon({ volumes: ['vol0:64M', 'vol1:64M'], args: ['--nbd-export-connections-max', '2'] });
    const held = [await NbdClient.connect(daemon.nbd, { exportName: 'vol0/primary' }), await NbdClient.connect(daemon.nbd, { exportName: 'vol0/primary' })];
    const events = await subscribe(daemon);
    await expect(NbdClient.connect(daemon.nbd, { exportName: 'vol0/primary' })).rejects.toThrow(/NBD_REP_ERR_POLICY/);
    expect(await metric(daemon, /^gannet_nbd_connections_refused_total\{reason="export-connections-max"\} (\d+)$/m)).toBe(1);
    expect((await events.next((e) => e.event === 'nbd-limits')).data.counts).toEqual({ 'refused:export-connections-max': 1 });
    await events.close();
    await roundTrip(daemon, 'vol0/secondary');
    await held[0].close();
    await roundTrip(daemon, 'vol0/primary');
    await held[1].close();
  });

  it('raises the soft descriptor limit to the hard limit at start', async () => {
    const prlimit = requireTool('prlimit');
    const daemon = await startDaemon({ wrapper: [prlimit, '--nofile=1024:8192', '--'] });
    const limits = /^Max open files\s+(\d+)\s+(\d+)/m.exec(await import('node:fs/promises').then((fs) => fs.readFile(`/proc/${daemon.child.pid}/limits`, 'utf8')));
    expect(limits?.slice(1, 3)).toEqual(['8192', '8192']);
  });

  it('where the hard limit is low, the NBD cap is lowered to leave descriptors for the control API and the engine', async () => {
    const prlimit = requireTool('prlimit');
    const hard = 600;
    const daemon = await startDaemon({ wrapper: [prlimit, `--nofile=${hard}:${hard}`, '--'], args: ['--nbd-handshake-timeout-ms', '600000'] });
    // packages/server/src/nbd-setup.ts: 256 for Node, the control cap (128 by default), 64 per volume.
    const cap = hard - 256 - 128 - 64;
    expect(daemon.stderr()).toMatch(/NBD connection cap lowered to fit the descriptor limit/);
    const f = await flood(daemon.nbd, cap + 20);
    await until(async () => f.closedByServer(), (n) => n >= 20, 'sockets past the fitted cap refused');
    expect(await metric(daemon, openConnections)).toBe(cap);
    const checkpoint = await api(daemon, 'POST', '/v1/volumes/vol0/checkpoint');
    expect(checkpoint.status, checkpoint.text).toBe(200);
    await f.end();
  });

  it('the control API has its own cap per listener: a flood of its TCP port is refused there, and the Unix socket still answers', async () => {
    const controlMax = 80;
    const sockets = 400;
    const path = join(await makeTempDir(), 'control.sock');
    const daemon = await startDaemon({ args: ['--control-connections-max', String(controlMax), '--control-socket', path] });
    const descriptorsBefore = (await readdir(`/proc/${daemon.child.pid}/fd`)).length;
    const f = await flood(daemon.control, sockets);
    await until(async () => f.closedByServer(), (n) => n >= sockets - controlMax, 'control sockets past the cap refused');
    const descriptors = (await readdir(`/proc/${daemon.child.pid}/fd`)).length;
    expect(descriptors - descriptorsBefore).toBeLessThanOrEqual(controlMax);
    const checkpoint = await gannet(['checkpoint', 'vol0', '--control-socket', path, '--data-dir', daemon.dataDir]);
    expect(checkpoint.status, checkpoint.stderr).toBe(0);
    expect(checkpoint.stdout).toMatch(/vol0: epoch 1/);
    await f.end();
  });
});
