/**
 * Goal: the primary-host lines `gannet serve` prints make a real QEMU forward the PVM's writes to
 * NAME/primary: the quorum `-drive`, then on QMP drive_add of the replication node, x-blockdev-change,
 * and xen-set-replication, which starts replication (a replication node never started fails every write
 * with EIO, which the quorum hides from the guest).
 *
 * Method: a daemon, and qemu-system-x86_64 paused with -S (no guest runs; `-machine none` has no PCI bus
 * for the virtio disk, so it is the default PC) with the printed -drive (PVM_IMAGE a raw file) and
 * QMP on a unix socket. The printed QMP commands are sent as printed; HMP's qemu-io command writes
 * patterns to the quorum disk. qemu-io then reads them on NAME/primary, and on NAME/secondary only after
 * `gannet checkpoint`; the raw file holds them too, and QEMU reported no bad quorum child.
 */
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  assertQemuOk,
  clientFlags,
  gannet,
  makeTempDir,
  printedQemuLines,
  qemuIo,
  startDaemon,
  stopAll,
} from './helpers/daemon.js';
import { startQemu, stopAllQemu, type Qemu } from './helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const volumeSizeBytes = 64 * MiB;

interface Pattern {
  byte: number;
  offset: number;
  length: number;
}

const patterns: Pattern[] = [
  { byte: 0x5a, offset: 0, length: 64 * KiB },
  { byte: 0xa5, offset: 1 * MiB, length: 64 * KiB },
  { byte: 0x3c, offset: 63 * MiB + 60 * KiB, length: 4 * KiB },
];

const writeCommand = (p: Pattern) => `write -P 0x${p.byte.toString(16)} ${p.offset} ${p.length}`;
const readCommand = (p: Pattern) => `read -P 0x${p.byte.toString(16)} ${p.offset} ${p.length}`;

async function pausedPvm(drive: string): Promise<{ qemu: Qemu; pvmImage: string }> {
  const dir = await makeTempDir();
  const pvmImage = join(dir, 'pvm.img');
  await writeFile(pvmImage, '');
  await truncate(pvmImage, volumeSizeBytes);
  const qemu = await startQemu(
    ['-S', '-machine', 'pc,accel=tcg', '-nodefaults', '-display', 'none', '-m', '64', '-drive', drive.replace('PVM_IMAGE', pvmImage)],
    dir,
  );
  return { qemu, pvmImage };
}

/**
 * Writes through HMP's qemu-io on the quorum (the block backend named by the drive's id). HMP answers
 * with an empty string; qemu-io prints its report on QEMU's stdout, the report of a failed write too.
 */
async function quorumWrite(qemu: Qemu, pattern: Pattern): Promise<void> {
  expect(await qemu.qmp.hmp(`qemu-io colo-vol0 "${writeCommand(pattern)}"`)).toBe('');
  const report = await qemu.waitForLine(/^(wrote|write failed).*/, 10_000);
  expect(report[0]).toBe(`wrote ${pattern.length}/${pattern.length} bytes at offset ${pattern.offset}`);
}

function expectPatternsIn(bytes: Buffer, what: string): void {
  for (const p of patterns) {
    const region = bytes.subarray(p.offset, p.offset + p.length);
    expect(region.every((b) => b === p.byte), `${what}: 0x${p.byte.toString(16)} at ${p.offset}`).toBe(true);
  }
}

afterEach(stopAllQemu);
afterEach(stopAll);

describe("the PVM's printed QEMU lines, in a real qemu-system-x86_64", () => {
  it('forward quorum writes to NAME/primary, visible on NAME/secondary only after a checkpoint', async () => {
    const daemon = await startDaemon();
    const lines = printedQemuLines(daemon, 'vol0');
    expect(lines.primaryDrive).toMatch(/^if=virtio,id=colo-vol0,driver=quorum,/);
    expect(lines.primaryQmp.map((command) => command.execute)).toEqual(['human-monitor-command', 'x-blockdev-change', 'xen-set-replication']);
    expect(lines.primaryQmp.at(-1)!.arguments).toEqual({ enable: true, primary: true });

    const { qemu, pvmImage } = await pausedPvm(lines.primaryDrive);
    for (const command of lines.primaryQmp) {
      const result = await qemu.qmp.execute(command);
      // HMP reports a failed drive_add in its output, not as a QMP error.
      expect(result, JSON.stringify(command)).toEqual(command.execute === 'human-monitor-command' ? '' : {});
    }
    for (const pattern of patterns) await quorumWrite(qemu, pattern);
    expect(await qemu.qmp.hmp('qemu-io colo-vol0 "flush"')).toBe('');
    expect(qemu.qmp.events.filter((e) => e.event.startsWith('QUORUM'))).toEqual([]);

    assertQemuOk(await qemuIo(daemon, 'vol0/primary', patterns.map(readCommand)), 'NAME/primary holds the PVM writes');
    expectPatternsIn(await readFile(pvmImage), 'PVM_IMAGE');
    const zeroes = patterns.map((p) => readCommand({ ...p, byte: 0 }));
    assertQemuOk(await qemuIo(daemon, 'vol0/secondary', zeroes), 'NAME/secondary before the checkpoint');

    const checkpoint = await gannet(['checkpoint', ...clientFlags(daemon)]);
    expect(checkpoint.stderr).toBe('');
    expect(checkpoint.stdout.trim()).toBe('vol0: epoch 1');
    assertQemuOk(await qemuIo(daemon, 'vol0/secondary', patterns.map(readCommand)), 'NAME/secondary after the checkpoint');

    await qemu.qmp.execute({ execute: 'quit' });
    expect(await qemu.waitExit(10_000)).toEqual({ code: 0, signal: null });
    expect((await daemon.stop()).code).toBe(0);
  });

  it('without the last command (xen-set-replication) no write reaches NAME/primary, and QEMU says why', async () => {
    const daemon = await startDaemon();
    const lines = printedQemuLines(daemon, 'vol0');
    const { qemu, pvmImage } = await pausedPvm(lines.primaryDrive);
    for (const command of lines.primaryQmp.slice(0, -1)) await qemu.qmp.execute(command);
    await quorumWrite(qemu, patterns[0]);

    expect(qemu.qmp.events.filter((e) => e.event === 'QUORUM_REPORT_BAD').map((e) => e.data)).toEqual([
      expect.objectContaining({ 'node-name': 'gannet-vol0', type: 'write', error: 'Input/output error' }),
    ]);
    assertQemuOk(await qemuIo(daemon, 'vol0/primary', [readCommand({ ...patterns[0], byte: 0 })]), 'NAME/primary without replication');
    expect((await readFile(pvmImage)).subarray(0, patterns[0].length).every((b) => b === patterns[0].byte)).toBe(true);

    await qemu.qmp.execute({ execute: 'quit' });
    expect(await qemu.waitExit(10_000)).toEqual({ code: 0, signal: null });
    expect((await daemon.stop()).code).toBe(0);
  });
});
