/**
 * Goal: the lifecycle of a replicated volume across roles, through real daemons and real clients.
 * After a failover the surviving volume is protected again without its VM noticing: `gannet promote`
 * makes the failed-over secondary volume a primary on the same disk while the VM's NBD connection to
 * NAME/secondary keeps working (no request fails), a new secondary is brought up to date, and a
 * second failover onto it keeps the data of both periods. A stale old primary, demoted, rejoins and is
 * sent only the chunks that differ. A role change killed -9 at any point restarts in one role. (The
 * split brain made with a network namespace is in the last describe.)
 *
 * Method for the re-protection: three daemons on loopback: P (role primary) replicating to S (role
 * secondary), and a fresh daemon T. Period 1: qemu-io writes through P. `gannet failover vm` on S; an
 * NbdClient (one connection, the "VM") keeps writing 4 KiB blocks to S's vm/secondary in a bounded
 * loop, recording every acknowledged write and every failure; `gannet promote vm --peer T` runs
 * meanwhile (S's own --peer is a dead address and its token file is filled with T's token only now:
 * the override and the reread are both exercised). Once S's volume is `replicating` (its state event),
 * a checkpoint made durable on T; T's disk.img must equal S's disk, read back through S's NBD. Then
 * `gannet failover vm` on T, and T's vm/secondary must hold period 1's pattern and every block's last
 * write of period 2. Resync sizes are read from the primary's `lastResync` (compared, same, data bytes).
 */
import { createHash } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { NbdClient } from 'nbd-server-js';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { api, assertQemuOk, clientFlags, gannet, listedExports, makeTempDir, primaryConfig, qemuIo, requireTool, startDaemon, stopAll, type DaemonHandle } from './helpers/daemon.js';
import { subscribe, type EventStream } from './helpers/events.js';
import { createVethNamespace, deleteVethNamespace, must, vethNamespace } from './helpers/netns.js';

const MiB = 1024 * 1024;
const volumeBytes = 64 * MiB;
/** Period 1, written through the old primary: 8 MiB of 0x11 at the start of the disk. */
const periodOneBytes = 8 * MiB;
/** Period 2, the VM's writes on the promoted side: 4 KiB blocks spread over a 16 MiB region. */
const blockBytes = 4096;
const regionOffset = 32 * MiB;
const regionBlocks = (16 * MiB) / blockBytes;
/** Writes the VM must have finished before the promotion starts, and after it returned. */
const writesBefore = 200;
const writesAfter = 200;
/** Bounds of the writer loop, whichever comes first. */
const writerWritesMax = 200_000;
const writerMsMax = 120_000;
const eventWaitMs = 60_000;
/** Nothing listens on port 1 of loopback: S's configured peer, overridden at promotion. */
const deadPeer = '127.0.0.1:1';

async function view(daemon: DaemonHandle): Promise<Record<string, any>> {
  const response = await api(daemon, 'GET', '/v1/volumes/vm');
  expect(response.status).toBe(200);
  return response.json;
}

async function reachState(daemon: DaemonHandle, events: EventStream, state: string): Promise<void> {
  if ((await view(daemon)).state === state) return;
  await events.next((event) => event.event === 'state' && event.data.state === state, eventWaitMs);
}

async function reachDurable(daemon: DaemonHandle, events: EventStream, epoch: number): Promise<void> {
  const now = (await view(daemon)).peerDurableEpoch;
  if (now !== null && now >= epoch) return;
  await events.next((event) => event.event === 'durable' && event.data.epoch >= epoch, eventWaitMs);
}

async function checkpoint(daemon: DaemonHandle): Promise<number> {
  const response = await api(daemon, 'POST', '/v1/volumes/vm/checkpoint');
  expect(response.status).toBe(200);
  return response.json.epoch as number;
}

/** The block each write of the loop goes to, and the byte it fills it with (never 0, never period 1's). */
const blockOf = (i: number) => (i * 7919) % regionBlocks;
const byteOf = (i: number) => (i % 200) + 0x20;

/** The VM: one NBD connection writing in a bounded loop until stopped; failures are kept, not thrown. */
function keepWriting(client: NbdClient) {
  const last = new Map<number, number>();
  const failures: string[] = [];
  let written = 0;
  let stopped = false;
  const waiters: { count: number; resolve: () => void }[] = [];
  const started = Date.now();
  const done = (async () => {
    for (let i = 0; i < writerWritesMax && !stopped && Date.now() - started < writerMsMax; i++) {
      try {
        await client.write(Buffer.alloc(blockBytes, byteOf(i)), regionOffset + blockOf(i) * blockBytes);
        last.set(blockOf(i), byteOf(i));
        written++;
      } catch (error) {
        failures.push(`write ${i}: ${(error as Error).message}`);
      }
      for (const waiter of waiters.filter((w) => written >= w.count)) {
        waiters.splice(waiters.indexOf(waiter), 1);
        waiter.resolve();
      }
    }
    for (const waiter of waiters) waiter.resolve();
  })();
  return {
    last,
    failures,
    get written() {
      return written;
    },
    /** Resolves once `count` writes in all were acknowledged (or the loop ended). */
    reached: (count: number) => (written >= count ? Promise.resolve() : new Promise<void>((resolve) => waiters.push({ count, resolve }))),
    async stop(): Promise<void> {
      stopped = true;
      await done;
    },
  };
}

function firstDifferentMiB(a: Buffer, b: Buffer): number | null {
  for (let at = 0; at < volumeBytes; at += MiB) if (Buffer.compare(a.subarray(at, at + MiB), b.subarray(at, at + MiB)) !== 0) return at / MiB;
  return null;
}

async function readWhole(client: NbdClient): Promise<Buffer> {
  const whole = Buffer.alloc(volumeBytes);
  for (let at = 0; at < volumeBytes; at += 4 * MiB) await client.read(whole.subarray(at, at + 4 * MiB), at);
  return whole;
}

describe('re-protection: promote a failed-over secondary while its VM writes', () => {
  afterEach(stopAll);

  it('keeps the VM connection across the promotion, resyncs a fresh secondary, and fails over onto it with both periods intact', async () => {
    requireTool('qemu-io');
    // T, the fresh daemon that becomes the new secondary.
    const third = await startDaemon({ volumes: [`vm:${volumeBytes}`] });
    // S: role secondary, its --peer dead and its token file empty until the promotion needs it.
    const peerDir = await makeTempDir();
    const sTokenFile = join(peerDir, 'peer.token');
    await writeFile(sTokenFile, `${'ab'.repeat(32)}\n`, { mode: 0o600 });
    const sArgs = ['--peer', deadPeer, '--peer-token-file', sTokenFile];
    const secondary = await startDaemon({ volumes: [`vm:${volumeBytes}`], args: sArgs });
    // P: role primary, replicating to S.
    const pTokenFile = join(peerDir, 'p-peer.token');
    await writeFile(pTokenFile, `${secondary.token}\n`, { mode: 0o600 });
    const pArgs = ['--role', 'primary', '--peer', `${secondary.control.host}:${secondary.control.port}`, '--peer-token-file', pTokenFile];
    const primary = await startDaemon({ volumes: [`vm:${volumeBytes}`], args: pArgs });
    const pEvents = await subscribe(primary, 'vm');
    await reachState(primary, pEvents, 'replicating');

    // Period 1, through the old primary, made durable on S.
    assertQemuOk(await qemuIo(primary, 'vm', [`write -P 0x11 0 ${periodOneBytes}`, 'flush']), 'period 1');
    await reachDurable(primary, pEvents, await checkpoint(primary));
    // P's host goes down before S takes over; it comes back only once S is a primary (below).
    await pEvents.close();
    expect((await primary.stop('SIGKILL')).signal).toBe('SIGKILL');

    const failover = await gannet(['failover', 'vm', ...clientFlags(secondary)]);
    expect({ status: failover.status, stderr: failover.stderr }).toEqual({ status: 0, stderr: '' });

    // Period 2: the VM on S's vm/secondary, one connection throughout.
    const vm = await NbdClient.connect(secondary.nbd, { exportName: 'vm/secondary' });
    const writer = keepWriting(vm);
    await writer.reached(writesBefore);
    await writeFile(sTokenFile, `${third.token}\n`);
    const sEvents = await subscribe(secondary, 'vm');
    const promote = await gannet(['promote', 'vm', '--peer', `${third.control.host}:${third.control.port}`, ...clientFlags(secondary)]);
    expect({ status: promote.status, stderr: promote.stderr }).toEqual({ status: 0, stderr: '' });
    expect(promote.stdout).toMatch(/^vm: role primary, \S+, peer 127\.0\.0\.1:\d+$/m);
    const changed = await sEvents.next((event) => event.event === 'role-changed', eventWaitMs);
    expect(changed.data).toMatchObject({ volume: 'vm', role: 'primary', from: 'secondary', pauseMs: expect.any(Number) });
    console.log(`promote: the VM's requests were held ${changed.data.pauseMs} ms`);
    const promotedAt = writer.written;
    await writer.reached(promotedAt + writesAfter);
    expect(writer.failures).toEqual([]);

    await reachState(secondary, sEvents, 'replicating');
    await writer.stop();
    expect(writer.failures).toEqual([]);
    expect(writer.written).toBeGreaterThanOrEqual(promotedAt + writesAfter);
    await vm.flush();

    const promoted = await view(secondary);
    expect(promoted).toMatchObject({
      role: 'primary',
      state: 'replicating',
      exports: { disk: 'vm', secondary: 'vm/secondary' },
      link: { state: 'up', peer: `${third.control.host}:${third.control.port}` },
    });
    expect(promoted.lastResync).toMatchObject({ full: true });
    expect(await listedExports(secondary)).toEqual(['vm', 'vm/secondary']);
    const metrics = (await api(secondary, 'GET', '/metrics')).text;
    expect(metrics).toContain('gannet_volume_role{volume="vm",role="primary"} 1');

    // The old primary comes back: its peer is a primary now, a generation ahead of it (it wrote nothing
    // since they split), so it is stale and fenced rather than left degraded, writing on its own.
    const oldPrimary = await startDaemon({ dataDir: primary.dataDir, volumes: [], args: pArgs });
    const oldEvents = await subscribe(oldPrimary, 'vm');
    await reachState(oldPrimary, oldEvents, 'fenced');
    expect(await view(oldPrimary)).toMatchObject({ role: 'primary', state: 'fenced', error: { code: 'EFENCED', message: expect.stringContaining('became a primary') } });
    await oldEvents.close();

    // The new secondary's disk equals the new primary's once a checkpoint is durable there.
    await reachDurable(secondary, sEvents, await checkpoint(secondary));
    const disk = await readWhole(vm);
    const thirdDisk = await readFile(join(third.dataDir, 'volumes', 'vm', 'disk.img'));
    expect({ firstDifferentMiB: firstDifferentMiB(disk, thirdDisk) }).toEqual({ firstDifferentMiB: null });
    await vm.close();

    // The second failover, onto T: both periods are there.
    const back = await gannet(['failover', 'vm', ...clientFlags(third)]);
    expect({ status: back.status, stderr: back.stderr }).toEqual({ status: 0, stderr: '' });
    const survivor = await NbdClient.connect(third.nbd, { exportName: 'vm/secondary' });
    const seen = await readWhole(survivor);
    await survivor.close();
    expect(seen.subarray(0, periodOneBytes).every((byte) => byte === 0x11)).toBe(true);
    const wrong: number[] = [];
    for (const [block, byte] of writer.last) {
      const at = regionOffset + block * blockBytes;
      if (!seen.subarray(at, at + blockBytes).every((b) => b === byte)) wrong.push(block);
    }
    expect({ blocks: writer.last.size, wrong: wrong.slice(0, 10) }).toEqual({ blocks: writer.last.size, wrong: [] });
    expect({ firstDifferentMiB: firstDifferentMiB(seen, disk) }).toEqual({ firstDifferentMiB: null });

    // kill -9 after the promotion: S restarts with the volume in the primary role, its disk whole.
    expect((await secondary.stop('SIGKILL')).signal).toBe('SIGKILL');
    const restarted = await startDaemon({ dataDir: secondary.dataDir, volumes: [], args: sArgs });
    expect(await view(restarted)).toMatchObject({ role: 'primary', exports: { disk: 'vm', secondary: 'vm/secondary' }, link: { peer: `${third.control.host}:${third.control.port}` } });
    expect(await listedExports(restarted)).toEqual(['vm', 'vm/secondary']);
    expect(restarted.stdoutLines).toContain(`  export (the same disk, as the secondary it was promoted from): nbd://${restarted.nbd.host}:${restarted.nbd.port}/vm%2Fsecondary`);
    const again = await NbdClient.connect(restarted.nbd, { exportName: 'vm/secondary' });
    expect({ firstDifferentMiB: firstDifferentMiB(await readWhole(again), disk) }).toEqual({ firstDifferentMiB: null });
    await again.close();
    await sEvents.close();
  });

  it('checks every body naming the field, promotes a volume nobody uses (its role surviving a crash before volume.json followed), answers a promote of a primary and a demote of a secondary as no-ops, and refuses a resolve outside split brain', async () => {
    const peerDir = await makeTempDir();
    const tokenFile = join(peerDir, 'peer.token');
    await writeFile(tokenFile, `${'ab'.repeat(32)}\n`, { mode: 0o600 });
    const daemon = await startDaemon({ volumes: ['vm:16M'], args: ['--peer', deadPeer, '--peer-token-file', tokenFile] });
    const created = await api(daemon, 'POST', '/v1/volumes', { name: 'pv', sizeBytes: '8M' });
    expect(created.status).toBe(201);
    for (const [path, body, field] of [
      ['/v1/volumes/vm/promote', { peer: 'nowhere' }, 'peer'],
      ['/v1/volumes/vm/promote', { force: 'yes' }, 'force'],
      ['/v1/volumes/vm/promote', { peers: '127.0.0.1:1' }, 'peers'],
      ['/v1/volumes/vm/demote', { force: 1 }, 'force'],
      ['/v1/volumes/vm/resolve', {}, 'discardLocal'],
      ['/v1/volumes/vm/resolve', { discardLocal: false }, 'discardLocal'],
    ] as const) {
      const refused = await api(daemon, 'POST', path, body);
      expect({ path, status: refused.status, code: refused.json.error.code, field: refused.json.error.field }).toEqual({ path, status: 400, code: 'bad_request', field });
    }
    expect((await api(daemon, 'POST', '/v1/volumes/nope/promote', {})).status).toBe(404);
    // pv fails over and becomes primary, degraded with its peer away; promoting it again changes nothing.
    const promoted = await api(daemon, 'POST', '/v1/volumes/pv/promote', {});
    expect(promoted.status).toBe(200);
    expect(promoted.json).toMatchObject({ name: 'pv', role: 'primary', link: { peer: deadPeer } });
    const again = await api(daemon, 'POST', '/v1/volumes/pv/promote', { peer: '127.0.0.1:2' });
    expect(again.status).toBe(200);
    expect(again.json).toMatchObject({ role: 'primary', promotedAt: promoted.json.promotedAt, link: { peer: deadPeer } });
    expect(await listedExports(daemon)).toEqual(['pv', 'pv/secondary', 'vm/primary', 'vm/secondary']);
    // An old primary attaching to the promoted volume learns why it is refused.
    const attach = await api(daemon, 'POST', '/v1/volumes/pv/peer', {});
    expect({ status: attach.status, reason: attach.json.error.reason }).toEqual({ status: 409, reason: 'EPRIMARY' });
    // A crash after the engine committed the role and before volume.json followed leaves the old record:
    // the restart goes by the engine's role and brings volume.json in line.
    expect((await daemon.stop('SIGKILL')).signal).toBe('SIGKILL');
    const recordFile = join(daemon.dataDir, 'volumes', 'pv', 'volume.json');
    const promotedRecord = JSON.parse(await readFile(recordFile, 'utf8'));
    expect(promotedRecord).toMatchObject({ role: 'primary', promotedAt: promoted.json.promotedAt });
    const { promotedAt: _promotedAt, peer: _peer, ...rest } = promotedRecord;
    await writeFile(recordFile, JSON.stringify({ ...rest, role: 'secondary', blockBytes: 4096, strategy: 'gannet' }));
    const restarted = await startDaemon({ dataDir: daemon.dataDir, volumes: [], args: ['--peer', deadPeer, '--peer-token-file', tokenFile] });
    expect((await api(restarted, 'GET', '/v1/volumes/pv')).json).toMatchObject({ role: 'primary', exports: { disk: 'pv', secondary: 'pv/secondary' } });
    expect(JSON.parse(await readFile(recordFile, 'utf8'))).toMatchObject({ role: 'primary' });
    // A client that has just exited does not count: qemu-io, then at once a demote without force.
    assertQemuOk(await qemuIo(restarted, 'pv', ['write -P 0x12 0 64K']), 'a write just before the demote');
    const demotedPv = await api(restarted, 'POST', '/v1/volumes/pv/demote', {});
    expect({ status: demotedPv.status, role: demotedPv.json.role }).toEqual({ status: 200, role: 'secondary' });
    expect((await restarted.stop()).code).toBe(0);
    const later = await startDaemon({ dataDir: daemon.dataDir, volumes: [], args: ['--peer', deadPeer, '--peer-token-file', tokenFile] });
    const demoted = await api(later, 'POST', '/v1/volumes/vm/demote', {});
    expect(demoted.status).toBe(200);
    expect(demoted.json).toMatchObject({ name: 'vm', role: 'secondary', state: 'replicating' });
    const notSplit = await api(later, 'POST', '/v1/volumes/vm/resolve', { discardLocal: true });
    expect(notSplit.status).toBe(409);
    expect(notSplit.json.error.message).toContain('not in split brain');
    const cli = await gannet(['resolve', 'vm', ...clientFlags(later)]);
    expect({ status: cli.status, stderr: cli.stderr }).toEqual({ status: 2, stderr: expect.stringContaining('--discard-local is required') });
    const cliRefused = await gannet(['resolve', 'vm', '--discard-local', ...clientFlags(later)]);
    expect({ status: cliRefused.status, stderr: cliRefused.stderr }).toEqual({ status: 1, stderr: expect.stringContaining('refused (409 conflict)') });
    // A daemon without a peer has nobody for a promoted volume to replicate to: refused, nothing changed.
    const lone = await startDaemon({ volumes: ['solo:8M'] });
    const noPeer = await gannet(['promote', 'solo', ...clientFlags(lone)]);
    expect({ status: noPeer.status, stderr: noPeer.stderr }).toEqual({ status: 1, stderr: expect.stringContaining('no peer token') });
    expect((await api(lone, 'GET', '/v1/volumes/solo')).json).toMatchObject({ role: 'secondary', state: 'replicating' });
  });

  it('a reload after a promotion leaves the promoted volume to the primary role', async () => {
    const dir = await makeTempDir();
    const tokenFile = join(dir, 'peer.token');
    await writeFile(tokenFile, `${'ab'.repeat(32)}\n`, { mode: 0o600 });
    const config = join(dir, 'gannet.yaml');
    await writeFile(config, `peer: { control: "${deadPeer}", tokenFile: ${tokenFile} }\nvolumes:\n  vm: { sizeBytes: 16M }\n`);
    const daemon = await startDaemon({ volumes: [], args: ['--config', config] });
    expect((await api(daemon, 'POST', '/v1/volumes/vm/promote', {})).json).toMatchObject({ role: 'primary' });
    await writeFile(config, `peer: { control: "${deadPeer}", tokenFile: ${tokenFile} }\nvolumes:\n  vm: { sizeBytes: 16M }\n  more: { sizeBytes: 8M }\n`);
    const reloaded = await api(daemon, 'POST', '/v1/reload', {});
    expect(reloaded.status).toBe(200);
    expect(reloaded.json).toMatchObject({ added: ['more'], failed: [], notInConfig: [] });
    expect((await api(daemon, 'GET', '/v1/volumes/vm')).json).toMatchObject({ role: 'primary' });
    expect((await api(daemon, 'GET', '/v1/volumes/more')).json).toMatchObject({ role: 'secondary', state: 'replicating' });
    expect(await listedExports(daemon)).toEqual(['more/primary', 'more/secondary', 'vm', 'vm/secondary']);
  });

  it('kill -9 at points spread over a promote and a demote: the volume restarts in one role, with its data', async () => {
    requireTool('qemu-io');
    const peerDir = await makeTempDir();
    const tokenFile = join(peerDir, 'peer.token');
    await writeFile(tokenFile, `${'ab'.repeat(32)}\n`, { mode: 0o600 });
    const args = ['--peer', deadPeer, '--peer-token-file', tokenFile];
    const dataDir = await makeTempDir();
    let daemon = await startDaemon({ dataDir, volumes: ['vm:16M'], args });
    const failover = await api(daemon, 'POST', '/v1/volumes/vm/failover', { to: 'secondary' });
    expect(failover.status).toBe(200);
    assertQemuOk(await qemuIo(daemon, 'vm/secondary', ['write -P 0x77 0 16M', 'flush']), 'the disk');
    const expectWhole = async (what: string) => assertQemuOk(await qemuIo(daemon, 'vm/secondary', ['read -P 0x77 0 16M']), what);
    // Where the kill lands: from before the request is read to after it is done.
    const killAfterMs = [0, 5, 10, 12, 14, 16, 18, 20, 25, 30, 40, 60, 80];
    const roles: string[] = [];
    for (const [index, delay] of killAfterMs.entries()) {
      const before = (await api(daemon, 'GET', '/v1/volumes/vm')).json.role as string;
      const operation = before === 'secondary' ? 'promote' : 'demote';
      // force: a demoted volume is a stale copy marked inconsistent, which only a forced failover takes.
      const request = api(daemon, 'POST', `/v1/volumes/vm/${operation}`, { force: true }).catch(() => undefined);
      await new Promise((resolve) => setTimeout(resolve, delay));
      expect((await daemon.stop('SIGKILL')).signal).toBe('SIGKILL');
      await request;
      daemon = await startDaemon({ dataDir, volumes: [], args });
      const after = (await api(daemon, 'GET', '/v1/volumes/vm')).json;
      expect({ index, delay, operation, role: ['primary', 'secondary'].includes(after.role), error: after.error }).toEqual({ index, delay, operation, role: true, error: undefined });
      roles.push(`${operation}@${delay}ms:${after.role}`);
      await expectWhole(`after ${operation} killed at ${delay} ms`);
    }
    console.log(`kill -9 during role changes: ${roles.join(', ')}`);
    // Whatever role it ended in, the volume still changes role on request.
    const last = (await api(daemon, 'GET', '/v1/volumes/vm')).json.role as string;
    const change = await api(daemon, 'POST', `/v1/volumes/vm/${last === 'secondary' ? 'promote' : 'demote'}`, { force: true });
    expect(change.status).toBe(200);
    expect(change.json.role).toBe(last === 'secondary' ? 'primary' : 'secondary');
    await expectWhole('after a last role change');
  });

  it('a stale old primary, demoted, rejoins as the secondary of the promoted side and is sent only the chunks that differ', async () => {
    requireTool('qemu-io');
    const peerDir = await makeTempDir();
    const sTokenFile = join(peerDir, 'peer.token');
    await writeFile(sTokenFile, `${'ab'.repeat(32)}\n`, { mode: 0o600 });
    const secondary = await startDaemon({ volumes: [`vm:${volumeBytes}`], args: ['--peer', deadPeer, '--peer-token-file', sTokenFile] });
    const pTokenFile = join(peerDir, 'p-peer.token');
    await writeFile(pTokenFile, `${secondary.token}\n`, { mode: 0o600 });
    const primary = await startDaemon({
      volumes: [`vm:${volumeBytes}`],
      args: ['--role', 'primary', '--peer', `${secondary.control.host}:${secondary.control.port}`, '--peer-token-file', pTokenFile],
    });
    const pEvents = await subscribe(primary, 'vm');
    await reachState(primary, pEvents, 'replicating');
    assertQemuOk(await qemuIo(primary, 'vm', ['write -P 0x21 0 16M', 'write -P 0x22 40M 8M', 'flush']), 'period 1');
    await reachDurable(primary, pEvents, await checkpoint(primary));

    // S takes over and its VM writes 1 MiB where period 1 wrote: the one difference from P's disk.
    const failover = await gannet(['failover', 'vm', ...clientFlags(secondary)]);
    expect({ status: failover.status, stderr: failover.stderr }).toEqual({ status: 0, stderr: '' });
    assertQemuOk(await qemuIo(secondary, 'vm/secondary', ['write -P 0x33 4M 1M', 'flush']), 'period 2');

    // The old primary's VM is still attached: demote is refused, then forced (the client is cut off).
    const stale = await NbdClient.connect(primary.nbd, { exportName: 'vm' });
    const refused = await gannet(['demote', 'vm', ...clientFlags(primary)]);
    expect({ status: refused.status, stderr: refused.stderr }).toEqual({ status: 1, stderr: expect.stringContaining('1 NBD client(s) connected') });
    const demoted = await gannet(['demote', 'vm', '--force', ...clientFlags(primary)]);
    expect({ status: demoted.status, stderr: demoted.stderr }).toEqual({ status: 0, stderr: '' });
    expect(demoted.stdout).toMatch(/^vm: role secondary, /m);
    const cut = await stale.read(Buffer.alloc(512), 0).then(() => null, (error: unknown) => error);
    expect(cut).toBeInstanceOf(Error);
    expect(await listedExports(primary)).toEqual(['vm/primary', 'vm/secondary']);
    expect(await view(primary)).toMatchObject({ role: 'secondary' });
    const pChanged = await pEvents.next((event) => event.event === 'role-changed', eventWaitMs);
    expect(pChanged.data).toMatchObject({ role: 'secondary', from: 'primary' });

    // S is promoted with the old primary as its peer: a digest sync sends the 1 MiB that differs.
    await writeFile(sTokenFile, `${primary.token}\n`);
    const sEvents = await subscribe(secondary, 'vm');
    const promote = await gannet(['promote', 'vm', '--peer', `${primary.control.host}:${primary.control.port}`, ...clientFlags(secondary)]);
    expect({ status: promote.status, stderr: promote.stderr }).toEqual({ status: 0, stderr: '' });
    await reachState(secondary, sEvents, 'replicating');
    const promoted = await view(secondary);
    const differing = 1 * MiB;
    expect(promoted.lastResync).toMatchObject({ full: true, comparedBytes: volumeBytes });
    expect(promoted.lastResync.dataBytes).toBeGreaterThanOrEqual(differing);
    // Digests are compared per 64 KiB chunk: the difference is 16 whole chunks, nothing else.
    expect(promoted.lastResync.dataBytes).toBeLessThanOrEqual(differing);
    expect(promoted.lastResync.sameBytes).toBe(volumeBytes - differing);

    await reachDurable(secondary, sEvents, await checkpoint(secondary));
    const [mine, theirs] = await Promise.all([
      readFile(join(secondary.dataDir, 'volumes', 'vm', 'disk.img')),
      readFile(join(primary.dataDir, 'volumes', 'vm', 'disk.img')),
    ]);
    expect({ firstDifferentMiB: firstDifferentMiB(mine, theirs) }).toEqual({ firstDifferentMiB: null });
    expect(theirs.subarray(4 * MiB, 5 * MiB).every((byte) => byte === 0x33)).toBe(true);
    expect(theirs.subarray(0, 4 * MiB).every((byte) => byte === 0x21)).toBe(true);
    await Promise.all([pEvents.close(), sEvents.close()]);
  });
});

/** Runs a command that must succeed (ip, to build and cut the test network). */
const sha256 = (bytes: Uint8Array) => createHash('sha256').update(bytes).digest('hex');

/**
 * The split brain for real: the secondary daemon S runs in a network namespace of its own, joined to
 * the test's by a veth pair whose host end is set down: the primary P goes degraded and its VM writes
 * on; S is failed over (through its control socket, a Unix socket the cut leaves alone) and its VM
 * writes too. Once the link is back, P's attach finds both sides wrote since the split: both report
 * split-brain (status, events, metrics), P retries and is refused, and neither disk changes. Then
 * `gannet resolve vm --discard-local` on one side: on S, S is discarded and P's digest sync makes S's
 * disk exactly P's; on P, P is demoted, S promoted with P as its peer (S's VM still attached), and P's
 * disk becomes exactly S's. As root, like the other namespace tests: without it this fails, never skips.
 */
describe('a split brain across a cut link, resolved by discarding one side', () => {
  const net = vethNamespace('sb', 9);
  const { namespace, hostEnd, hostAddress, peerAddress } = net;
  const ip = requireTool('ip');

  beforeAll(() => createVethNamespace(ip, net));

  afterEach(stopAll);

  afterAll(() => deleteVethNamespace(ip, net));

  /**
   * Two daemons in split brain: P (on every address of the host, so that S reaches it once promoted)
   * and S in the namespace; both sides wrote after the cut, both report split-brain, neither disk
   * changed while P retried. S's VM is still connected to its vm/secondary (through S's NBD socket).
   */
  async function splitBrain() {
    requireTool('qemu-io');
    const socketDir = await makeTempDir();
    const sControl = join(socketDir, 'control.sock');
    const sNbd = join(socketDir, 'nbd.sock');
    const sTokenFile = join(socketDir, 's-peer.token');
    await writeFile(sTokenFile, `${'ab'.repeat(32)}\n`, { mode: 0o600 });
    const secondary = await startDaemon({
      volumes: [`vm:${volumeBytes}`],
      wrapper: [ip, 'netns', 'exec', namespace],
      args: [
        ...['--nbd', `${peerAddress}:0`, '--control', `${peerAddress}:0`, '--nbd-socket', sNbd, '--control-socket', sControl],
        ...['--peer', `${hostAddress}:1`, '--peer-token-file', sTokenFile],
      ],
    });
    const sFlags = ['--control-socket', sControl, '--data-dir', secondary.dataDir];
    const config = await primaryConfig(secondary, { volumeBytes, peerTimeoutMs: 1000, controlHost: peerAddress });
    const primary = await startDaemon({ volumes: [], args: ['--config', config, '--nbd', '0.0.0.0:0', '--control', '0.0.0.0:0'] });
    await writeFile(sTokenFile, `${primary.token}\n`);
    const pEvents = await subscribe(primary, 'vm');
    await reachState(primary, pEvents, 'replicating');
    assertQemuOk(await qemuIo(primary, 'vm', ['write -P 0x21 0 16M', 'flush']), 'before the split');
    await reachDurable(primary, pEvents, await checkpoint(primary));

    await must(ip, ['link', 'set', hostEnd, 'down']);
    // P sees the cut (its idle link is probed), then its VM writes: P has written since the split.
    await reachState(primary, pEvents, 'degraded');
    assertQemuOk(await qemuIo(primary, 'vm', ['write -P 0x44 8M 1M', 'flush']), 'P while cut off');
    // S is failed over, and its VM writes too.
    const failover = await gannet(['failover', 'vm', ...sFlags]);
    expect({ status: failover.status, stderr: failover.stderr }).toEqual({ status: 0, stderr: '' });
    const sVm = await NbdClient.connect({ path: sNbd }, { exportName: 'vm/secondary' });
    await sVm.write(Buffer.alloc(MiB, 0x55), 12 * MiB);
    await sVm.flush();

    const pDisk = join(primary.dataDir, 'volumes', 'vm', 'disk.img');
    const pBefore = sha256(await readFile(pDisk));
    const sBefore = sha256(await readWhole(sVm));

    await must(ip, ['link', 'set', hostEnd, 'up']);
    await reachState(primary, pEvents, 'split-brain');
    const sView = async () => JSON.parse((await gannet(['status', 'vm', '--json', ...sFlags])).stdout) as Record<string, any>;
    expect(await sView()).toMatchObject({ role: 'secondary', state: 'split-brain', splitBrain: { local: expect.anything(), peer: expect.anything() } });
    const pView = await view(primary);
    expect(pView).toMatchObject({ role: 'primary', state: 'split-brain', link: { state: 'refused' }, splitBrain: { local: expect.anything(), peer: expect.anything() } });
    expect((await api(primary, 'GET', '/metrics')).text).toContain('gannet_volume_split_brain{volume="vm"} 1');
    // P keeps trying and is refused, and nothing is written to either disk meanwhile.
    for (let refusals = 0; refusals < 2; refusals++) {
      await pEvents.next((event) => event.event === 'link' && event.data.state === 'refused', eventWaitMs);
    }
    expect(await sView()).toMatchObject({ state: 'split-brain' });
    expect(sha256(await readFile(pDisk))).toBe(pBefore);
    expect(sha256(await readWhole(sVm))).toBe(sBefore);
    expect((await api(primary, 'POST', '/v1/volumes/vm/checkpoint')).status).toBe(409);
    return { primary, secondary, pEvents, sFlags, sNbd, sVm, sView, pDisk, pBefore, sBefore };
  }

  it('discarding the secondary\'s side: the split brain ends and its disk becomes exactly the primary\'s', async () => {
    const { primary, pEvents, sFlags, sNbd, sVm, sView, pDisk, pBefore } = await splitBrain();
    // S's side is dropped: its VM is cut off, and P's digest sync makes S's disk P's.
    const resolved = await gannet(['resolve', 'vm', '--discard-local', ...sFlags]);
    expect({ status: resolved.status, stderr: resolved.stderr }).toEqual({ status: 0, stderr: '' });
    expect(resolved.stdout).toMatch(/^vm: role secondary, /m);
    const cut = await sVm.read(Buffer.alloc(512), 0).then(() => null, (error: unknown) => error);
    expect(cut).toBeInstanceOf(Error);
    await reachState(primary, pEvents, 'replicating');
    expect((await view(primary)).lastResync).toMatchObject({ full: true, comparedBytes: volumeBytes });
    await reachDurable(primary, pEvents, await checkpoint(primary));
    const pAfter = await readFile(pDisk);
    expect(sha256(pAfter)).toBe(pBefore);
    const survivor = await NbdClient.connect({ path: sNbd }, { exportName: 'vm/primary' });
    const sAfter = await readWhole(survivor);
    await survivor.close();
    expect({ firstDifferentMiB: firstDifferentMiB(sAfter, pAfter) }).toEqual({ firstDifferentMiB: null });
    expect(sAfter.subarray(8 * MiB, 9 * MiB).every((byte) => byte === 0x44)).toBe(true);
    expect(sAfter.subarray(12 * MiB, 13 * MiB).every((byte) => byte === 0x21)).toBe(true);
    expect(await sView()).toMatchObject({ role: 'secondary', state: 'replicating' });
    expect((await api(primary, 'GET', '/metrics')).text).toContain('gannet_volume_split_brain{volume="vm"} 0');
    await pEvents.close();
  });

  it('discarding the primary\'s side: it is demoted, the failed-over side is promoted with its VM still attached, and the old primary\'s disk becomes exactly the survivor\'s', async () => {
    const { primary, secondary, pEvents, sFlags, sVm, sBefore } = await splitBrain();
    const resolved = await gannet(['resolve', 'vm', '--discard-local', ...clientFlags(primary)]);
    expect({ status: resolved.status, stderr: resolved.stderr }).toEqual({ status: 0, stderr: '' });
    expect(resolved.stdout).toMatch(/^vm: role secondary, /m);
    expect(await listedExports(primary)).toEqual(['vm/primary', 'vm/secondary']);
    // S is promoted with P as its new secondary; S's VM keeps its connection and writes on.
    const promote = await gannet(['promote', 'vm', '--peer', `${hostAddress}:${primary.control.port}`, ...sFlags]);
    expect({ status: promote.status, stderr: promote.stderr }).toEqual({ status: 0, stderr: '' });
    expect(promote.stdout).toMatch(/^vm: role primary, /m);
    await sVm.write(Buffer.alloc(MiB, 0x66), 20 * MiB);
    await sVm.flush();
    const sEvents = await subscribe(secondary, 'vm');
    await reachState(secondary, sEvents, 'replicating');
    await reachDurable(secondary, sEvents, await checkpoint(secondary));
    const sAfter = await readWhole(sVm);
    const pAfter = await readFile(join(primary.dataDir, 'volumes', 'vm', 'disk.img'));
    expect({ firstDifferentMiB: firstDifferentMiB(pAfter, sAfter) }).toEqual({ firstDifferentMiB: null });
    // The survivor's data: its own write of the split, none of P's, and what its VM wrote since.
    expect(pAfter.subarray(12 * MiB, 13 * MiB).every((byte) => byte === 0x55)).toBe(true);
    expect(pAfter.subarray(8 * MiB, 9 * MiB).every((byte) => byte === 0x21)).toBe(true);
    expect(pAfter.subarray(20 * MiB, 21 * MiB).every((byte) => byte === 0x66)).toBe(true);
    const before = Buffer.from(sAfter);
    before.fill(0, 20 * MiB, 21 * MiB);
    expect(sha256(before)).toBe(sBefore);
    await Promise.all([pEvents.close(), sEvents.close()]);
    await sVm.close();
  });
});

