/**
 * Goal: one broken volume never stops the daemon, and the break is visible. A volume whose metadata is
 * lost or damaged, whose state file or volume.json is damaged or missing, or whose creation failed, is
 * in state `error` with the file named (status, API, /metrics) and is not served, while every other
 * volume is; nothing is replaced by a new volume; `gannet volume recover` brings a failed-over volume
 * back as the plain disk it was, and a replicating one as a disk needing a full resync, whose failover
 * is then refused over the torn bytes unless forced. Failures of checkpoint and failover answer 503 with
 * the reason (or 409), never 500, and `gannet checkpoint` with no names goes on working around them.
 *
 * Method: real daemons started one after another on one data directory, files removed or damaged between
 * runs as a fault or an operator would, I/O and checks with qemu-io and nbdinfo, a small tmpfs for a
 * full disk (mounted as root; the test fails, never skips, without one).
 */
import { cp, mkdir, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  api,
  assertQemuOk,
  clientFlags,
  gannet,
  makeTempDir,
  qemuIo,
  requireTool,
  run,
  startDaemon,
  stopAll,
  type DaemonHandle,
} from './helpers/daemon.js';
import { subscribe } from './helpers/events.js';
import { mountTmpfs } from './helpers/mounts.js';
import { runOk } from './helpers/process.js';

const MiB = 1024 * 1024;

const volumeDir = (dataDir: string, name: string) => join(dataDir, 'volumes', name);
const metaStore = (dataDir: string, name: string) => join(volumeDir(dataDir, name), 'meta', 'gannet-meta');

async function views(daemon: DaemonHandle): Promise<Map<string, any>> {
  const list = await api(daemon, 'GET', '/v1/volumes');
  expect(list.status).toBe(200);
  return new Map(list.json.volumes.map((view: { name: string }) => [view.name, view]));
}

async function exportNames(daemon: DaemonHandle): Promise<string> {
  const listed = await run(requireTool('nbdinfo'), ['--list', `nbd://${daemon.nbd.host}:${daemon.nbd.port}`]);
  expect(listed.status, listed.stderr).toBe(0);
  return listed.stdout;
}

async function metrics(daemon: DaemonHandle): Promise<string> {
  const response = await api(daemon, 'GET', '/metrics', undefined, '');
  expect(response.status).toBe(200);
  return response.text;
}

describe('gannet daemon: broken volumes, recovery, errors', () => {
  afterEach(stopAll);

  it('refuses a failed-over volume whose metadata is lost or damaged, serves the others, and recovers it as the disk it was', async () => {
    requireTool('qemu-io');
    const dataDir = await makeTempDir();
    const first = await startDaemon({ dataDir, volumes: ['lost:16M', 'garbled:16M', 'other:16M'] });
    for (const name of ['lost', 'garbled']) {
      assertQemuOk(await qemuIo(first, `${name}/secondary`, ['write -P 0xa1 0 64k']), `${name}: SVM writes`);
      expect((await gannet(['failover', name, ...clientFlags(first)])).status).toBe(0);
      assertQemuOk(await qemuIo(first, `${name}/secondary`, ['write -P 0xb2 1M 64k', 'flush']), `${name}: writes after failover`);
    }
    assertQemuOk(await qemuIo(first, 'other/primary', ['write -P 0xc3 0 64k']), 'other: PVM writes');
    // With no names, every replicating volume, and the failed-over ones said to be skipped.
    const all = await gannet(['checkpoint', ...clientFlags(first)]);
    expect(all.status, all.stderr).toBe(0);
    expect(all.stdout).toMatch(/^other: epoch \d+$/m);
    expect(all.stdout).toContain('lost: skipped: failed-over (to secondary)');
    expect((await first.stop()).code).toBe(0);

    await rm(metaStore(dataDir, 'lost'), { recursive: true });
    await writeFile(join(metaStore(dataDir, 'garbled'), 'CURRENT'), 'not a manifest name');
    const second = await startDaemon({ dataDir, volumes: [] });
    const broken = await views(second);
    expect([...broken.keys()]).toEqual(['garbled', 'lost', 'other']);
    expect(broken.get('lost')).toMatchObject({ state: 'error', error: { code: 'EMETA' }, uris: { primary: [], secondary: [] } });
    expect(broken.get('lost').error.message).toContain(metaStore(dataDir, 'lost'));
    expect(broken.get('garbled')).toMatchObject({ state: 'error', error: { code: 'EMETA' } });
    expect(broken.get('garbled').error.message).toContain(metaStore(dataDir, 'garbled'));
    expect(broken.get('garbled').error.message).toMatch(/damaged/);
    expect(broken.get('other').state).toBe('replicating');
    assertQemuOk(await qemuIo(second, 'other/secondary', ['read -P 0xc3 0 64k']), 'the healthy volume is served');
    const exported = await exportNames(second);
    expect(exported).toContain('other/secondary');
    expect(exported).not.toContain('lost/');
    expect(exported).not.toContain('garbled/');

    const table = await gannet(['status', ...clientFlags(second)]);
    expect(table.status).toBe(0);
    expect(table.stdout).toMatch(/^lost\s+gannet\s+error\(EMETA\)/m);
    expect(table.stdout).toContain(`lost: error EMETA since `);
    const text = await metrics(second);
    expect(text).toContain('gannet_volume_errors_total{volume="lost",code="EMETA"} 1');
    expect(text).toContain('gannet_volume_state{volume="lost",state="error"} 1');
    expect(second.stderr()).toMatch(/"volume":"lost".*"code":"EMETA"/);

    for (const [method, path] of [
      ['POST', '/v1/volumes/lost/checkpoint'],
      ['POST', '/v1/volumes/lost/failover'],
    ]) {
      const refused = await api(second, method, path);
      expect({ path, status: refused.status, error: refused.json.error }).toMatchObject({
        path,
        status: 503,
        error: { code: 'unavailable', reason: 'EMETA' },
      });
    }
    const healthy = await gannet(['volume', 'recover', 'other', ...clientFlags(second)]);
    expect(healthy.status).toBe(1);
    expect(healthy.stderr).toMatch(/409 conflict/);

    for (const name of ['lost', 'garbled']) {
      const recovered = await gannet(['volume', 'recover', name, ...clientFlags(second)]);
      expect(recovered.status, recovered.stderr).toBe(0);
      expect(recovered.stdout).toContain(`${name}: recovered as failed-over, now failed-over(secondary)`);
      assertQemuOk(
        await qemuIo(second, `${name}/secondary`, ['read -P 0xa1 0 64k', 'read -P 0xb2 1M 64k', 'write -P 0xe5 2M 4k', 'flush']),
        `${name}: the disk after recovery`,
      );
    }
    // The damaged store is kept beside the new one, never deleted.
    const kept = await readdir(join(volumeDir(dataDir, 'garbled'), 'meta'));
    expect(kept.some((entry) => entry.startsWith('gannet-meta.damaged-'))).toBe(true);
    expect((await views(second)).get('lost')).toMatchObject({ state: 'failed-over', failoverTarget: 'secondary' });
    expect((await second.stop()).code).toBe(0);
  });

  it('a damaged state file, and a missing or garbled volume.json: the volume is in error naming the file, never replaced', async () => {
    const dataDir = await makeTempDir();
    const first = await startDaemon({ dataDir, volumes: ['keep:16M', 'state:16M', 'record:16M', 'garbled:16M'] });
    expect((await first.stop()).code).toBe(0);
    const stateFile = join(volumeDir(dataDir, 'state'), 'meta', 'volume-state.json');
    await writeFile(stateFile, '{"format": 1, "uuid": "not a uuid"}\n');
    await rm(join(volumeDir(dataDir, 'record'), 'volume.json'));
    await writeFile(join(volumeDir(dataDir, 'garbled'), 'volume.json'), '{"name": "garbled", ');

    const second = await startDaemon({ dataDir, volumes: [] });
    const found = await views(second);
    expect([...found.keys()]).toEqual(['garbled', 'keep', 'record', 'state']);
    expect(found.get('keep').state).toBe('replicating');
    expect(found.get('state')).toMatchObject({ state: 'error', error: { code: 'EMETA' }, sizeBytes: 16 * MiB });
    expect(found.get('state').error.message).toContain(stateFile);
    expect(found.get('record')).toMatchObject({ state: 'error', error: { code: 'ERECORD' } });
    expect(found.get('record').error.message).toContain(`${join(volumeDir(dataDir, 'record'), 'volume.json')} is missing`);
    expect(found.get('garbled').error.message).toContain(`${join(volumeDir(dataDir, 'garbled'), 'volume.json')} is damaged: not JSON`);
    // Its files are left as they were.
    expect((await stat(join(volumeDir(dataDir, 'record'), 'disk.img'))).size).toBe(16 * MiB);

    const checkpoint = await api(second, 'POST', '/v1/volumes/record/checkpoint');
    expect(checkpoint.status).toBe(503);
    expect(checkpoint.json.error.reason).toBe('ERECORD');
    // The engine refuses to rebuild metadata from a damaged state file: 503, the file named.
    const unrecoverable = await api(second, 'POST', '/v1/volumes/state/recover');
    expect(unrecoverable.status).toBe(503);
    expect(unrecoverable.json.error).toMatchObject({ code: 'unavailable', reason: 'EMETA' });
    expect(unrecoverable.json.error.message).toContain(stateFile);
    expect((await api(second, 'POST', '/v1/volumes/record/recover')).status).toBe(409);
    expect((await second.stop()).code).toBe(0);

    // The only volume of a data directory lost its volume.json: no vol0 in its place.
    const alone = await makeTempDir();
    const third = await startDaemon({ dataDir: alone, volumes: [] });
    expect([...(await views(third)).keys()]).toEqual(['vol0']);
    expect((await third.stop()).code).toBe(0);
    await rm(join(volumeDir(alone, 'vol0'), 'volume.json'));
    const fourth = await startDaemon({ dataDir: alone, volumes: [] });
    const only = await views(fourth);
    expect([...only.keys()]).toEqual(['vol0']);
    expect(only.get('vol0')).toMatchObject({ state: 'error', error: { code: 'ERECORD' } });
    expect(await readdir(join(alone, 'volumes'))).toEqual(['vol0']);
    expect((await fourth.stop()).code).toBe(0);
  });

  it('a failed creation (--volume huge:3P) leaves nothing behind; the others are served, now and at the next start', async () => {
    requireTool('qemu-io');
    const dataDir = await makeTempDir();
    const first = await startDaemon({ dataDir, volumes: ['ok:16M', 'huge:3P'] });
    const found = await views(first);
    expect(found.get('huge')).toMatchObject({ state: 'error', error: { code: 'EFBIG' } });
    expect(found.get('ok').state).toBe('replicating');
    assertQemuOk(await qemuIo(first, 'ok/primary', ['write -P 0x11 0 4k']), 'the other volume');
    expect((await gannet(['checkpoint', ...clientFlags(first)])).stdout).toMatch(/^ok: epoch \d+\nhuge: skipped: error EFBIG/);
    expect(await readdir(join(dataDir, 'volumes'))).toEqual(['ok']);
    const viaApi = await api(first, 'POST', '/v1/volumes', { name: 'huge2', sizeBytes: '3P' });
    expect(viaApi.status).toBe(400);
    expect(viaApi.json.error.field).toBe('sizeBytes');
    expect(await readdir(join(dataDir, 'volumes'))).toEqual(['ok']);
    expect((await first.stop()).code).toBe(0);

    // What interrupted creations and purges leave is removed at start, never taken for a volume.
    await mkdir(join(dataDir, 'volumes', '.creating-x-0123456789ab'));
    await writeFile(join(dataDir, 'volumes', '.creating-x-0123456789ab', 'volume.json'), '{}');
    await mkdir(join(dataDir, 'volumes', '.purging-y-0123456789ab', 'meta'), { recursive: true });
    await cp(volumeDir(dataDir, 'ok'), volumeDir(dataDir, 'half'), { recursive: true });
    await writeFile(join(volumeDir(dataDir, 'half'), 'volume.json'), `${JSON.stringify({ name: 'half', sizeBytes: 16 * MiB, blockBytes: 4096, strategy: 'gannet', createdAt: 'now' })}\n`);
    await writeFile(join(volumeDir(dataDir, 'half'), '.creating'), '');
    const second = await startDaemon({ dataDir, volumes: [] });
    expect([...(await views(second)).keys()]).toEqual(['ok']);
    expect(await readdir(join(dataDir, 'volumes'))).toEqual(['ok']);
    assertQemuOk(await qemuIo(second, 'ok/primary', ['read -P 0x11 0 4k']), 'the other volume after restart');
    expect((await second.stop()).code).toBe(0);
  });

  it('a full disk: checkpoint answers 503 ENOSPC, `gannet checkpoint` skips that volume, and it heals once there is room', async () => {
    requireTool('qemu-io');
    const dataDir = await makeTempDir();
    const first = await startDaemon({ dataDir, volumes: ['full:64M', 'other:16M'] });
    expect((await first.stop()).code).toBe(0);
    // The volume's files move onto a 4 MiB tmpfs mounted where they were (the backing file stays sparse).
    const saved = await makeTempDir();
    const dir = volumeDir(dataDir, 'full');
    await runOk(requireTool('cp'), ['-a', '--sparse=always', `${dir}/.`, saved]);
    await rm(dir, { recursive: true });
    await mkdir(dir);
    const tmpfs = await mountTmpfs(dir, 4 * MiB);
    await runOk(requireTool('cp'), ['-a', '--sparse=always', `${saved}/.`, dir]);

    const second = await startDaemon({ dataDir, volumes: [] });
    const events = await subscribe(second, 'full');
    assertQemuOk(await qemuIo(second, 'full/primary', ['write -P 0xd4 0 8M']), 'PVM writes');
    expect((await api(second, 'POST', '/v1/volumes/full/checkpoint')).status).toBe(200);
    const error = await events.next((event) => event.event === 'error' && event.data.code === 'ENOSPC');
    expect(error.data.volume).toBe('full');
    expect((await api(second, 'GET', '/v1/volumes/full')).json).toMatchObject({ state: 'replicating', error: { code: 'ENOSPC' } });

    const refused = await api(second, 'POST', '/v1/volumes/full/checkpoint');
    expect(refused.status).toBe(503);
    expect(refused.json.error).toMatchObject({ code: 'unavailable', reason: 'ENOSPC' });
    const all = await gannet(['checkpoint', ...clientFlags(second)]);
    expect(all.status, all.stderr).toBe(0);
    expect(all.stdout).toMatch(/^other: epoch \d+$/m);
    expect(all.stdout).toMatch(/^full: skipped: error ENOSPC/m);
    expect(await metrics(second)).toMatch(/^gannet_volume_errors_total\{volume="full",code="ENOSPC"\} [1-9]/m);

    // Room again: the next checkpoint retries the flush (and is refused once more); once it is flushed, it goes.
    await tmpfs.resize(128 * MiB);
    const retried = await api(second, 'POST', '/v1/volumes/full/checkpoint');
    if (retried.status !== 200) {
      expect(retried.status).toBe(503);
      await events.next((event) => event.event === 'flushed');
      expect((await api(second, 'POST', '/v1/volumes/full/checkpoint')).status).toBe(200);
    }
    expect((await api(second, 'GET', '/v1/volumes/full')).json.error).toBeUndefined();
    assertQemuOk(await qemuIo(second, 'full/secondary', ['read -P 0xd4 0 8M']), 'the committed writes');
    await events.close();
    expect((await second.stop()).code).toBe(0);
  });

  it('a replicating volume recovered from lost metadata needs a full resync: failover is refused over torn bytes (409) unless forced', async () => {
    requireTool('qemu-io');
    const dataDir = await makeTempDir();
    const first = await startDaemon({ dataDir, volumes: ['r:16M', 'other:16M'] });
    assertQemuOk(await qemuIo(first, 'r/primary', ['write -P 0x3c 0 64k']), 'PVM writes');
    expect((await gannet(['checkpoint', 'r', ...clientFlags(first)])).status).toBe(0);
    expect((await first.stop()).code).toBe(0);
    await rm(metaStore(dataDir, 'r'), { recursive: true });

    const second = await startDaemon({ dataDir, volumes: [] });
    expect((await views(second)).get('r')).toMatchObject({ state: 'error', error: { code: 'EMETA' } });
    const recovered = await gannet(['volume', 'recover', 'r', ...clientFlags(second)]);
    expect(recovered.status, recovered.stderr).toBe(0);
    expect(recovered.stdout).toContain('r: recovered as replicating');
    expect(recovered.stdout).toContain('needs a resync');
    expect((await views(second)).get('r')).toMatchObject({ state: 'replicating', tornRanges: [{ offset: 0, length: 16 * MiB }] });

    const refused = await gannet(['failover', 'r', ...clientFlags(second)]);
    expect(refused.status).toBe(1);
    expect(refused.stderr).toMatch(/409 conflict.*16777216 bytes.*torn/);
    const viaApi = await api(second, 'POST', '/v1/volumes/r/failover', { to: 'secondary' });
    expect(viaApi.status).toBe(409);
    expect((await views(second)).get('r').state).toBe('replicating');
    const forced = await gannet(['failover', 'r', '--force', ...clientFlags(second)]);
    expect(forced.status, forced.stderr).toBe(0);
    expect((await views(second)).get('r')).toMatchObject({ state: 'failed-over', failoverTarget: 'secondary' });
    assertQemuOk(await qemuIo(second, 'r/secondary', ['read -P 0x3c 0 64k']), 'the backing file is the disk');
    expect((await second.stop()).code).toBe(0);
  });
});
