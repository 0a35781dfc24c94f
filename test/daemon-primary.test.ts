/**
 * Goal: `gannet serve --role primary` alone, its peer unreachable: the config refuses a primary without
 * its peer (exit 2, field named); each volume is the one export NAME, whose writes succeed and read back
 * while the peer is away (the VM never sees the peer's trouble); the control API, the CLI, /metrics and
 * the events show the primary's state (degraded, link down, dirty bytes); a checkpoint without a peer is
 * refused 503 EPEER, the secondary's operations 409; and a data directory's volumes are never opened by
 * a daemon of the other role.
 *
 * Method: real daemons on free loopback ports, the peer a closed port; qemu-io on the export; state read
 * through the API, `gannet status --json` and /metrics. Two daemons replicating: daemon-replication.test.ts.
 */
import { writeFile } from 'node:fs/promises';
import { dirname as dirOf, join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  api,
  assertQemuOk,
  clientFlags,
  gannet,
  listedExports,
  makeTempDir,
  qemuIo,
  repoRoot,
  requireTool,
  startDaemon,
  stopAll,
} from './helpers/daemon.js';

const MiB = 1024 * 1024;
/** Nothing listens on port 1 of loopback: every connection to the peer is refused at once. */
const deadPeer = '127.0.0.1:1';

async function peerTokenFile(): Promise<string> {
  const file = join(await makeTempDir(), 'peer.token');
  await writeFile(file, `${'ab'.repeat(32)}\n`);
  return file;
}

async function primaryArgs(): Promise<string[]> {
  return ['--role', 'primary', '--peer', deadPeer, '--peer-token-file', await peerTokenFile()];
}

async function usageError(args: string[], field: string): Promise<void> {
  const dataDir = await makeTempDir();
  const result = await gannet(['serve', '--data-dir', dataDir, '--nbd', '127.0.0.1:0', '--control', '127.0.0.1:0', ...args]);
  expect(result.stdout).not.toContain('gannet ready');
  expect({ status: result.status, field }).toEqual({ status: 2, field });
  expect(result.stderr).toContain(field);
}

describe('gannet serve --role primary', () => {
  afterEach(stopAll);

  it('exits 2 naming the field for a primary without its peer, or a bad setting', async () => {
    const token = await peerTokenFile();
    await usageError(['--role', 'primary'], 'peer: required with role primary');
    await usageError(['--role', 'primary', '--peer', deadPeer], 'peer.tokenFile: required');
    await usageError(['--role', 'primary', '--peer-token-file', token], 'peer.control: required');
    await usageError(['--role', 'primary', '--peer', 'nowhere', '--peer-token-file', token], '--peer: expected HOST:PORT');
    await usageError(['--role', 'primary', '--peer', deadPeer, '--peer-token-file', '/nonexistent/token'], 'peer.tokenFile: cannot read /nonexistent/token');
    await usageError(['--role', 'leader'], '--role');
    await usageError([...(await primaryArgs()), '--peer-tls-certificates', '/nonexistent'], 'peer.tls.certificates: cannot read /nonexistent/ca-cert.pem');
    await usageError([...(await primaryArgs()), '--peer-tls-psk', token], 'peer.tls.psk');
    await usageError([...(await primaryArgs()), '--peer-tls-psk', token, '--peer-tls-certificates', dirOf(token)], '--peer-tls-certificates: give either');
    const dir = await makeTempDir();
    const cases: [string, string][] = [
      ['volumes:\n  a: { sizeBytes: 16M, blockBytes: 1000 }\n', 'volumes.a.blockBytes'],
      ['volumes:\n  a: { ackMode: sometimes }\n', 'volumes.a.ackMode'],
      ['volumes:\n  a: { peerTimeoutMs: 1 }\n', 'volumes.a.peerTimeoutMs'],
      ['volumes:\n  a: { peerReconnectMs: 2000, peerReconnectMsMax: 1000 }\n', 'volumes.a.peerReconnectMsMax'],
      ['volumes:\n  a: { forwardBytesMax: lots }\n', 'volumes.a.forwardBytesMax'],
      ['volumes:\n  a: { sizeBytes: 1M }\ngroups:\n  g: [a]\n', 'groups: not a setting of role primary'],
    ];
    for (const [index, [text, field]] of cases.entries()) {
      const file = join(dir, `primary-${index}.yaml`);
      await writeFile(file, `role: primary\npeer: { control: "${deadPeer}", tokenFile: ${token} }\n${text}`);
      await usageError(['--config', file], field);
    }
    const secondary = join(dir, 'secondary.yaml');
    await writeFile(secondary, 'volumes:\n  a: { ackMode: sometimes }\n');
    await usageError(['--config', secondary], 'volumes.a.ackMode');
  });

  it('serves each volume as export NAME, writes succeed while the peer is away, and the API shows why', async () => {
    requireTool('qemu-io');
    const daemon = await startDaemon({ volumes: ['vm:16M'], args: await primaryArgs() });
    expect(await listedExports(daemon)).toEqual(['vm']);
    expect(daemon.stdoutLines.some((line) => /^volume vm: 16 MiB, role primary, degraded, ack mode peer, peer 127\.0\.0\.1:1/.test(line))).toBe(true);

    // The VM's writes are acknowledged by the local disk alone while the peer is away, and read back.
    assertQemuOk(await qemuIo(daemon, 'vm', ['write -P 0x5a 0 1M', 'write -z 4M 1M', 'flush']), 'writes while degraded');
    assertQemuOk(await qemuIo(daemon, 'vm', ['read -P 0x5a 0 1M', 'read -P 0 4M 1M']), 'reads back');

    const view = await api(daemon, 'GET', '/v1/volumes/vm');
    expect(view.status).toBe(200);
    expect(view.json).toMatchObject({
      name: 'vm',
      role: 'primary',
      exports: { disk: 'vm' },
      uris: { disk: [`nbd://${daemon.nbd.host}:${daemon.nbd.port}/vm`] },
      state: 'degraded',
      sizeBytes: 16 * MiB,
      ackMode: 'peer',
      link: { peer: deadPeer },
      inflightBytes: 0,
      peerEpoch: null,
      peerDurableEpoch: null,
    });
    expect(['connecting', 'down']).toContain(view.json.link.state);
    // Everything written while the peer is away waits for a resync: 1 MiB of data and 1 MiB of zeroes.
    expect(view.json.unsentBytes).toBe(2 * MiB);
    expect(view.json.dirtyBytes).toBe(2 * MiB);

    const status = await gannet(['status', ...clientFlags(daemon)]);
    expect(status.status).toBe(0);
    expect(status.stdout).toMatch(/^VOLUME\s+STATE\s+LINK\s+ACK/);
    expect(status.stdout).toMatch(/\nvm\s+degraded\s+\S+\s+peer\s/);

    const checkpoint = await api(daemon, 'POST', '/v1/volumes/vm/checkpoint');
    expect(checkpoint.status).toBe(503);
    expect(checkpoint.json.error).toMatchObject({ code: 'unavailable', reason: 'EPEER' });
    const cli = await gannet(['checkpoint', 'vm', ...clientFlags(daemon)]);
    expect(cli.status).toBe(1);
    expect(cli.stderr).toContain('503');
    // With no names, a degraded volume is left out, and says why.
    const all = await api(daemon, 'POST', '/v1/checkpoint', {});
    expect(all.status).toBe(200);
    expect(all.json).toEqual({ volumes: [], skipped: [{ name: 'vm', reason: 'degraded' }] });

    for (const [path, body] of [
      ['/v1/volumes/vm/failover', { to: 'secondary' }],
      ['/v1/volumes/vm/recover', undefined],
    ] as const) {
      const refused = await api(daemon, 'POST', path, body);
      expect(refused.status).toBe(409);
      expect(refused.json.error.message).toContain('volume vm runs role primary here');
    }
    expect((await api(daemon, 'GET', '/v1/groups')).json).toEqual({ groups: [] });

    const metrics = (await api(daemon, 'GET', '/metrics')).text;
    expect(metrics).toContain('gannet_primary_link_up{volume="vm"} 0');
    expect(metrics).toContain(`gannet_primary_dirty_bytes{volume="vm"} ${2 * MiB}`);
    expect(metrics).toContain(`gannet_primary_unsent_bytes{volume="vm"} ${2 * MiB}`);
    expect(metrics).toContain('gannet_primary_state{volume="vm",state="degraded"} 1');
    expect(metrics).toContain('gannet_primary_inflight_bytes{volume="vm"} 0');
    expect(metrics).not.toMatch(/gannet_primary_peer_epoch\{/);
    expect((await daemon.stop()).code).toBe(0);
  });

  it('creates and deletes primary volumes through the API', async () => {
    const daemon = await startDaemon({ volumes: ['vm:16M'], args: await primaryArgs() });
    const refused = await api(daemon, 'POST', '/v1/volumes', { name: 'data', sizeBytes: '8M', strategy: 'colo' });
    expect(refused.status).toBe(400);
    expect(refused.json.error).toMatchObject({ field: 'strategy' });
    const created = await api(daemon, 'POST', '/v1/volumes', { name: 'data', sizeBytes: '8M', ackMode: 'local' });
    expect(created.status).toBe(201);
    expect(created.json).toMatchObject({ name: 'data', role: 'primary', ackMode: 'local', sizeBytes: 8 * MiB, exports: { disk: 'data' } });
    expect(await listedExports(daemon)).toEqual(['data', 'vm']);
    // Never replicated, it holds nothing the peer lacks: deleted without force.
    const removed = await api(daemon, 'DELETE', '/v1/volumes/data?purge=true');
    expect(removed.status).toBe(200);
    expect(removed.json).toEqual({ name: 'data', purged: true });
    expect(await listedExports(daemon)).toEqual(['vm']);
  });

  it('serves each volume in the role its volume.json records, whatever the daemon\'s default role', async () => {
    const dataDir = await makeTempDir();
    const secondary = await startDaemon({ dataDir, volumes: ['old:16M'] });
    expect((await secondary.stop()).code).toBe(0);

    const primary = await startDaemon({ dataDir, volumes: ['vm:16M'], args: await primaryArgs() });
    expect((await api(primary, 'GET', '/v1/volumes/old')).json).toMatchObject({ role: 'secondary', state: 'replicating' });
    expect((await api(primary, 'GET', '/v1/volumes/vm')).json).toMatchObject({ role: 'primary', state: 'degraded' });
    expect(await listedExports(primary)).toEqual(['old/primary', 'old/secondary', 'vm']);
    const metrics = (await api(primary, 'GET', '/metrics')).text;
    expect(metrics).toContain('gannet_volume_role{volume="old",role="secondary"} 1');
    expect(metrics).toContain('gannet_volume_role{volume="vm",role="primary"} 1');
    // A name is one volume, whichever role it has.
    expect((await api(primary, 'POST', '/v1/volumes', { name: 'old', sizeBytes: '8M' })).status).toBe(409);
    const status = await gannet(['status', ...clientFlags(primary)]);
    expect(status.stdout).toMatch(/^VOLUME\s+STRATEGY\s+STATE[^\n]*\nold\s+gannet\s+replicating/);
    expect(status.stdout).toMatch(/\n\nVOLUME\s+STATE\s+LINK[^\n]*\nvm\s+degraded/);
    expect((await primary.stop()).code).toBe(0);

    // Without a peer, a primary volume cannot replicate: it is shown in error, the others are served.
    const again = await startDaemon({ dataDir, volumes: [] });
    const vm = await api(again, 'GET', '/v1/volumes/vm');
    expect(vm.json).toMatchObject({ role: 'primary', state: 'error' });
    expect(vm.json.error.message).toContain('the daemon needs its peer (--peer HOST:PORT --peer-token-file FILE)');
    expect((await api(again, 'GET', '/v1/volumes/old')).json).toMatchObject({ role: 'secondary', state: 'replicating' });
    expect(await listedExports(again)).toEqual(['old/primary', 'old/secondary']);
  });

  it('loads the sample primary config in fixtures/config', async () => {
    const token = await peerTokenFile();
    const daemon = await startDaemon({
      volumes: [],
      args: ['--config', join(repoRoot, 'fixtures/config/gannet-primary.yaml'), '--peer', deadPeer, '--peer-token-file', token],
    });
    const list = await api(daemon, 'GET', '/v1/volumes');
    expect(list.json.volumes.map((volume: { name: string; ackMode: string; sizeBytes: number }) => [volume.name, volume.ackMode, volume.sizeBytes])).toEqual([
      ['data', 'local', 4 * 1024 * MiB],
      ['system', 'peer', 1024 * MiB],
    ]);
  });
});
