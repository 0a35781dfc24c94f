/**
 * Goal: a restart after SIGTERM, and after kill -9, serves the same volumes in the same state with the
 * same bytes: the checkpointed data, epochs that never go back, a failover that stays done, and writes
 * acknowledged on vol0/secondary after failover (followed by a FLUSH) that survive SIGKILL.
 *
 * Method: one data directory, three daemons in turn; state read through the control API (`gannet status
 * --json`), bytes through qemu-io and from the backing file itself.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { assertQemuOk, clientFlags, gannet, makeTempDir, qemuIo, requireTool, startDaemon, stopAll, type DaemonHandle } from './helpers/daemon.js';

const chunkBytes = 64 * 1024;

async function status(daemon: DaemonHandle) {
  const result = await gannet(['status', 'vol0', '--json', ...clientFlags(daemon)]);
  expect(result.stderr).toBe('');
  expect(result.status).toBe(0);
  return JSON.parse(result.stdout) as { state: string; epoch: number; durableEpoch: number; failoverTarget?: string; sizeBytes: number };
}

describe('gannet daemon restarts', () => {
  afterEach(stopAll);

  it('keeps volumes, epochs, failover and acknowledged bytes across SIGTERM and kill -9', async () => {
    requireTool('qemu-io');
    const dataDir = await makeTempDir();

    const first = await startDaemon({ dataDir });
    assertQemuOk(await qemuIo(first, 'vol0/primary', [`write -P 0xa1 0 ${chunkBytes}`]), 'primary writes');
    for (let round = 0; round < 2; round++) {
      expect((await gannet(['checkpoint', ...clientFlags(first)])).status).toBe(0);
    }
    const before = await status(first);
    expect(before.epoch).toBe(2);
    expect((await first.stop('SIGTERM')).code).toBe(0);
    expect(first.stderr()).not.toMatch(/"level":(50|60)/);

    // Restarted with no --volume at all: the registry in the data dir brings vol0 back at its size.
    const second = await startDaemon({ dataDir, volumes: [] });
    const afterTerm = await status(second);
    expect(afterTerm.sizeBytes).toBe(64 * 1024 * 1024);
    expect(afterTerm.state).toBe('replicating');
    expect(afterTerm.epoch).toBeGreaterThanOrEqual(before.epoch);
    expect(afterTerm.durableEpoch).toBeGreaterThanOrEqual(before.durableEpoch);
    assertQemuOk(await qemuIo(second, 'vol0/secondary', [`read -P 0xa1 0 ${chunkBytes}`]), 'checkpointed bytes after SIGTERM');

    expect((await gannet(['failover', 'vol0', '--to', 'secondary', ...clientFlags(second)])).status).toBe(0);
    assertQemuOk(await qemuIo(second, 'vol0/secondary', [`write -P 0xb2 1M ${chunkBytes}`, 'flush']), 'secondary writes after failover');
    const failedOver = await status(second);
    expect(failedOver.state).toBe('failed-over');
    expect((await second.stop('SIGKILL')).signal).toBe('SIGKILL');

    const third = await startDaemon({ dataDir, volumes: ['vol0:64M'] });
    const afterKill = await status(third);
    expect(afterKill.state).toBe('failed-over');
    expect(afterKill.failoverTarget).toBe('secondary');
    expect(afterKill.epoch).toBeGreaterThanOrEqual(failedOver.epoch);
    assertQemuOk(
      await qemuIo(third, 'vol0/secondary', [`read -P 0xa1 0 ${chunkBytes}`, `read -P 0xb2 1M ${chunkBytes}`]),
      'bytes after kill -9',
    );
    const refused = await qemuIo(third, 'vol0/primary', ['write -P 0x11 2M 4096']);
    expect(refused.stdout + refused.stderr).toMatch(/Permission denied|Operation not permitted/i);
    // Checkpointing every volume leaves the failed-over one out, and says so; by name it is refused.
    const late = await gannet(['checkpoint', ...clientFlags(third)]);
    expect(late.status).toBe(0);
    expect(late.stdout).toBe('vol0: skipped: failed-over (to secondary)\n');
    expect((await gannet(['checkpoint', 'vol0', ...clientFlags(third)])).status).toBe(1);
    expect((await third.stop('SIGTERM')).code).toBe(0);

    const backing = await readFile(join(dataDir, 'volumes/vol0/disk.img'));
    expect(backing.subarray(0, chunkBytes).every((byte) => byte === 0xa1)).toBe(true);
    expect(backing.subarray(1024 * 1024, 1024 * 1024 + chunkBytes).every((byte) => byte === 0xb2)).toBe(true);
    expect(backing.subarray(2 * 1024 * 1024, 2 * 1024 * 1024 + 4096).every((byte) => byte === 0)).toBe(true);
  });

  it('refuses to restart a volume with a different size, naming the field', async () => {
    const dataDir = await makeTempDir();
    const daemon = await startDaemon({ dataDir, volumes: ['vol0:16M'] });
    expect((await daemon.stop()).code).toBe(0);
    const result = await gannet(['serve', '--data-dir', dataDir, '--nbd', '127.0.0.1:0', '--control', '127.0.0.1:0', '--volume', 'vol0:32M']);
    expect(result.status).toBe(2);
    expect(result.stderr).toContain('volumes.vol0.sizeBytes');
  });
});
