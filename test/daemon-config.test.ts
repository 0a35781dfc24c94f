/**
 * Goal: `gannet serve` validates the config file and its flags with one schema, and a bad value stops it
 * with exit status 2 and a message naming the field; the sample config in fixtures/config loads.
 *
 * Method: run the real CLI with bad files and flags and assert status and message; start it with the
 * fixture (ports and data dir overridden by flags, which must win over the file) and check the volumes.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { api, assertQemuOk, gannet, makeTempDir, repoRoot, requireTool, run, startDaemon, stopAll } from './helpers/daemon.js';

const freePorts = ['--nbd', '127.0.0.1:0', '--control', '127.0.0.1:0'];

async function serveExpectingUsageError(args: string[], field: string) {
  const dataDir = await makeTempDir();
  const result = await gannet(['serve', '--data-dir', dataDir, ...freePorts, ...args]);
  expect(result.stdout).not.toContain('gannet ready');
  expect(result.status).toBe(2);
  expect(result.stderr).toContain(field);
  return result;
}

async function configFile(name: string, text: string): Promise<string> {
  const file = join(await makeTempDir(), name);
  await writeFile(file, text);
  return file;
}

describe('gannet serve configuration', () => {
  afterEach(stopAll);

  it('exits 2 naming the field for bad config files', async () => {
    const cases: [string, string, string][] = [
      ['block.yaml', 'volumes:\n  vol0:\n    sizeBytes: 16M\n    blockBytes: 1000\n', 'volumes.vol0.blockBytes'],
      ['unknown.yaml', 'nbd:\n  listen: 127.0.0.1:0\n  lisen: 1\n', 'nbd.lisen'],
      ['strategy.json', '{"volumes":{"vol0":{"strategy":"raid5"}}}', 'volumes.vol0.strategy'],
      ['size.yaml', 'volumes:\n  vol0:\n    sizeBytes: lots\n', 'volumes.vol0.sizeBytes'],
      ['ratio.yaml', 'volumes:\n  vol0:\n    pressureRatio: 2\n', 'volumes.vol0.pressureRatio'],
      ['name.yaml', 'volumes:\n  "a/b": {}\n', 'volumes.a/b'],
      ['level.yaml', 'logLevel: loud\n', 'logLevel'],
      ['listen.yaml', 'control:\n  listen: localhost\n', 'control.listen'],
      ['connections.yaml', 'nbd:\n  connectionsMax: 0\n', 'nbd.connectionsMax'],
      ['stall.yaml', 'nbd:\n  stallTimeoutMs: 5\n', 'nbd.stallTimeoutMs'],
      ['memory.yaml', 'nbd:\n  memoryBytesMax: 8M\n', 'nbd.memoryBytesMax'],
      ['tls.yaml', 'nbd:\n  tls:\n    mode: sometimes\n', 'nbd.tls.mode'],
      ['control-cap.yaml', 'control:\n  connectionsMax: 2\n', 'control.connectionsMax'],
      ['list.yaml', '- 1\n- 2\n', '--config'],
      ['broken.json', '{"volumes": ', '--config'],
      ['member.yaml', 'volumes:\n  a: { sizeBytes: 1M }\ngroups:\n  g: [a, b]\n', 'groups.g.1: no volume "b"'],
      ['twice.yaml', 'volumes:\n  a: { sizeBytes: 1M }\ngroups:\n  g: [a, a]\n', 'groups.g.1: volume "a" is listed twice'],
      ['clash.yaml', 'volumes:\n  a: { sizeBytes: 1M }\ngroups:\n  a: [a]\n', 'groups.a: "a" is also a volume\'s name'],
    ];
    for (const [name, text, field] of cases) {
      const file = await configFile(name, text);
      const flags = name === 'listen.yaml' ? ['--nbd', '127.0.0.1:0'] : freePorts;
      const dataDir = await makeTempDir();
      const result = await gannet(['serve', '--config', file, '--data-dir', dataDir, ...flags]);
      expect({ name, status: result.status }).toEqual({ name, status: 2 });
      expect(result.stderr).toContain(field);
    }
    await serveExpectingUsageError(['--config', '/nonexistent/gannet.yaml'], '--config');
  });

  it('exits 2 naming the flag for bad flags', async () => {
    await serveExpectingUsageError(['--nbd', 'localhost'], '--nbd');
    await serveExpectingUsageError(['--control', '127.0.0.1:70000'], '--control');
    await serveExpectingUsageError(['--volume', 'vol0:12Q'], '--volume');
    await serveExpectingUsageError(['--volume', 'bad/name:1M'], 'volumes.bad/name');
    await serveExpectingUsageError(['--log-level', 'loud'], '--log-level');
    await serveExpectingUsageError(['--bogus'], '--bogus');
  });

  it('loads the sample config in fixtures/config, flags overriding the file', async () => {
    const daemon = await startDaemon({ volumes: [], args: ['--config', join(repoRoot, 'fixtures/config/gannet.yaml')] });
    const list = await api(daemon, 'GET', '/v1/volumes');
    expect(list.status).toBe(200);
    expect(list.json.volumes.map((volume: { name: string; sizeBytes: number }) => [volume.name, volume.sizeBytes])).toEqual([
      ['data', 4 * 1024 ** 3],
      ['system', 1024 ** 3],
    ]);
    expect(daemon.stdoutLines).toContain('gannet ready');
    expect(daemon.stdoutLines.some((line) => line.includes('file.export=system/primary'))).toBe(true);
    expect((await daemon.stop()).code).toBe(0);
  });

  it('also serves NBD and the control API on Unix sockets when asked', async () => {
    const qemuIoPath = requireTool('qemu-io');
    const socketDir = await makeTempDir('gannet-sock-');
    const nbdSocket = join(socketDir, 'nbd.sock');
    const controlSocket = join(socketDir, 'control.sock');
    const daemon = await startDaemon({ args: ['--nbd-socket', nbdSocket, '--control-socket', controlSocket] });
    expect(daemon.stdoutLines).toContain(`nbd: unix:${nbdSocket}`);
    expect(daemon.stdoutLines.some((line) => line.startsWith(`control: unix:${controlSocket} `))).toBe(true);
    expect(daemon.stdoutLines.some((line) => line.includes(`file.server.type=unix,file.server.path=${nbdSocket},file.export=vol0/secondary`))).toBe(true);

    const image = `driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=${nbdSocket},file.export=vol0/primary`;
    assertQemuOk(await run(qemuIoPath, ['--image-opts', image, '-c', 'write -P 0x7e 0 4096', '-c', 'read -P 0x7e 0 4096']), 'NBD over the Unix socket');
    const status = await gannet(['status', 'vol0', '--json', '--control-socket', controlSocket, '--data-dir', daemon.dataDir]);
    expect(status.status).toBe(0);
    expect(JSON.parse(status.stdout).bufferedBytes.primary).toBeGreaterThanOrEqual(4096);

    // kill -9 leaves both socket files behind; the next start must replace them, not fail.
    expect((await daemon.stop('SIGKILL')).signal).toBe('SIGKILL');
    const again = await startDaemon({ dataDir: daemon.dataDir, args: ['--nbd-socket', nbdSocket, '--control-socket', controlSocket] });
    const after = await gannet(['status', '--control-socket', controlSocket, '--data-dir', again.dataDir]);
    expect(after.status).toBe(0);
    expect((await again.stop()).code).toBe(0);
  });
});
