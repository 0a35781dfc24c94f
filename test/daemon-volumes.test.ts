/**
 * Goal: volumes are managed while the daemon runs, without disturbing the others. Created through the
 * API and the CLI, a volume is served at once (nbdinfo --list), takes writes, checkpoints and fails
 * over; deleted, its directory is kept aside or purged, its exports and metrics go, and events say so;
 * all while another volume takes I/O without an error. A delete is refused while a client is connected
 * or committed data is not yet flushed, and `force` closes the client. SIGHUP (and POST /v1/reload)
 * serves a volume added to the config file, refuses a file with a bad entry naming the field and leaves
 * the running volumes as they were. A consistency group of three volumes checkpoints atomically.
 *
 * Method: real daemons, real clients (qemu-io, nbdinfo, nbdcopy, python libnbd), the CLI and HTTP; the
 * group's atomicity is checked on what the committed state holds: one writer's sequence of writes
 * across the three volumes, each waiting for the previous acknowledgement, must be there as a prefix
 * (a consistent cut), covering every write acknowledged before the request, and nothing written after.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterEach, describe, expect, it } from 'vitest';
import {
  api,
  assertQemuOk,
  clientFlags,
  exportUri,
  gannet,
  listedExports,
  makeTempDir,
  qemuIo,
  requireTool,
  startDaemon,
  stopAll,
  type DaemonHandle,
} from './helpers/daemon.js';
import { subscribe } from './helpers/events.js';
import { mountPausable } from './helpers/mounts.js';
import { runOk } from './helpers/process.js';

const MiB = 1024 * 1024;
const blockBytes = 4096;
/** How long a python client gets to print the line a test waits for. */
const clientLineTimeoutMs = 20_000;

async function volumeNames(daemon: DaemonHandle): Promise<string[]> {
  return (await api(daemon, 'GET', '/v1/volumes')).json.volumes.map((view: { name: string }) => view.name);
}

/** A python libnbd client on stdin/stdout, its lines awaited one by one; stopped by stopAll's kill if left running. */
interface LineClient {
  readonly child: ChildProcess;
  line(match: RegExp): Promise<RegExpExecArray>;
  send(text: string): void;
  /** Closes its stdin and waits for its exit. */
  finish(): Promise<number | null>;
}

function pythonClient(script: string, args: string[]): LineClient {
  const child = spawn(requireTool('python3-nbd'), ['-c', script, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
  const lines: string[] = [];
  const waiters = new Set<() => void>();
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
  createInterface({ input: child.stdout! }).on('line', (text) => {
    lines.push(text);
    for (const waiter of waiters) waiter();
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  let consumed = 0;
  return {
    child,
    line(match) {
      let timer: NodeJS.Timeout | undefined;
      let waiter: (() => void) | undefined;
      return new Promise<RegExpExecArray>((resolve, reject) => {
        const look = () => {
          for (; consumed < lines.length; consumed++) {
            const found = match.exec(lines[consumed]);
            if (found) {
              consumed++;
              resolve(found);
              return;
            }
          }
        };
        waiter = look;
        waiters.add(look);
        timer = setTimeout(() => reject(new Error(`no line matching ${match} within ${clientLineTimeoutMs} ms: ${lines.join(' | ')} ${stderr}`)), clientLineTimeoutMs);
        void exited.then(() => {
          look();
          reject(new Error(`the client exited before a line matching ${match}: ${lines.join(' | ')} ${stderr}`));
        });
        look();
      }).finally(() => {
        clearTimeout(timer);
        if (waiter !== undefined) waiters.delete(waiter);
      });
    },
    send(text) {
      child.stdin!.write(text);
    },
    finish() {
      child.stdin!.end();
      return exited;
    },
  };
}

/** Connects, says so, then reads 512 bytes at offset 0 for each line on stdin and says how that went. */
const readerScript = `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print('connected', flush=True)
for _ in sys.stdin:
    try:
        h.pread(512, 0)
        print('read ok', flush=True)
    except nbd.Error as e:
        print('read failed:', e.string, flush=True)
`;

/**
 * One writer, three volumes: write i (seq i+1, a whole block of it) goes to volume i % 3, block i // 3 of
 * the region, after write i-1 was acknowledged. Stops at a line on stdin (or its end).
 */
const writerScript = `
import nbd, struct, sys, threading
uris = sys.argv[1:4]
region, limit = int(sys.argv[4]), int(sys.argv[5])
handles = []
for uri in uris:
    h = nbd.NBD()
    h.connect_uri(uri)
    handles.append(h)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
i = 0
while not stop.is_set() and i < limit:
    handles[i % 3].pwrite(struct.pack('<Q', i + 1) * (${blockBytes} // 8), region + (i // 3) * ${blockBytes})
    i += 1
    if i % 50 == 0:
        print(f'acked {i}', flush=True)
print(f'done {i}', flush=True)
`;

describe('gannet daemon: volumes managed at run time', () => {
  afterEach(stopAll);

  it('creates, serves, checkpoints, fails over, deletes and purges volumes (API and CLI) while another volume takes I/O', async () => {
    requireTool('qemu-io');
    const daemon = await startDaemon({ volumes: ['busy:64M'] });
    const events = await subscribe(daemon);
    let stopping = false;
    let rounds = 0;
    const failures: string[] = [];
    const io = (async () => {
      while (!stopping) {
        const pattern = 0x10 + (rounds % 0x60);
        const offset = (rounds % 32) * MiB;
        const result = await qemuIo(daemon, 'busy/primary', [`write -P ${pattern} ${offset} 1M`, `read -P ${pattern} ${offset} 1M`]);
        try {
          assertQemuOk(result, `busy: round ${rounds}`);
        } catch (error) {
          failures.push((error as Error).message);
        }
        rounds++;
      }
    })();
    let movedTo: string;
    try {
      // Through the API.
      const created = await api(daemon, 'POST', '/v1/volumes', { name: 'api1', sizeBytes: '32M', memoryBytesMax: '64M' });
      expect(created.status, created.text).toBe(201);
      expect(created.json).toMatchObject({ name: 'api1', state: 'replicating', sizeBytes: 32 * MiB, epoch: 0, strategy: 'gannet' });
      expect((await events.next((event) => event.event === 'volume-added')).data).toMatchObject({ volume: 'api1', how: 'created' });
      expect(await listedExports(daemon)).toEqual(['api1/primary', 'api1/secondary', 'busy/primary', 'busy/secondary']);
      expect((await api(daemon, 'POST', '/v1/volumes', { name: 'api1', sizeBytes: '32M' })).status).toBe(409);
      assertQemuOk(await qemuIo(daemon, 'api1/primary', ['write -P 0x61 0 64k']), 'api1: PVM writes');
      expect((await api(daemon, 'POST', '/v1/volumes/api1/checkpoint')).json).toEqual({ epoch: 1, durableEpoch: expect.any(Number), instance: expect.any(String) });
      assertQemuOk(await qemuIo(daemon, 'api1/secondary', ['read -P 0x61 0 64k', 'write -P 0x62 1M 64k']), 'api1: SVM');
      const failedOver = await api(daemon, 'POST', '/v1/volumes/api1/failover', { to: 'secondary' });
      expect(failedOver.json).toMatchObject({ state: 'failed-over', failoverTarget: 'secondary' });
      assertQemuOk(await qemuIo(daemon, 'api1/secondary', ['write -P 0x63 2M 64k', 'flush']), 'api1: writes after failover');
      const deleted = await api(daemon, 'DELETE', '/v1/volumes/api1');
      expect(deleted.status, deleted.text).toBe(200);
      expect(deleted.json).toMatchObject({ name: 'api1', purged: false });
      movedTo = deleted.json.movedTo;
      expect(movedTo.startsWith(join(daemon.dataDir, 'volumes', '.deleted', 'api1.'))).toBe(true);
      expect((await events.next((event) => event.event === 'volume-removed')).data).toMatchObject({ volume: 'api1', purged: false, movedTo });
      expect((await api(daemon, 'GET', '/v1/volumes/api1')).status).toBe(404);
      expect(await listedExports(daemon)).toEqual(['busy/primary', 'busy/secondary']);

      // Through the CLI.
      const made = await gannet(['volume', 'create', 'cli1', '--size', '32M', '--block-size', '8K', ...clientFlags(daemon)]);
      expect(made.status, made.stderr).toBe(0);
      expect(made.stdout).toContain('cli1: created, 32 MiB, strategy gannet');
      expect((await api(daemon, 'GET', '/v1/volumes/cli1')).json.blockBytes).toBe(8192);
      const badFlag = await gannet(['volume', 'create', 'cli2', '--size', '32M', '--block-size', '1000', ...clientFlags(daemon)]);
      expect(badFlag.status).toBe(1);
      expect(badFlag.stderr).toContain('--block-size: must be a power of two');
      assertQemuOk(await qemuIo(daemon, 'cli1/primary', ['write -P 0x71 0 64k']), 'cli1: PVM writes');
      expect((await gannet(['checkpoint', 'cli1', ...clientFlags(daemon)])).stdout).toBe('cli1: epoch 1\n');
      expect((await gannet(['failover', 'cli1', ...clientFlags(daemon)])).status).toBe(0);
      assertQemuOk(await qemuIo(daemon, 'cli1/secondary', ['read -P 0x71 0 64k', 'write -P 0x72 1M 64k', 'flush']), 'cli1: after failover');
      const purged = await gannet(['volume', 'delete', 'cli1', '--purge', ...clientFlags(daemon)]);
      expect(purged.status, purged.stderr).toBe(0);
      expect(purged.stdout).toBe('cli1: deleted, purged\n');
      expect(await volumeNames(daemon)).toEqual(['busy']);
    } finally {
      stopping = true;
      await io;
    }
    expect(failures).toEqual([]);
    expect(rounds).toBeGreaterThan(0);
    expect(await readdir(join(daemon.dataDir, 'volumes'))).toEqual(['.deleted', 'busy']);
    expect(await readdir(join(daemon.dataDir, 'volumes', '.deleted'))).toEqual([movedTo.split('/').at(-1)]);
    // The kept directory holds the disk as it was when deleted.
    const disk = await readFile(join(movedTo, 'disk.img'));
    for (const [offset, byte] of [[0, 0x61], [MiB, 0x62], [2 * MiB, 0x63]]) {
      expect(disk.subarray(offset, offset + 64 * 1024).every((value) => value === byte), `byte 0x${byte.toString(16)} at ${offset}`).toBe(true);
    }
    const metrics = (await api(daemon, 'GET', '/metrics', undefined, '')).text;
    expect(metrics).toContain('gannet_volumes_added_total 2');
    expect(metrics).toContain('gannet_volumes_removed_total 2');
    expect(metrics).not.toMatch(/volume="(api1|cli1)"/);
    await events.close();
    expect((await daemon.stop()).code).toBe(0);
  });

  it('refuses a delete while a client is connected or committed data is unflushed; force closes the client cleanly', async () => {
    // The volumes live on a file system whose device the test can pause.
    const dataDir = await makeTempDir();
    await mkdir(join(dataDir, 'volumes'));
    const storage = await mountPausable(join(dataDir, 'volumes'), 256 * MiB);
    const daemon = await startDaemon({ dataDir, volumes: ['v:16M', 'slow:16M'] });

    const client = pythonClient(readerScript, [exportUri(daemon, 'v/secondary')]);
    await client.line(/^connected$/);
    client.send('read\n');
    await client.line(/^read ok$/);
    expect((await api(daemon, 'GET', '/v1/volumes/v')).json.clients).toBe(1);
    const refused = await api(daemon, 'DELETE', '/v1/volumes/v');
    expect(refused.status).toBe(409);
    expect(refused.json.error.message).toContain('1 NBD client(s) connected');
    const viaCli = await gannet(['volume', 'delete', 'v', ...clientFlags(daemon)]);
    expect(viaCli.status).toBe(1);
    expect(viaCli.stderr).toMatch(/409 conflict.*client/);
    client.send('read\n');
    await client.line(/^read ok$/);

    const forced = await gannet(['volume', 'delete', 'v', '--force', '--purge', ...clientFlags(daemon)]);
    expect(forced.status, forced.stderr).toBe(0);
    // The connection was ended by the server: the client's next request fails, it did not hang.
    client.send('read\n');
    await client.line(/^read failed:/);
    expect(await client.finish()).toBe(0);
    expect(await volumeNames(daemon)).toEqual(['slow']);

    // Committed data the flusher cannot write yet (its storage hangs) is not dropped without force.
    const events = await subscribe(daemon, 'slow');
    assertQemuOk(await qemuIo(daemon, 'slow/primary', ['write -P 0x5e 0 1M']), 'slow: PVM writes');
    await storage.pause();
    expect((await api(daemon, 'POST', '/v1/volumes/slow/checkpoint')).status).toBe(200);
    expect((await api(daemon, 'GET', '/v1/volumes/slow')).json.bufferedBytes.committed).toBe(MiB);
    const unflushed = await api(daemon, 'DELETE', '/v1/volumes/slow');
    expect(unflushed.status).toBe(409);
    expect(unflushed.json.error.message).toContain('committed data not yet in its backing file');
    await storage.resume();
    await events.next((event) => event.event === 'flushed');
    expect((await api(daemon, 'DELETE', '/v1/volumes/slow')).status).toBe(200);
    await events.close();
    expect(await volumeNames(daemon)).toEqual([]);
    expect((await readdir(join(dataDir, 'volumes', '.deleted'))).map((entry) => entry.split('.')[0])).toEqual(['slow']);
    expect((await daemon.stop()).code).toBe(0);
  });

  it('SIGHUP serves a volume added to the config file; a bad entry is refused naming the field, the running volumes untouched', async () => {
    requireTool('qemu-io');
    const config = join(await makeTempDir(), 'gannet.yaml');
    await writeFile(config, 'volumes:\n  one:\n    sizeBytes: 16M\n');
    const daemon = await startDaemon({ volumes: [], args: ['--config', config] });
    assertQemuOk(await qemuIo(daemon, 'one/primary', ['write -P 0x41 0 64k']), 'one: PVM writes');
    expect((await gannet(['checkpoint', 'one', ...clientFlags(daemon)])).status).toBe(0);
    const events = await subscribe(daemon);

    await writeFile(
      config,
      'nbd:\n  requestBytesMax: 1M\nvolumes:\n  one:\n    sizeBytes: 16M\n    memoryBytesMax: 64M\n  two:\n    sizeBytes: 16M\ngroups:\n  pair: [one, two]\n',
    );
    daemon.child.kill('SIGHUP');
    expect((await events.next((event) => event.event === 'volume-added')).data).toMatchObject({ volume: 'two', how: 'created' });
    expect(await listedExports(daemon)).toEqual(['one/primary', 'one/secondary', 'two/primary', 'two/secondary']);
    assertQemuOk(await qemuIo(daemon, 'two/primary', ['write -P 0x42 0 64k', 'read -P 0x42 0 64k']), 'two: served');
    // Rereading the same file again adds nothing and reports what waits for a restart.
    const again = await api(daemon, 'POST', '/v1/reload');
    expect(again.status, again.text).toBe(200);
    expect(again.json).toEqual({
      added: [],
      failed: [],
      notInConfig: [],
      restartNeeded: ['nbd.requestBytesMax', 'volumes.one.memoryBytesMax'],
      applied: [],
    });
    expect((await api(daemon, 'GET', '/v1/groups')).json).toEqual({ groups: [{ name: 'pair', volumes: ['one', 'two'] }] });
    const pair = await gannet(['checkpoint', 'pair', ...clientFlags(daemon)]);
    expect(pair.stdout).toMatch(/^one: epoch \d+\ntwo: epoch 1\n$/);

    await writeFile(config, 'volumes:\n  one:\n    sizeBytes: 16M\n  two:\n    sizeBytes: 16M\n  three:\n    sizeBytes: 16M\n    blockBytes: 1000\n');
    daemon.child.kill('SIGHUP');
    const logged = await daemon.logLine((line) => line.msg === 'reload refused');
    expect(JSON.stringify(logged)).toContain('volumes.three.blockBytes');
    const bad = await api(daemon, 'POST', '/v1/reload');
    expect(bad.status).toBe(400);
    expect(bad.json.error).toMatchObject({ code: 'bad_request', field: 'volumes.three.blockBytes' });
    const viaCli = await gannet(['reload', ...clientFlags(daemon)]);
    expect(viaCli.status).toBe(1);
    expect(viaCli.stderr).toContain('volumes.three.blockBytes');
    expect(await volumeNames(daemon)).toEqual(['one', 'two']);
    expect(await readdir(join(daemon.dataDir, 'volumes'))).toEqual(['one', 'two']);
    expect((await api(daemon, 'GET', '/v1/groups')).json.groups).toHaveLength(1);
    assertQemuOk(await qemuIo(daemon, 'one/secondary', ['read -P 0x41 0 64k']), 'one: untouched');

    // A volume the file no longer names is kept, and reported.
    await writeFile(config, 'volumes:\n  two:\n    sizeBytes: 16M\n');
    const dropped = await gannet(['reload', ...clientFlags(daemon)]);
    expect(dropped.status, dropped.stderr).toBe(0);
    expect(dropped.stdout).toContain('not in the config file (kept): one\n');
    expect(dropped.stdout).toContain('applied: groups\n');
    expect(await volumeNames(daemon)).toEqual(['one', 'two']);
    await events.close();
    expect((await daemon.stop()).code).toBe(0);
  });

  it('checkpoints a consistency group of three volumes atomically: all writes acknowledged before, none after, a consistent cut of those in flight', async () => {
    requireTool('qemu-io');
    const nbdcopy = requireTool('nbdcopy');
    const dir = await makeTempDir();
    const config = join(dir, 'gannet.yaml');
    const members = ['g1', 'g2', 'g3'];
    await writeFile(config, `volumes:\n${members.map((name) => `  ${name}: { sizeBytes: 32M }\n`).join('')}groups:\n  vm: [${members.join(', ')}]\n`);
    const daemon = await startDaemon({ volumes: [], args: ['--config', config] });
    const region = 8 * MiB;
    const writesMax = 3 * ((16 * MiB) / blockBytes);

    for (const [index, name] of members.entries()) {
      assertQemuOk(await qemuIo(daemon, `${name}/primary`, [`write -P ${0xa0 + index} 0 64k`]), `${name}: acknowledged before`);
    }
    const writer = pythonClient(writerScript, [...members.map((name) => exportUri(daemon, `${name}/primary`)), String(region), String(writesMax)]);
    let acked = 0;
    const progress = async (atLeast: number) => {
      while (acked < atLeast) acked = Number((await writer.line(/^acked (\d+)$/))[1]);
    };
    await progress(300);
    const ackedBefore = acked;
    const checkpoint = await gannet(['checkpoint', 'vm', ...clientFlags(daemon)]);
    expect(checkpoint.status, checkpoint.stderr).toBe(0);
    expect(checkpoint.stdout).toBe('g1: epoch 1\ng2: epoch 1\ng3: epoch 1\n');
    for (const [index, name] of members.entries()) {
      assertQemuOk(await qemuIo(daemon, `${name}/primary`, [`write -P ${0xb0 + index} 1M 64k`]), `${name}: written after`);
    }
    await progress(acked + 300);
    writer.send('stop\n');
    const done = Number((await writer.line(/^done (\d+)$/))[1]);
    expect(await writer.finish()).toBe(0);

    // With nobody writing as the SVM, each secondary view is the committed state: C over the backing file.
    const images: Buffer[] = [];
    for (const name of members) {
      const file = join(dir, `${name}.img`);
      await runOk(nbdcopy, [exportUri(daemon, `${name}/secondary`), file]);
      images.push(await readFile(file));
    }
    images.forEach((image, index) => {
      expect(image.subarray(0, 64 * 1024).every((byte) => byte === 0xa0 + index), `${members[index]}: before`).toBe(true);
      expect(image.subarray(MiB, MiB + 64 * 1024).every((byte) => byte === 0), `${members[index]}: written after, not committed`).toBe(true);
    });
    /** The sequence number the block of write `seq` holds (0: none; -1: a mix, a torn write). */
    const held = (seq: number): number => {
      const i = seq - 1;
      const image = images[i % 3];
      const at = region + Math.floor(i / 3) * blockBytes;
      const value = image.readBigUInt64LE(at);
      for (let word = 8; word < blockBytes; word += 8) if (image.readBigUInt64LE(at + word) !== value) return -1;
      return Number(value);
    };
    let cut = 0;
    while (cut < done && held(cut + 1) === cut + 1) cut++;
    for (let seq = cut + 1; seq <= done; seq++) expect(held(seq), `write ${seq} after the cut at ${cut}`).toBe(0);
    expect(cut).toBeGreaterThanOrEqual(ackedBefore);
    expect(cut).toBeLessThan(done);
    expect((await daemon.stop()).code).toBe(0);
  });
});
