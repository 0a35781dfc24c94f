/**
 * Goal: the primary role over the network. A PrimaryVolume in this process, linked by peerLink to a real
 * secondary daemon (`gannet serve`, a child process), keeps the daemon's volume a copy of its disk: after
 * a checkpoint made durable there, the two backing files are identical byte for byte, through writes,
 * zeroes and trims, a peer hung with SIGSTOP, and a peer killed with SIGKILL mid-forward and restarted.
 * A primary's attach fences its earlier session, so none of that session's late writes lands.
 *
 * Method: the daemon on free loopback ports (restarted on the same ones), the primary's options with
 * short peer timeouts; every wait is on an event of the primary (state, resync-done, durable) under a
 * deadline, never a sleep; the files are read once the peer reports the last checkpoint durable; resync
 * volume is read from the primary's own counters.
 */
import { createRequire } from 'node:module';
import { createHash, randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { KiB, MiB } from '@gannet/block-device';
import { PrimaryVolume, type PrimaryOptions, type PrimaryState } from '@gannet/core';
import { NbdClient } from 'nbd-server-js';
import { peerLink, peerNbdAddress, type PeerLinkOptions } from '@gannet/server';
import { api, makeTempDir, repoRoot, startDaemon, stopAll, type DaemonHandle } from './helpers/daemon.js';

const volumeBytes = 8 * MiB;
/** The primary's dirty map unit: resync is counted in whole blocks of it. */
const blockBytes = 4 * KiB;
/** One step of a test (a resync, a state change, a durable checkpoint) that takes longer fails it. */
const stepMsMax = 20_000;
/** The writer loop of the fault test stops after this many writes whatever happens. */
const writesMax = 4000;
const writerChunkBytes = 16 * KiB;
/** Attaches that time out against the stopped peer before it is let go on. */
const failedAttachesBeforeCont = 3;
/** Writes the writer makes while the peer is away before it waits for the link to come back. */
const degradedWritesMax = 200;

type Logger = PeerLinkOptions['logger'];
const pino = createRequire(join(repoRoot, 'packages/server/package.json'))('pino') as (options: { level: string }) => Logger;
const logger = pino({ level: 'silent' });

const primaries: PrimaryVolume[] = [];
afterEach(async () => {
  for (const primary of primaries.splice(0)) await primary.close().catch(() => undefined);
  await stopAll();
});

function link(daemon: DaemonHandle, extra: Partial<PeerLinkOptions> = {}) {
  return peerLink({ control: daemon.control, token: daemon.token, volume: 'vol0', logger, callTimeoutMs: 2_000, nbdConnectTimeoutMs: 2_000, ...extra });
}

async function openPrimary(
  daemon: DaemonHandle,
  extra: Partial<PrimaryOptions> = {},
  linkExtra: Partial<PeerLinkOptions> = {},
): Promise<{ primary: PrimaryVolume; path: string }> {
  const dir = await makeTempDir('gannet-primary-');
  const path = join(dir, 'primary.img');
  const primary = await PrimaryVolume.open(
    { path, dataDir: join(dir, 'meta'), sizeBytes: volumeBytes, peerTimeoutMs: 500, peerReconnectMs: 20, peerReconnectMsMax: 200, ...extra },
    link(daemon, linkExtra),
  );
  primary.on('error', () => undefined);
  primaries.push(primary);
  return { primary, path };
}

async function within<T>(what: string, work: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not within ${stepMsMax} ms`)), stepMsMax);
  });
  try {
    return await Promise.race([work, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function untilState(primary: PrimaryVolume, state: PrimaryState): Promise<void> {
  if (primary.stats().state === state) return Promise.resolve();
  return within(
    `state ${state} (now ${primary.stats().state}, link ${JSON.stringify(primary.stats().link)})`,
    new Promise<void>((resolve) => {
      const on = (event: { state: PrimaryState }) => {
        if (event.state !== state) return;
        primary.off('state', on);
        resolve();
      };
      primary.on('state', on);
    }),
  );
}

/** Checkpoints through the primary, then waits until the peer reports that epoch durable (its disk has it). */
async function commit(primary: PrimaryVolume): Promise<number> {
  const epoch = await primary.checkpoint();
  await within(
    `durable epoch ${epoch}`,
    new Promise<void>((resolve) => {
      const check = () => {
        if ((primary.stats().peerDurableEpoch ?? -1) < epoch) return;
        primary.off('durable', check);
        resolve();
      };
      primary.on('durable', check);
      check();
    }),
  );
  return epoch;
}

function pattern(length: number, seed: number): Buffer {
  const out = Buffer.alloc(length);
  for (let i = 0; i < length; i++) out[i] = (seed * 131 + i * 7 + (i >> 8)) & 0xff || 1;
  return out;
}

/** The two backing files hold the same bytes (the secondary's read while its daemon runs: it is at its durable epoch). */
async function expectSameDisks(primaryPath: string, daemon: DaemonHandle): Promise<void> {
  const [mine, theirs] = await Promise.all([readFile(primaryPath), readFile(join(daemon.dataDir, 'volumes', 'vol0', 'disk.img'))]);
  expect(theirs.length).toBe(volumeBytes);
  expect(mine.length).toBe(volumeBytes);
  const at = mine.findIndex((byte, i) => byte !== theirs[i]);
  expect(at, `first difference at byte ${at}`).toBe(-1);
}

/**
 * Writes writerChunkBytes chunks through the primary, one after the other, until stopped or writesMax, pausing
 * (until the state changes) after degradedWritesMax writes while degraded, so that writes are left for the
 * resync and after it. `reached(n)` resolves once n writes completed. `stop()` resolves with the first
 * error the writer met, or null.
 */
function startWriter(primary: PrimaryVolume) {
  let written = 0;
  /** Chunks a write was started on. */
  const touched = new Set<number>();
  let stopped = false;
  const waiters: { count: number; resolve: () => void }[] = [];
  const wake = () => {
    for (const waiter of [...waiters]) {
      if (written < waiter.count && written < writesMax && !stopped) continue;
      waiters.splice(waiters.indexOf(waiter), 1);
      waiter.resolve();
    }
  };
  let degradedWrites = 0;
  const done = (async () => {
    for (let i = 0; i < writesMax && !stopped; i++) {
      if (primary.stats().state !== 'degraded') degradedWrites = 0;
      else if (degradedWrites++ >= degradedWritesMax) await within('the link back', new Promise((resolve) => primary.once('state', resolve)));
      const chunk = (i * 7919) % (volumeBytes / writerChunkBytes);
      touched.add(chunk);
      await primary.device.write(pattern(writerChunkBytes, i), chunk * writerChunkBytes);
      written++;
      wake();
    }
  })().then(
    () => null,
    (error: unknown) => error,
  );
  void done.finally(() => {
    stopped = true;
    wake();
  });
  return {
    touched,
    get written() {
      return written;
    },
    reached(count: number): Promise<void> {
      return within(`${count} writes (${written} done)`, new Promise<void>((resolve) => {
        waiters.push({ count, resolve });
        wake();
      }));
    },
    stop(): Promise<unknown> {
      stopped = true;
      return done;
    },
  };
}

/** Restarts a killed daemon on its data directory and its ports (the link names the control port). */
function restart(daemon: DaemonHandle): Promise<DaemonHandle> {
  return startDaemon({
    dataDir: daemon.dataDir,
    volumes: ['vol0:8M'],
    args: ['--nbd', `127.0.0.1:${daemon.nbd.port}`, '--control', `127.0.0.1:${daemon.control.port}`],
  });
}

describe('peerLink against a secondary daemon', () => {
  it('replicates writes, zeroes and trims: after a durable checkpoint both backing files are identical', async () => {
    const daemon = await startDaemon({ volumes: ['vol0:8M'] });
    const { primary, path } = await openPrimary(daemon);
    const firstSync = new Promise<{ full: boolean }>((resolve) => primary.once('resync-done', resolve));
    await untilState(primary, 'replicating');
    expect((await firstSync).full).toBe(true);
    expect(primary.stats().link).toMatchObject({ state: 'up', peer: `127.0.0.1:${daemon.control.port}` });

    const d = primary.device;
    await d.write(pattern(64 * KiB, 1), 0);
    await d.write(pattern(3000, 2), 1 * MiB + 17);
    await d.write(pattern(512, 3), volumeBytes - 512);
    await d.writeZeroes(8 * KiB, 8 * KiB);
    await d.trim(32 * KiB, 4 * KiB);
    await d.write(pattern(4 * KiB, 4), 2 * MiB, { fua: true });
    const epoch = await commit(primary);

    const view = await api(daemon, 'GET', '/v1/volumes/vol0');
    expect(view.json).toMatchObject({ state: 'replicating', inconsistent: false, epoch, volumeId: expect.any(String), clients: 1 });
    expect(view.json.durableEpoch).toBeGreaterThanOrEqual(epoch);
    await expectSameDisks(path, daemon);
    // The files are not merely both empty: the pattern and the zeroed range are there.
    const disk = await readFile(join(daemon.dataDir, 'volumes', 'vol0', 'disk.img'));
    expect(disk.subarray(0, 8 * KiB)).toEqual(pattern(64 * KiB, 1).subarray(0, 8 * KiB));
    expect(disk.subarray(8 * KiB, 16 * KiB).every((byte) => byte === 0)).toBe(true);
    expect(disk.subarray(volumeBytes - 512)).toEqual(pattern(512, 3));
  });

  it('replicates over NBD with TLS (PSK) when the peer requires it, and says so when the link has no credentials', async () => {
    const dir = await makeTempDir('gannet-psk-');
    const key = randomBytes(32);
    const pskFile = join(dir, 'keys.psk');
    await writeFile(pskFile, `primary:${key.toString('hex')}\n`, { mode: 0o600 });
    const daemon = await startDaemon({ volumes: ['vol0:8M'], args: ['--tls', 'require', '--tls-psk', pskFile] });
    await expect(link(daemon).connect()).rejects.toMatchObject({ code: 'EPEER', message: expect.stringMatching(/requires TLS/) });
    const { primary, path } = await openPrimary(daemon, {}, { tls: { psk: { identity: 'primary', key } } });
    await untilState(primary, 'replicating');
    await primary.device.write(pattern(128 * KiB, 7), 3 * MiB);
    await commit(primary);
    await expectSameDisks(path, daemon);
    const disk = await readFile(join(daemon.dataDir, 'volumes', 'vol0', 'disk.img'));
    expect(disk.subarray(3 * MiB, 3 * MiB + 128 * KiB)).toEqual(pattern(128 * KiB, 7));
  });

  it("a second session's attach fences the first: its NBD connection is closed and its late write never lands", async () => {
    const daemon = await startDaemon({ volumes: ['vol0:8M'] });
    const peer = link(daemon);
    const first = await peer.connect();
    expect(first.info).toMatchObject({ sizeBytes: volumeBytes, state: 'replicating', epoch: 0, tornRanges: [] });
    await first.device.write(pattern(4 * KiB, 1), 0);

    const second = await peer.connect();
    expect(second.info.volumeId).toBe(first.info.volumeId);
    expect(second.info.instance).toBe(first.info.instance);
    await expect(first.device.write(pattern(4 * KiB, 2), 0)).rejects.toMatchObject({ code: expect.stringMatching(/^(EIO|ESHUTDOWN|EPIPE)$/) });
    const seen = Buffer.alloc(4 * KiB);
    await second.device.read(seen, 0);
    expect(seen).toEqual(pattern(4 * KiB, 1));

    // The surviving session drives the peer: checkpoint, durable epoch, the inconsistent mark.
    await second.setInconsistent(true);
    expect((await api(daemon, 'GET', '/v1/volumes/vol0')).json).toMatchObject({ inconsistent: true, inconsistentSince: expect.any(String) });
    const refused = await api(daemon, 'POST', '/v1/volumes/vol0/failover', { to: 'secondary' });
    expect(refused.status).toBe(409);
    const checkpoint = await second.checkpoint();
    expect(checkpoint).toEqual({ epoch: 1, durableEpoch: expect.any(Number) });
    expect(await second.durableEpoch()).toBeGreaterThanOrEqual(checkpoint.durableEpoch);
    await second.setInconsistent(false);
    expect((await api(daemon, 'GET', '/v1/volumes/vol0')).json.inconsistent).toBe(false);

    // An aborted session refuses everything from then on.
    first.abort();
    second.abort();
    await expect(second.checkpoint()).rejects.toMatchObject({ code: 'EPEER', message: expect.stringMatching(/checkpoint: the session was aborted/) });
    await expect(second.device.write(pattern(512, 3), 0)).rejects.toMatchObject({ code: 'ESHUTDOWN' });
    expect((await api(daemon, 'GET', '/v1/volumes/vol0')).json.epoch).toBe(1);
  });

  it('a session to a peer that restarted refuses its checkpoint and durable epoch: the new instance never saw its writes', async () => {
    const first = await startDaemon({ volumes: ['vol0:8M'] });
    const session = await link(first).connect();
    await session.device.write(pattern(4 * KiB, 7), 0);
    await first.stop('SIGKILL');
    const second = await restart(first);
    const reopened = (await api(second, 'GET', '/v1/volumes/vol0')).json.instance;
    expect(reopened).not.toBe(session.info.instance);
    await expect(session.checkpoint()).rejects.toMatchObject({ code: 'EPEER', message: expect.stringContaining('was reopened') });
    await expect(session.durableEpoch()).rejects.toMatchObject({ code: 'EPEER', message: expect.stringContaining('was reopened') });
    await expect(session.setInconsistent(true)).rejects.toMatchObject({ code: 'EPEER', message: expect.stringContaining('was reopened') });
    session.abort();
  });

  it('an attach read late (an older attempt of the same link) is refused and fences nothing; a newer one fences', async () => {
    const daemon = await startDaemon({ volumes: ['vol0:8M'] });
    const attach = (body: unknown) => api(daemon, 'POST', '/v1/volumes/vol0/peer', body);
    expect((await attach({ link: 'L', attempt: 5 })).status).toBe(200);
    const client = await NbdClient.connect(daemon.nbd, { exportName: 'vol0/primary' });
    try {
      const stale = await attach({ link: 'L', attempt: 3 });
      expect(stale.status).toBe(409);
      expect(stale.json.error.message).toMatch(/attempt 3 .* stale: attempt 5/);
      expect((await attach({ link: 'L', attempt: 5 })).status).toBe(409);
      await client.write(pattern(4 * KiB, 1), 0);
      // Another link (a restarted primary) is no older than anyone: it fences.
      expect((await attach({ link: 'M', attempt: 1 })).status).toBe(200);
      await expect(client.write(pattern(4 * KiB, 2), 0)).rejects.toMatchObject({ code: expect.stringMatching(/^(EIO|ESHUTDOWN|EPIPE)$/) });
    } finally {
      client.destroy();
    }
    const reader = await NbdClient.connect(daemon.nbd, { exportName: 'vol0/primary' });
    const seen = await reader.readBytes(0, 4 * KiB);
    await reader.close();
    expect(seen).toEqual(pattern(4 * KiB, 1));
    const half = await attach({ link: 'L' });
    expect(half.status).toBe(400);
    expect(half.json.error).toMatchObject({ code: 'bad_request', field: 'attempt' });
  });

  it('answers an attach to a failed-over volume with its generation (the primary refuses itself), refuses a bad inconsistent body, and says when the peer cannot be reached', async () => {
    const daemon = await startDaemon({ volumes: ['vol0:8M'] });
    const bad = await api(daemon, 'PUT', '/v1/volumes/vol0/inconsistent', { inconsistent: 'yes' });
    expect(bad.status).toBe(400);
    expect(bad.json.error).toMatchObject({ code: 'bad_request', field: 'inconsistent' });
    const extra = await api(daemon, 'PUT', '/v1/volumes/vol0/inconsistent', { inconsistent: true, force: true });
    expect(extra.json.error).toMatchObject({ code: 'bad_request', field: 'force' });
    expect((await api(daemon, 'POST', '/v1/volumes/nope/peer')).status).toBe(404);
    expect((await api(daemon, 'POST', '/v1/volumes/vol0/peer', '', '')).status).toBe(401);
    await expect(link(daemon, { token: 'wrong' }).connect()).rejects.toMatchObject({ code: 'EPEER', message: expect.stringMatching(/401 unauthorized/) });
    await expect(link(daemon, { volume: 'nope' }).connect()).rejects.toMatchObject({ code: 'EPEER', message: expect.stringMatching(/404 not_found.*no such volume: nope/) });

    expect((await api(daemon, 'POST', '/v1/volumes/vol0/failover', { to: 'secondary' })).status).toBe(200);
    // A failed-over volume answers an attach with its state and generation: the primary compares them
    // and fences itself (stale) or reports a split brain; it sends nothing.
    const attach = await api(daemon, 'POST', '/v1/volumes/vol0/peer');
    expect(attach.status).toBe(200);
    expect(attach.json).toMatchObject({ state: 'failed-over', generation: { current: expect.stringMatching(/^[0-9a-f]{16}$/), history: [] } });
    expect((await api(daemon, 'PUT', '/v1/volumes/vol0/inconsistent', { inconsistent: true })).status).toBe(409);
    expect((await api(daemon, 'POST', '/v1/volumes/vol0/digests', { offset: 0, length: 65536 })).status).toBe(409);

    const { port } = daemon.control;
    await daemon.stop();
    await expect(link(daemon).connect()).rejects.toMatchObject({ code: 'EPEER', message: expect.stringMatching(new RegExp(`127\\.0\\.0\\.1:${port}.*cannot reach`)) });
  });

  it('answers digests of the primary view per 64 KiB chunk, bounded and aligned, naming the bad field', async () => {
    const daemon = await startDaemon({ volumes: ['vol0:8M'] });
    const { primary } = await openPrimary(daemon);
    await untilState(primary, 'replicating');
    expect(primary.stats().lastResync).toMatchObject({ full: true, comparedBytes: volumeBytes });
    await primary.device.write(pattern(128 * KiB, 1), 64 * KiB);
    await commit(primary);
    const answer = await api(daemon, 'POST', '/v1/volumes/vol0/digests', { offset: 0, length: 256 * KiB });
    expect(answer.status).toBe(200);
    expect(answer.json).toMatchObject({ chunkBytes: 64 * KiB, digestBytes: 16, instance: expect.any(String) });
    const digests = Buffer.from(answer.json.digests as string, 'base64');
    const disk = Buffer.alloc(256 * KiB);
    await primary.device.read(disk, 0);
    const expected = Buffer.concat([0, 1, 2, 3].map((i) => createHash('sha256').update(disk.subarray(i * 64 * KiB, (i + 1) * 64 * KiB)).digest().subarray(0, 16)));
    expect(digests).toEqual(expected);
    const unaligned = await api(daemon, 'POST', '/v1/volumes/vol0/digests', { offset: 512, length: 64 * KiB });
    expect(unaligned.status).toBe(400);
    expect(unaligned.json.error.message).toMatch(/^offset/);
    const tooLong = await api(daemon, 'POST', '/v1/volumes/vol0/digests', { offset: 0, length: 65 * MiB });
    expect(tooLong.json.error).toMatchObject({ code: 'bad_request', field: 'length' });
    const pastEnd = await api(daemon, 'POST', '/v1/volumes/vol0/digests', { offset: 0, length: volumeBytes + 64 * KiB });
    expect(pastEnd.status).toBe(400);
    expect((await api(daemon, 'POST', '/v1/volumes/vol0/digests', { offset: 0, length: 64 * KiB, extra: 1 })).json.error).toMatchObject({ field: 'extra' });
  });

  it('a primary that wrote while away from a peer that failed over meanwhile is refused with ESPLITBRAIN: both report split brain with both generations', async () => {
    const daemon = await startDaemon({ volumes: ['vol0:8M'] });
    const dir = await makeTempDir('gannet-primary-');
    const options: PrimaryOptions = { path: join(dir, 'primary.img'), dataDir: join(dir, 'meta'), sizeBytes: volumeBytes, peerTimeoutMs: 500, peerReconnectMs: 20, peerReconnectMsMax: 200 };
    let primary = await PrimaryVolume.open(options, link(daemon));
    primary.on('error', () => undefined);
    await untilState(primary, 'replicating');
    await primary.device.write(pattern(64 * KiB, 1), 0);
    await commit(primary);
    await primary.close();
    // Away from its peer (a link to nowhere), the primary's VM writes: a new generation.
    primary = await PrimaryVolume.open(options, link(daemon, { control: { host: '127.0.0.1', port: 1 } }));
    primary.on('error', () => undefined);
    await primary.device.write(pattern(64 * KiB, 2), 1 * MiB);
    await primary.close();
    expect((await api(daemon, 'POST', '/v1/volumes/vol0/failover', { to: 'secondary' })).status).toBe(200);
    const before = await readFile(join(daemon.dataDir, 'volumes', 'vol0', 'disk.img'));
    primary = await PrimaryVolume.open(options, link(daemon));
    primary.on('error', () => undefined);
    primaries.push(primary);
    await untilState(primary, 'split-brain');
    const mine = primary.stats();
    const theirs = (await api(daemon, 'GET', '/v1/volumes/vol0')).json;
    expect(mine.splitBrain).toMatchObject({ local: mine.generation, peer: theirs.generation });
    expect(theirs.splitBrain).toMatchObject({ local: theirs.generation, peer: mine.generation });
    const refused = await api(daemon, 'POST', '/v1/volumes/vol0/peer', { generation: mine.generation });
    expect(refused.status).toBe(409);
    expect(refused.json.error).toMatchObject({ code: 'conflict', reason: 'ESPLITBRAIN' });
    const badGeneration = await api(daemon, 'POST', '/v1/volumes/vol0/peer', { generation: { current: 'xyz', history: [] } });
    expect(badGeneration.json.error).toMatchObject({ code: 'bad_request', field: 'generation.current' });
    expect((await readFile(join(daemon.dataDir, 'volumes', 'vol0', 'disk.img'))).equals(before), "the secondary's disk changed").toBe(true);
  });

  it('checks its options, naming the field', () => {
    const base = { control: { host: '127.0.0.1', port: 1 }, token: 't', volume: 'vol0', logger };
    expect(() => peerLink({ ...base, callTimeoutMs: 0 })).toThrow(expect.objectContaining({ code: 'EOPTIONS', message: expect.stringMatching(/callTimeoutMs/) }));
    expect(() => peerLink({ ...base, control: { host: '127.0.0.1', port: 70_000 } })).toThrow(expect.objectContaining({ code: 'EOPTIONS', message: expect.stringMatching(/control/) }));
    expect(() => peerLink({ ...base, volume: '' })).toThrow(expect.objectContaining({ code: 'EOPTIONS', message: expect.stringMatching(/volume/) }));
    expect(peerLink(base).address).toBe('127.0.0.1:1');
  });

  it('picks the NBD address a primary can reach', () => {
    const control = { host: '10.0.0.2', port: 10810 };
    expect(peerNbdAddress([{ host: '0.0.0.0', port: 10809 }], control)).toEqual({ host: '10.0.0.2', port: 10809 });
    expect(peerNbdAddress([{ host: '127.0.0.1', port: 1 }, { host: '10.0.0.2', port: 2 }], control)).toEqual({ host: '10.0.0.2', port: 2 });
    expect(peerNbdAddress([{ host: '127.0.0.1', port: 1 }, { path: '/run/nbd.sock' }], control)).toBeNull();
    expect(peerNbdAddress([{ host: 'fd00::2', port: 1 }, { host: '10.0.0.3', port: 2 }], control)).toEqual({ host: '10.0.0.3', port: 2 });
    expect(peerNbdAddress([{ host: '::', port: 3 }], { host: 'fd00::2', port: 10810 })).toEqual({ host: 'fd00::2', port: 3 });
    expect(peerNbdAddress([{ host: '127.0.0.1', port: 1 }, { path: '/run/nbd.sock' }], { path: '/run/control.sock' })).toEqual({ path: '/run/nbd.sock' });
    expect(peerNbdAddress([{ host: '0.0.0.0', port: 4 }], { path: '/run/control.sock' })).toEqual({ host: '127.0.0.1', port: 4 });
  });

  it('a hung peer (SIGSTOP): writes complete, the primary degrades, and after SIGCONT a resync sends what was written meanwhile', async () => {
    const daemon = await startDaemon({ volumes: ['vol0:8M'] });
    const { primary, path } = await openPrimary(daemon);
    await untilState(primary, 'replicating');
    await primary.device.write(pattern(256 * KiB, 1), 0);
    await commit(primary);

    const degraded = untilState(primary, 'degraded');
    process.kill(daemon.pid, 'SIGSTOP');
    const blocks = new Set<number>();
    try {
      // The first write meets the hung peer and completes once the primary drops it (peerTimeoutMs).
      for (let i = 0; i < 32; i++) {
        const offset = 1 * MiB + ((i * 37) % 64) * blockBytes;
        await primary.device.write(pattern(blockBytes, 10 + i), offset);
        blocks.add(offset / blockBytes);
      }
      await degraded;
      expect(primary.stats().link.state).not.toBe('up');
      await primary.device.writeZeroes(4 * MiB, 64 * KiB);
      for (let b = 0; b < 16; b++) blocks.add(4 * MiB / blockBytes + b);
      // A hang longer than a few attempts to attach again: the peer reads those late, after SIGCONT.
      await within(
        'failed attaches',
        new Promise<void>((resolve) => {
          let failed = 0;
          const on = (event: { state: string }) => {
            if (event.state !== 'down' || ++failed < failedAttachesBeforeCont) return;
            primary.off('link', on);
            resolve();
          };
          primary.on('link', on);
        }),
      );
    } finally {
      process.kill(daemon.pid, 'SIGCONT');
    }
    const writtenBytes = blocks.size * blockBytes;
    expect(primary.stats().unsentBytes).toBe(writtenBytes);
    const before = primary.stats().resyncBytesTotal;
    const resynced = new Promise<{ full: boolean; bytes: number }>((resolve) => primary.once('resync-done', resolve));
    await untilState(primary, 'replicating');
    const done = await within('resync-done', resynced);
    const sent = primary.stats().resyncBytesTotal - before;
    expect(done.full).toBe(false);
    // Exactly the blocks written while the peer was away, no margin: the peer kept its buffers (same
    // instance), so nothing forwarded before the hang goes again.
    expect(sent).toBe(writtenBytes);
    await commit(primary);
    await expectSameDisks(path, daemon);
  });

  it('a peer killed with SIGKILL mid-forward and restarted: the writer sees no error, and a resync makes the disks identical', async () => {
    const first = await startDaemon({ volumes: ['vol0:8M'] });
    const { primary, path } = await openPrimary(first);
    await untilState(primary, 'replicating');
    await primary.device.write(pattern(1 * MiB, 1), 0);
    await commit(primary);

    // Killed while forwards are in flight: the writer has been going for a while and the link is up.
    const writer = startWriter(primary);
    await writer.reached(50);
    expect(primary.stats().state).toBe('replicating');
    const degraded = untilState(primary, 'degraded');
    // Written to the peer's buffer of the open epoch, or on the way: all lost with it.
    const touchedBeforeKill = writer.touched.size;
    await first.stop('SIGKILL');
    await degraded;
    let touchedAtResync = 0;
    primary.once('resync-start', () => (touchedAtResync = writer.touched.size));
    const resynced = new Promise<{ full: boolean; bytes: number }>((resolve) => primary.once('resync-done', resolve));
    const second = await restart(first);
    await untilState(primary, 'replicating');
    const done = await within('resync-done', resynced);
    // The writer goes on over the new session, then stops.
    await writer.reached(writer.written + 50);
    expect(await writer.stop()).toBeNull();
    expect(writer.written).toBeLessThan(writesMax);
    expect(done.full).toBe(false);
    // The new instance lost what it had not made durable: every chunk written since the last durable
    // checkpoint goes again, and nothing else (the 1 MiB before it was durable).
    expect(done.bytes).toBeGreaterThanOrEqual(touchedBeforeKill * writerChunkBytes);
    expect(done.bytes).toBeLessThanOrEqual(touchedAtResync * writerChunkBytes);
    await commit(primary);
    await expectSameDisks(path, second);
  });
});
