/**
 * Goal: the daemon's two exports behave as the replication protocol says, seen from a real NBD client
 * (qemu-io, with the same nbd driver options the daemon prints for QEMU), driven by the real `gannet`
 * CLI, and each failover target leaves exactly the expected bytes in the backing file.
 *
 * Method: per failover target, a fresh daemon; qemu-io writes pattern A through vol0/primary and B
 * through vol0/secondary; each side reads its own; `gannet checkpoint`; the secondary now reads A; more
 * writes on both sides; `gannet failover --to TARGET`; then vol0/secondary, the refused primary writes,
 * and finally (after SIGTERM) DATA_DIR/volumes/vol0/disk.img itself are compared with a model.
 */
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
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

const MiB = 1024 * 1024;
const volumeSizeBytes = 64 * MiB;

const A = 0xaa; // primary, epoch 0, [0, 64K)
const B = 0xbb; // secondary, epoch 0, [0, 64K)
const C = 0xcc; // primary, epoch 1, [1M, 1M+64K)
const D = 0xdd; // secondary, epoch 1, [2M, 2M+64K)
const E = 0xee; // secondary, epoch 1, [0, 4K): over committed A

interface Write {
  offset: number;
  length: number;
  pattern: number;
}

const committed: Write[] = [{ offset: 0, length: 64 * 1024, pattern: A }];
const primaryEpoch1: Write[] = [{ offset: 1 * MiB, length: 64 * 1024, pattern: C }];
const secondaryEpoch1: Write[] = [
  { offset: 2 * MiB, length: 64 * 1024, pattern: D },
  { offset: 0, length: 4 * 1024, pattern: E },
];

type Target = 'secondary' | 'checkpoint' | 'primary';

/** The disk after failover: the checkpoint, plus the surviving side's writes of the open epoch. */
function expectedDisk(target: Target): Buffer {
  const disk = Buffer.alloc(volumeSizeBytes);
  const survivors = target === 'secondary' ? secondaryEpoch1 : target === 'primary' ? primaryEpoch1 : [];
  for (const write of [...committed, ...survivors]) disk.fill(write.pattern, write.offset, write.offset + write.length);
  return disk;
}

function firstDifference(actual: Buffer, expected: Buffer): string {
  for (let offset = 0; offset < expected.length; offset++) {
    if (actual[offset] !== expected[offset]) return `offset ${offset}: got 0x${actual[offset]?.toString(16)}, expected 0x${expected[offset].toString(16)}`;
  }
  return 'lengths differ';
}

const writeCommand = (write: Write) => `write -P 0x${write.pattern.toString(16)} ${write.offset} ${write.length}`;
const readCommand = (write: Write) => `read -P 0x${write.pattern.toString(16)} ${write.offset} ${write.length}`;

async function expectReads(daemon: DaemonHandle, exportName: string, reads: Write[], what: string) {
  assertQemuOk(await qemuIo(daemon, exportName, reads.map(readCommand)), what);
}

describe('gannet daemon end to end with qemu-io and the gannet CLI', () => {
  afterEach(stopAll);

  it('a pattern check fails on the wrong bytes (the reads below can fail)', async () => {
    requireTool('qemu-io');
    const daemon = await startDaemon();
    assertQemuOk(await qemuIo(daemon, 'vol0/primary', [writeCommand(committed[0])]), 'write A');
    const wrong = await qemuIo(daemon, 'vol0/secondary', [readCommand(committed[0])]);
    expect(() => assertQemuOk(wrong, 'secondary must not see A before a checkpoint')).toThrow(/Pattern verification failed/);
    expect((await daemon.stop()).code).toBe(0);
  });

  it.each(['secondary', 'checkpoint', 'primary'] as const)('failover --to %s leaves the expected bytes', async (target) => {
    requireTool('qemu-io');
    const daemon = await startDaemon();

    assertQemuOk(await qemuIo(daemon, 'vol0/primary', [writeCommand(committed[0])]), 'primary writes A');
    assertQemuOk(await qemuIo(daemon, 'vol0/secondary', [writeCommand({ offset: 0, length: 64 * 1024, pattern: B })]), 'secondary writes B');
    await expectReads(daemon, 'vol0/secondary', [{ offset: 0, length: 64 * 1024, pattern: B }], 'secondary reads its own B');
    await expectReads(daemon, 'vol0/primary', committed, 'primary reads its own A');

    const checkpoint = await gannet(['checkpoint', ...clientFlags(daemon)]);
    expect(checkpoint.stderr).toBe('');
    expect(checkpoint.status).toBe(0);
    expect(checkpoint.stdout.trim()).toBe('vol0: epoch 1');
    await expectReads(daemon, 'vol0/secondary', committed, 'after the checkpoint the secondary reads A');

    assertQemuOk(await qemuIo(daemon, 'vol0/primary', primaryEpoch1.map(writeCommand)), 'primary writes C');
    assertQemuOk(await qemuIo(daemon, 'vol0/secondary', secondaryEpoch1.map(writeCommand)), 'secondary writes D, E');
    await expectReads(daemon, 'vol0/primary', [...committed, ...primaryEpoch1, { offset: 2 * MiB, length: 64 * 1024, pattern: 0 }], 'primary view');

    const failover = await gannet(['failover', 'vol0', '--to', target, ...clientFlags(daemon)]);
    expect(failover.stderr).toBe('');
    expect(failover.status).toBe(0);
    expect(failover.stdout).toContain(`failed over to ${target}`);

    // After failover vol0/secondary is the disk: the model's bytes, read back through NBD.
    const disk = expectedDisk(target);
    const probes: Write[] = [0, 4096, 1 * MiB, 2 * MiB, 3 * MiB].map((offset) => ({ offset, length: 4096, pattern: disk[offset] }));
    await expectReads(daemon, 'vol0/secondary', probes, `secondary after failover to ${target}`);
    const refused = await qemuIo(daemon, 'vol0/primary', ['write -P 0x11 8M 4096']);
    expect(refused.stdout + refused.stderr).toMatch(/Permission denied|Operation not permitted/i);

    // The same failover again answers as the first did; another target is refused.
    const again = await gannet(['failover', 'vol0', '--to', target, ...clientFlags(daemon)]);
    expect(again.status, again.stderr).toBe(0);
    expect(again.stdout).toContain(`failed over to ${target}`);
    const other = target === 'secondary' ? 'primary' : 'secondary';
    const refusedTarget = await gannet(['failover', 'vol0', '--to', other, ...clientFlags(daemon)]);
    expect(refusedTarget.status).toBe(1);
    expect(refusedTarget.stderr).toMatch(new RegExp(`409 conflict.*already failed over to ${target}`));
    const late = await gannet(['checkpoint', 'vol0', ...clientFlags(daemon)]);
    expect(late.status).toBe(1);
    expect(late.stderr).toMatch(/409 conflict/);

    expect((await daemon.stop('SIGTERM')).code).toBe(0);
    const backing = await readFile(join(daemon.dataDir, 'volumes/vol0/disk.img'));
    expect(backing.length).toBe(volumeSizeBytes);
    if (!backing.equals(disk)) expect.fail(`disk.img after failover to ${target}: ${firstDifference(backing, disk)}`);
  });

  it("the printed QEMU lines are options QEMU's block layer accepts, pointing at the exports", async () => {
    const qemuIoPath = requireTool('qemu-io');
    const daemon = await startDaemon();
    const lines = daemon.stdoutLines.map((line) => line.trim());
    const driveOptions = (line: string) =>
      line
        .replace(/^-drive /, '')
        .split(',')
        .filter((option) => !/^(if|id|cache)=/.test(option));

    // The SVM's disk: the secondary export itself.
    const secondary = lines.find((line) => line.startsWith('-drive') && line.includes('file.export=vol0/secondary'));
    expect(secondary).toBeDefined();
    const secondaryImage = driveOptions(secondary!).join(',');
    assertQemuOk(await run(qemuIoPath, ['--image-opts', secondaryImage, '-c', 'write -P 0x3c 0 4096']), 'SVM drive line');
    await expectReads(daemon, 'vol0/secondary', [{ offset: 0, length: 4096, pattern: 0x3c }], 'written through the SVM line');

    // The PVM's disk: the quorum, with the replication child that QMP's drive_add would attach. Only
    // reads: a replication child writes once replication is started, which test/qemu-primary.test.ts
    // does in a real QEMU.
    const pvmImage = join(await makeTempDir(), 'pvm.img');
    await writeFile(pvmImage, '');
    await truncate(pvmImage, volumeSizeBytes);
    const quorum = lines.find((line) => line.startsWith('-drive') && line.includes('driver=quorum'));
    const driveAdd = lines
      .filter((line) => line.startsWith('{'))
      .map((line) => JSON.parse(line) as { execute: string; arguments: Record<string, string> })
      .find((command) => command.execute === 'human-monitor-command');
    expect(quorum).toBeDefined();
    expect(driveAdd).toBeDefined();
    const child = driveAdd!.arguments['command-line']
      .replace(/^drive_add -n buddy /, '')
      .split(',')
      .filter((option) => !option.startsWith('node-name='))
      .map((option) => `children.1.${option}`);
    expect(child).toContain('children.1.file.export=vol0/primary');
    const pvm = [...driveOptions(quorum!.replace('PVM_IMAGE', pvmImage)), ...child].join(',');
    assertQemuOk(await run(qemuIoPath, ['--image-opts', pvm, '-c', 'read -P 0 0 4096']), 'PVM quorum line with the replication child');
    expect((await daemon.stop()).code).toBe(0);
  });
});
