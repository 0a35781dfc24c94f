/**
 * Goal: a primary daemon (`gannet serve --role primary`) and a secondary daemon, two real processes on
 * loopback, keep the secondary's backing file equal to the primary's disk at every checkpoint made
 * durable; the VM side never sees the secondary die; a resync after the secondary (or the primary)
 * comes back sends what may differ and not the whole disk.
 *
 * Method: qemu-io and a libnbd (python) writer on the primary's export NAME; checkpoints through the CLI
 * and the API; the primary's events (GET /v1/events) say when the link, state, durable epoch and resync
 * change, so nothing waits on a timer. Daemons are killed with SIGKILL and restarted on the same data
 * directory (the secondary on the same control port, which the primary's config names). Both
 * DATA_DIR/volumes/NAME/disk.img files are compared byte for byte once the secondary's durable epoch
 * reaches the primary's last checkpoint. A resync's size is checked against the blocks written since the
 * last checkpoint made durable (what the secondary may have lost) plus its torn ranges and a margin.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  api,
  assertQemuOk,
  clientFlags,
  gannet,
  makeTempDir,
  primaryConfig as sharedPrimaryConfig,
  qemuIo,
  requireTool,
  run,
  startDaemon,
  stopAll,
  type DaemonHandle,
} from './helpers/daemon.js';
import { subscribe, type EventStream } from './helpers/events.js';
import { createVethNamespace, deleteVethNamespace, must, vethNamespace } from './helpers/netns.js';
import { makePki } from './helpers/pki.js';
import { systemPython } from './helpers/process.js';

const MiB = 1024 * 1024;
const volumeBytes = 64 * MiB;
/** The primary's dirty map unit (core dirtyBlockBytes) and its activity log's (core activityExtentBytes). */
const dirtyBlockBytes = 4096;
const activityExtentBytes = 4 * MiB;
/** The writer's requests, all inside one region so that a resync of the whole disk would show. */
const writeBytes = 4096;
const regionOffset = 16 * MiB;
const regionBytes = 8 * MiB;
/** Bounds of the writer: it stops at whichever comes first, or when told to. */
const writerWritesMax = 200_000;
const writerSecondsMax = 60;
/** Writes the writer must have finished at each step (a few hundred milliseconds of writing each). */
const writesPerStep = 300;
/**
 * Slack over the exact dirty blocks: a write in flight at the kill counts once in the writer's log and may
 * be resent whole; resync chunks round nothing up (the map is per 4 KiB block), so one MiB is generous.
 */
const resyncMarginBytes = 1 * MiB;
const eventWaitMs = 30_000;
/** The resync rate of the mid-resync test: 4 MiB take 4 s, the kill lands well inside. */
const resyncSlowBytesPerSecond = 1 * MiB;
/** The primary's peerTimeoutMs when the link is cut: a hung connection is dropped after this long. */
const cutTimeoutMs = 1000;

interface Pair {
  secondary: DaemonHandle;
  primary: DaemonHandle;
  /** The primary's config file, naming the secondary's control port (kept across restarts). */
  config: string;
}

async function startSecondary(
  options: { dataDir?: string; controlPort?: number; host?: string; wrapper?: string[]; args?: string[] } = {},
): Promise<DaemonHandle> {
  const host = options.host ?? '127.0.0.1';
  return startDaemon({
    ...(options.dataDir !== undefined && { dataDir: options.dataDir }),
    ...(options.wrapper !== undefined && { wrapper: options.wrapper }),
    volumes: [`vm:${volumeBytes}`],
    args: ['--nbd', `${host}:0`, '--control', `${host}:${options.controlPort ?? 0}`, ...(options.args ?? [])],
  });
}

/** A primary's config for `vm` (helpers/daemon.ts), its peer timeout 3 s unless given. */
function primaryConfig(secondary: DaemonHandle, peerTimeoutMs = 3000, volumeLines: string[] = []): Promise<string> {
  return sharedPrimaryConfig(secondary, { volumeBytes, peerTimeoutMs, volumeLines });
}

function startPrimary(config: string, dataDir?: string, args: string[] = []): Promise<DaemonHandle> {
  return startDaemon({ ...(dataDir !== undefined && { dataDir }), volumes: [], args: ['--config', config, ...args] });
}

async function startPair(): Promise<Pair> {
  const secondary = await startSecondary();
  const config = await primaryConfig(secondary);
  const primary = await startPrimary(config);
  return { secondary, primary, config };
}

async function view(daemon: DaemonHandle): Promise<Record<string, any>> {
  const response = await api(daemon, 'GET', '/v1/volumes/vm');
  expect(response.status).toBe(200);
  return response.json;
}

/** Resolves once the primary's volume is in `state`: now, or by a `state` event on `events` (subscribed before). */
async function reachState(primary: DaemonHandle, events: EventStream, state: string): Promise<void> {
  if ((await view(primary)).state === state) return;
  await events.next((event) => event.event === 'state' && event.data.state === state, eventWaitMs);
}

/** Resolves once the peer's durable epoch reported to the primary reaches `epoch`. */
async function reachDurable(primary: DaemonHandle, events: EventStream, epoch: number): Promise<void> {
  const now = (await view(primary)).peerDurableEpoch;
  if (now !== null && now >= epoch) return;
  await events.next((event) => event.event === 'durable' && event.data.epoch >= epoch, eventWaitMs);
}

/** `gannet checkpoint vm` on the primary: the peer's epoch it printed. */
async function checkpointCli(primary: DaemonHandle): Promise<number> {
  const result = await gannet(['checkpoint', 'vm', ...clientFlags(primary)]);
  expect(result.stderr).toBe('');
  expect(result.status).toBe(0);
  const match = /^vm: epoch (\d+)$/m.exec(result.stdout);
  expect(match).not.toBeNull();
  return Number(match![1]);
}

async function checkpointApi(primary: DaemonHandle): Promise<number> {
  const response = await api(primary, 'POST', '/v1/volumes/vm/checkpoint');
  expect(response.status).toBe(200);
  return response.json.epoch as number;
}

/** NBD_CMD_TRIM through libnbd (qemu-io sends discards only with discard=unmap on its drive). */
async function trim(daemon: DaemonHandle, offset: number, length: number): Promise<void> {
  const uri = `nbd://${daemon.nbd.host}:${daemon.nbd.port}/vm`;
  const code = `import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nh.trim(${length}, ${offset})\nh.flush()\nh.shutdown()\nprint('trimmed')`;
  const result = await run(systemPython, ['-c', code, uri]);
  expect({ status: result.status, stdout: result.stdout.trim(), stderr: result.stderr }).toEqual({ status: 0, stdout: 'trimmed', stderr: '' });
}

const diskOf = (daemon: DaemonHandle) => join(daemon.dataDir, 'volumes', 'vm', 'disk.img');

/** A final checkpoint, made durable on the secondary; then both disks must be equal byte for byte. */
async function expectDisksEqual(pair: Pair, events: EventStream): Promise<void> {
  const epoch = await checkpointCli(pair.primary);
  await reachDurable(pair.primary, events, epoch);
  expect((await view(pair.secondary)).durableEpoch).toBeGreaterThanOrEqual(epoch);
  const [mine, theirs] = await Promise.all([readFile(diskOf(pair.primary)), readFile(diskOf(pair.secondary))]);
  expect(theirs.length).toBe(volumeBytes);
  expect(mine.length).toBe(volumeBytes);
  let first = -1;
  for (let at = 0; at < volumeBytes && first === -1; at += MiB) {
    if (Buffer.compare(mine.subarray(at, at + MiB), theirs.subarray(at, at + MiB)) !== 0) first = at;
  }
  expect({ firstDifferentMiB: first === -1 ? null : first / MiB }).toEqual({ firstDifferentMiB: null });
}

/**
 * The VM-side writer: libnbd (python) on the primary's export, one 4 KiB write at a time at offsets
 * spread over the region, each line `i offset` printed once the write is acknowledged. It stops at
 * `writerWritesMax` writes, after `writerSecondsMax`, or when a line arrives on stdin, and exits 0 only if
 * no request failed.
 */
const writerScript = `
import nbd, os, select, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
region, length, blocks = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
writes_max, deadline = int(sys.argv[5]), time.monotonic() + float(sys.argv[6])
for i in range(writes_max):
    if time.monotonic() > deadline or select.select([sys.stdin], [], [], 0)[0]:
        break
    offset = region + ((i * 7919) % blocks) * length
    h.pwrite(bytes([i % 251 + 1]) * length, offset)
    print(i, offset, flush=True)
h.flush()
h.shutdown()
print('done', flush=True)
`;

class Writer {
  readonly offsets: number[] = [];
  readonly exited: Promise<number | null>;
  private readonly child: ChildProcess;
  private stderr = '';
  private waiters: { count: number; resolve: () => void }[] = [];

  constructor(primary: DaemonHandle) {
    const uri = `nbd://${primary.nbd.host}:${primary.nbd.port}/vm`;
    const args = ['-c', writerScript, uri, String(regionOffset), String(writeBytes), String(regionBytes / writeBytes), String(writerWritesMax), String(writerSecondsMax)];
    this.child = spawn(systemPython, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    writers.add(this.child);
    this.child.stderr!.on('data', (chunk: Buffer) => (this.stderr += chunk.toString()));
    createInterface({ input: this.child.stdout! }).on('line', (line) => {
      const match = /^(\d+) (\d+)$/.exec(line);
      if (match === null) return;
      this.offsets.push(Number(match[2]));
      this.waiters = this.waiters.filter((waiter) => {
        if (this.offsets.length < waiter.count) return true;
        waiter.resolve();
        return false;
      });
    });
    this.exited = new Promise((resolve) => this.child.once('exit', (code) => resolve(code))).finally(() => writers.delete(this.child)) as Promise<number | null>;
  }

  /** Resolves once `count` writes are acknowledged; rejects if the writer exits first. */
  reach(count: number): Promise<void> {
    if (this.offsets.length >= count) return Promise.resolve();
    return Promise.race([
      new Promise<void>((resolve) => this.waiters.push({ count, resolve })),
      this.exited.then((code) => {
        if (this.offsets.length < count) throw new Error(`writer exited (${code}) after ${this.offsets.length} writes: ${this.stderr}`);
      }),
    ]);
  }

  /** Tells the writer to stop; resolves with its exit status and what it wrote on stderr. */
  async finish(): Promise<{ code: number | null; stderr: string }> {
    this.child.stdin!.end('stop\n');
    const code = await this.exited;
    return { code, stderr: this.stderr };
  }
}

const writers = new Set<ChildProcess>();

/** Distinct dirty blocks, in bytes, that the writes `from` on (by index in the writer's log) touched. */
function blocksWritten(offsets: readonly number[], from: number, unit: number): number {
  const blocks = new Set<number>();
  for (const offset of offsets.slice(from)) {
    for (let block = Math.floor(offset / unit); block * unit < offset + writeBytes; block++) blocks.add(block);
  }
  return blocks.size * unit;
}

const tornBytes = (secondaryView: Record<string, any>) =>
  (secondaryView.tornRanges as { length: number }[]).reduce((sum, range) => sum + range.length, 0);

describe('a primary and a secondary daemon on loopback', () => {
  afterEach(async () => {
    for (const child of writers) child.kill('SIGKILL');
    await stopAll();
  });

  it('replicates writes, zeroes and trims: after a checkpoint is durable, the secondary disk equals the primary disk', async () => {
    requireTool('qemu-io');
    requireTool('python3-nbd');
    const pair = await startPair();
    const events = await subscribe(pair.primary, 'vm');
    await reachState(pair.primary, events, 'replicating');
    const up = await view(pair.primary);
    expect(up).toMatchObject({ role: 'primary', state: 'replicating', link: { state: 'up', peer: `127.0.0.1:${pair.secondary.control.port}` }, ackMode: 'peer' });

    assertQemuOk(
      await qemuIo(pair.primary, 'vm', [
        'write -P 0x11 0 1M',
        'write -P 0x22 3M 512k',
        'write -P 0x33 8M 4M',
        // Zeroes over data the secondary already has.
        'write -z 9M 1M',
        'write -P 0x44 63M 1M',
        'flush',
      ]),
      'writes on the primary',
    );
    await trim(pair.primary, 11 * MiB, 512 * 1024);
    const epoch = await checkpointCli(pair.primary);
    // The event of this checkpoint (the first sync's own checkpoint may be queued before it).
    await events.next((event) => event.event === 'checkpoint' && event.data.epoch === epoch, eventWaitMs);
    await reachDurable(pair.primary, events, epoch);
    const secondaryView = await view(pair.secondary);
    expect(secondaryView.durableEpoch).toBeGreaterThanOrEqual(epoch);
    const [mine, theirs] = await Promise.all([readFile(diskOf(pair.primary)), readFile(diskOf(pair.secondary))]);
    expect(Buffer.compare(mine, theirs)).toBe(0);
    // The bytes themselves, so that two empty disks would not pass.
    expect(theirs.subarray(0, MiB).every((byte) => byte === 0x11)).toBe(true);
    expect(theirs.subarray(9 * MiB, 10 * MiB).every((byte) => byte === 0)).toBe(true);
    expect(theirs.subarray(10 * MiB, 11 * MiB).every((byte) => byte === 0x33)).toBe(true);
    expect(theirs.subarray(11 * MiB, 11 * MiB + 512 * 1024).every((byte) => byte === 0)).toBe(true);
    expect(theirs.subarray(63 * MiB).every((byte) => byte === 0x44)).toBe(true);

    const after = await view(pair.primary);
    expect(after).toMatchObject({ peerEpoch: epoch, dirtyBytes: 0, unsentBytes: 0 });
    expect(after.peerDurableEpoch).toBeGreaterThanOrEqual(epoch);
    const metrics = (await api(pair.primary, 'GET', '/metrics')).text;
    expect(metrics).toContain('gannet_primary_link_up{volume="vm"} 1');
    expect(metrics).toContain(`gannet_primary_peer_epoch{volume="vm"} ${epoch}`);
    expect(metrics).toContain('gannet_primary_dirty_bytes{volume="vm"} 0');
    await events.close();
  });

  it('replicates over NBD TLS to a secondary that requires it, and a primary without credentials is refused', async () => {
    requireTool('qemu-io');
    const pki = await makePki();
    const secondary = await startSecondary({ args: ['--tls', 'require', '--tls-certificates', pki.serverDir, '--tls-verify-peer'] });
    const config = await primaryConfig(secondary);
    const plain = await startPrimary(config);
    const plainEvents = await subscribe(plain, 'vm');
    if (!/requires TLS/.test((await view(plain)).link.error ?? '')) {
      await plainEvents.next((event) => event.event === 'link' && /requires TLS/.test(event.data.error ?? ''), eventWaitMs);
    }
    expect((await view(plain)).state).toBe('degraded');
    await plainEvents.close();
    expect((await plain.stop()).code).toBe(0);

    const pair: Pair = { secondary, primary: await startPrimary(config, undefined, ['--peer-tls-certificates', pki.clientDir]), config };
    const events = await subscribe(pair.primary, 'vm');
    await reachState(pair.primary, events, 'replicating');
    assertQemuOk(await qemuIo(pair.primary, 'vm', ['write -P 0x7e 5M 3M', 'flush']), 'writes over TLS');
    await expectDisksEqual(pair, events);
    expect((await readFile(diskOf(pair.secondary))).subarray(5 * MiB, 8 * MiB).every((byte) => byte === 0x7e)).toBe(true);
    await events.close();
  });

  it('the secondary killed -9 under a writer: no error for the VM, degraded, then a resync of what it may have lost', async () => {
    requireTool('python3-nbd');
    requireTool('qemu-io');
    const pair = await startPair();
    const events = await subscribe(pair.primary, 'vm');
    await reachState(pair.primary, events, 'replicating');
    assertQemuOk(await qemuIo(pair.primary, 'vm', ['write -P 0x5e 0 4M', 'flush']), 'baseline');
    await reachDurable(pair.primary, events, await checkpointApi(pair.primary));

    const writer = new Writer(pair.primary);
    await writer.reach(writesPerStep);
    // Every write acknowledged before this checkpoint was requested is in the epoch it returns.
    const coveredWrites = writer.offsets.length;
    await reachDurable(pair.primary, events, await checkpointApi(pair.primary));
    await writer.reach(coveredWrites + writesPerStep);

    const controlPort = pair.secondary.control.port;
    expect((await pair.secondary.stop('SIGKILL')).signal).toBe('SIGKILL');
    await reachState(pair.primary, events, 'degraded');
    const atDegraded = writer.offsets.length;
    await writer.reach(atDegraded + writesPerStep);
    const finished = await writer.finish();
    expect(finished).toEqual({ code: 0, stderr: '' });
    const degraded = await view(pair.primary);
    expect(degraded.state).toBe('degraded');
    expect(degraded.link.state).not.toBe('up');
    expect(degraded.unsentBytes).toBeGreaterThan(0);
    expect((await api(pair.primary, 'POST', '/v1/volumes/vm/checkpoint')).json.error).toMatchObject({ reason: 'EPEER' });

    pair.secondary = await startSecondary({ dataDir: pair.secondary.dataDir, controlPort });
    // The pair's first connection was a full sync (a new secondary volume): its events are still queued.
    const done = await events.next((event) => event.event === 'resync-done' && event.data.full === false, eventWaitMs);
    await reachState(pair.primary, events, 'replicating');
    // What the restarted secondary may lack: every block written since the last durable checkpoint.
    const lostBytes = blocksWritten(writer.offsets, coveredWrites, dirtyBlockBytes);
    const torn = tornBytes(await view(pair.secondary));
    expect(done.data.bytes).toBeGreaterThan(0);
    expect(done.data.bytes).toBeLessThanOrEqual(lostBytes + torn + resyncMarginBytes);
    expect(lostBytes).toBeLessThan(volumeBytes / 4);
    console.log(
      `secondary kill: ${writer.offsets.length} writes, ${writer.offsets.length - atDegraded} while degraded; ` +
        `resync ${done.data.bytes} bytes (${done.data.dataBytes} as data) in ${done.data.durationMs} ms; bound ${lostBytes} + torn ${torn} + margin ${resyncMarginBytes}`,
    );
    const replicating = await view(pair.primary);
    expect(replicating.lastResync).toMatchObject({ bytesDone: done.data.bytes, full: false });
    expect(replicating.unsentBytes).toBe(0);
    await expectDisksEqual(pair, events);
    await events.close();
  });

  it('the secondary killed -9 in the middle of a resync: the next resync sends it all again, no more, and the disks end equal', async () => {
    requireTool('qemu-io');
    const secondary = await startSecondary();
    // A slow resync (1 MiB/s of data), so that the kill lands in the middle of it.
    const config = await primaryConfig(secondary, 3000, [`    resyncBytesPerSecondMax: ${resyncSlowBytesPerSecond}`]);
    const pair: Pair = { secondary, primary: await startPrimary(config), config };
    const events = await subscribe(pair.primary, 'vm');
    await reachState(pair.primary, events, 'replicating');
    await reachDurable(pair.primary, events, await checkpointApi(pair.primary));

    const controlPort = pair.secondary.control.port;
    expect((await pair.secondary.stop('SIGKILL')).signal).toBe('SIGKILL');
    assertQemuOk(await qemuIo(pair.primary, 'vm', ['write -P 0x71 8M 4M']), 'writes while degraded');
    await reachState(pair.primary, events, 'degraded');
    const writtenWhileDegraded = 4 * MiB;

    pair.secondary = await startSecondary({ dataDir: pair.secondary.dataDir, controlPort });
    const started = await events.next((event) => event.event === 'resync-start' && event.data.full === false, eventWaitMs);
    expect(started.data.bytes).toBe(writtenWhileDegraded);
    expect((await pair.secondary.stop('SIGKILL')).signal).toBe('SIGKILL');
    await reachState(pair.primary, events, 'degraded');
    const interrupted = await view(pair.primary);
    // The last resync that finished is still the pair's first (a full sync of the new secondary volume).
    expect(interrupted.lastResync, 'the interrupted resync never finished').toMatchObject({ full: true });
    // Nothing the interrupted resync sent counts: the restarted secondary lost it with its buffers.
    expect(interrupted.unsentBytes).toBe(writtenWhileDegraded);

    pair.secondary = await startSecondary({ dataDir: pair.secondary.dataDir, controlPort });
    const done = await events.next((event) => event.event === 'resync-done' && event.data.full === false, eventWaitMs);
    await reachState(pair.primary, events, 'replicating');
    const torn = tornBytes(await view(pair.secondary));
    expect(done.data.bytes).toBeGreaterThanOrEqual(writtenWhileDegraded);
    expect(done.data.bytes).toBeLessThanOrEqual(writtenWhileDegraded + torn + resyncMarginBytes);
    await expectDisksEqual(pair, events);
    const disk = await readFile(diskOf(pair.secondary));
    expect(disk.subarray(8 * MiB, 12 * MiB).every((byte) => byte === 0x71)).toBe(true);
    await events.close();
  });

  it('a failover on the secondary fences the primary: its next write fails for the VM, and it says so in status and metrics', async () => {
    requireTool('qemu-io');
    const pair = await startPair();
    const events = await subscribe(pair.primary, 'vm');
    await reachState(pair.primary, events, 'replicating');
    assertQemuOk(await qemuIo(pair.primary, 'vm', ['write -P 0x41 0 1M', 'flush']), 'before the failover');
    await reachDurable(pair.primary, events, await checkpointApi(pair.primary));
    const failover = await gannet(['failover', 'vm', '--to', 'secondary', ...clientFlags(pair.secondary)]);
    expect(failover.status, failover.stderr).toBe(0);

    // The stale primary's write is refused by the failed-over secondary, and the VM gets an error.
    const refused = await qemuIo(pair.primary, 'vm', ['write -P 0x42 0 64k']);
    expect(refused.status !== 0 || /error|failed/i.test(refused.stdout + refused.stderr), refused.stdout + refused.stderr).toBe(true);
    await reachState(pair.primary, events, 'fenced');
    const fenced = await view(pair.primary);
    expect(fenced).toMatchObject({ state: 'fenced', error: { code: 'EFENCED' }, link: { state: 'refused' } });
    expect((await api(pair.primary, 'POST', '/v1/volumes/vm/checkpoint')).json.error).toMatchObject({ code: 'conflict', message: expect.stringMatching(/fenced/) });
    const metrics = await api(pair.primary, 'GET', '/metrics');
    expect(metrics.text).toMatch(/^gannet_primary_state\{volume="vm",state="fenced"\} 1$/m);
    // The survivor's disk holds what was acknowledged before the failover, not the refused write.
    const disk = await readFile(diskOf(pair.secondary));
    expect(disk.subarray(0, 64 * 1024).every((byte) => byte === 0x41)).toBe(true);
    await events.close();
  });

  it('the primary killed -9 while degraded: after restart the resync still sends what was written meanwhile', async () => {
    requireTool('qemu-io');
    requireTool('python3-nbd');
    const pair = await startPair();
    let events = await subscribe(pair.primary, 'vm');
    await reachState(pair.primary, events, 'replicating');
    assertQemuOk(await qemuIo(pair.primary, 'vm', ['write -P 0x61 0 8M', 'flush']), 'baseline');
    await reachDurable(pair.primary, events, await checkpointApi(pair.primary));

    const controlPort = pair.secondary.control.port;
    expect((await pair.secondary.stop('SIGKILL')).signal).toBe('SIGKILL');
    // Data over the baseline, new data, zeroes and a trim, in two 4 MiB extents. The primary learns that
    // the secondary is gone when the first of them fails to go there, or from its probe of the idle link.
    assertQemuOk(
      await qemuIo(pair.primary, 'vm', ['write -P 0x62 1M 1M', 'write -P 0x63 40M 2M', 'write -z 2M 512k']),
      'writes while degraded',
    );
    await trim(pair.primary, 41 * MiB, 64 * 1024);
    await reachState(pair.primary, events, 'degraded');
    const writtenWhileDegraded = 1 * MiB + 2 * MiB + 512 * 1024;
    /**
     * What a resync after a crash of the primary may resend: every 4 MiB extent in its activity log. As
     * DRBD's, the log keeps extents hot until it is full (least recently used go first), so it holds every
     * extent this run wrote: 0 and 1 (the baseline and the writes at 1-2.5M) and 10 (at 40-42M).
     */
    const loggedBytes = 3 * activityExtentBytes;
    expect((await view(pair.primary)).unsentBytes).toBe(writtenWhileDegraded);
    await events.close();
    expect((await pair.primary.stop('SIGKILL')).signal).toBe('SIGKILL');

    // The primary comes back first, still degraded, so its resync is seen from the start.
    pair.primary = await startPrimary(pair.config, pair.primary.dataDir);
    events = await subscribe(pair.primary, 'vm');
    const reopened = await view(pair.primary);
    expect(reopened.state).toBe('degraded');
    // After a crash, every block of an extent in the activity log may differ.
    expect(reopened.unsentBytes).toBeGreaterThanOrEqual(writtenWhileDegraded);
    expect(reopened.unsentBytes).toBeLessThanOrEqual(loggedBytes);

    pair.secondary = await startSecondary({ dataDir: pair.secondary.dataDir, controlPort });
    const done = await events.next((event) => event.event === 'resync-done', eventWaitMs);
    await reachState(pair.primary, events, 'replicating');
    const torn = tornBytes(await view(pair.secondary));
    expect(done.data.full).toBe(false);
    expect(done.data.bytes).toBeGreaterThanOrEqual(writtenWhileDegraded);
    expect(done.data.bytes).toBeLessThanOrEqual(loggedBytes + torn + resyncMarginBytes);
    console.log(
      `primary kill: ${writtenWhileDegraded} bytes written while degraded; resync ${done.data.bytes} bytes (${done.data.dataBytes} as data); ` +
        `bound ${loggedBytes} + torn ${torn} + margin ${resyncMarginBytes}`,
    );
    await expectDisksEqual(pair, events);
    const disk = await readFile(diskOf(pair.secondary));
    expect(disk.subarray(1 * MiB, 2 * MiB).every((byte) => byte === 0x62)).toBe(true);
    expect(disk.subarray(2 * MiB, 2 * MiB + 512 * 1024).every((byte) => byte === 0)).toBe(true);
    expect(disk.subarray(40 * MiB, 41 * MiB).every((byte) => byte === 0x63)).toBe(true);
    expect(disk.subarray(41 * MiB, 41 * MiB + 64 * 1024).every((byte) => byte === 0)).toBe(true);
    await events.close();
  });
});

/**
 * The link cut, not a process killed: the secondary daemon runs in a network namespace of its own, joined
 * to the test's by a veth pair, and the host's end is set down under a writer (packets to the secondary
 * go nowhere; its TCP connections hang until the primary's peerTimeoutMs drops them). Both daemons live
 * on; once the link is back up, the primary resyncs what the secondary did not get. As root, like the
 * mount tests: without it this fails, never skips.
 */
describe('a primary and a secondary in another network namespace', () => {
  const net = vethNamespace('t', 7);
  const { namespace, hostEnd, hostAddress, peerAddress } = net;
  const ip = requireTool('ip');

  beforeAll(() => createVethNamespace(ip, net));

  afterEach(async () => {
    for (const child of writers) child.kill('SIGKILL');
    await stopAll();
  });

  afterAll(() => deleteVethNamespace(ip, net));

  it('a cut link: the writer sees no error, the primary goes degraded, and resyncs once the link is back', async () => {
    requireTool('python3-nbd');
    const secondary = await startSecondary({ host: peerAddress, wrapper: [ip, 'netns', 'exec', namespace] });
    const config = await primaryConfig(secondary, cutTimeoutMs);
    const pair: Pair = { secondary, primary: await startPrimary(config), config };
    const events = await subscribe(pair.primary, 'vm');
    await reachState(pair.primary, events, 'replicating');

    const writer = new Writer(pair.primary);
    await writer.reach(writesPerStep);
    const coveredWrites = writer.offsets.length;
    await reachDurable(pair.primary, events, await checkpointApi(pair.primary));
    await writer.reach(coveredWrites + writesPerStep);

    await must(ip, ['link', 'set', hostEnd, 'down']);
    await reachState(pair.primary, events, 'degraded');
    const atDegraded = writer.offsets.length;
    await writer.reach(atDegraded + writesPerStep);
    expect((await view(pair.primary)).link.state).not.toBe('up');

    await must(ip, ['link', 'set', hostEnd, 'up']);
    const done = await events.next((event) => event.event === 'resync-done' && event.data.full === false, eventWaitMs);
    await reachState(pair.primary, events, 'replicating');
    const finished = await writer.finish();
    expect(finished).toEqual({ code: 0, stderr: '' });
    // The secondary kept its buffers: the resync sends what it did not get, within what was written
    // since the last durable checkpoint.
    const bound = blocksWritten(writer.offsets, coveredWrites, dirtyBlockBytes);
    const torn = tornBytes(await view(pair.secondary));
    expect(done.data.bytes).toBeGreaterThan(0);
    expect(done.data.bytes).toBeLessThanOrEqual(bound + torn + resyncMarginBytes);
    console.log(
      `link cut: ${writer.offsets.length} writes, ${writer.offsets.length - atDegraded} after the primary saw the cut; ` +
        `resync ${done.data.bytes} bytes in ${done.data.durationMs} ms; bound ${bound} + torn ${torn} + margin ${resyncMarginBytes}`,
    );
    await expectDisksEqual(pair, events);
    await events.close();
  });
});
