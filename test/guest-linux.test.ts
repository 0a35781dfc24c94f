/**
 * Goal: a Linux guest runs an ext4 workload on gannet's exports through the QEMU lines `gannet serve`
 * prints, and the replication rules hold for a real filesystem: the SVM's writes are gone after a
 * checkpoint; a workload on the PVM's quorum survives a checkpoint every second and a failover to the
 * secondary mid-run; after the guest powers off the backing file passes `e2fsck -fn` and holds every
 * file with the checksum the guest reported.
 *
 * Method: one guest under QEMU with TCG (kernel, busybox-static and modules from Debian packages,
 * test/helpers/guest.ts; its /init is test/guest/init) and one daemon with two volumes, each seeded with
 * ext4 through NBD and a checkpoint:
 * - "scratch" is the SVM's disk, the printed secondary -drive. The guest writes files on it; the host
 *   finds them on scratch/secondary, checkpoints, and then scratch/secondary is the seed again, byte for
 *   byte, and the remounted filesystem in the guest has only the seed's files.
 * - "vm" is the PVM's quorum disk, the printed primary -drive with PVM_IMAGE a local raw file, set up
 *   with the printed QMP commands while QEMU is paused (-S). The quorum has one more child, vm/secondary,
 *   standing in for an SVM that runs in lockstep with the PVM and so writes the same bytes: that keeps
 *   NAME/secondary a consistent disk, which is what failover --to secondary keeps. The host checkpoints
 *   every second as COLO does, with the VM paused (QMP stop drains its I/O, so no write is half in one
 *   epoch on one export and in the next on the other), then fails over mid-workload, and the guest
 *   writes on through the failed-over volume until it powers off.
 * Only one guest boots: a second one (an SVM) would double the TCG time on the 2-core CI machine.
 */
import { createHash } from 'node:crypto';
import { copyFile, mkdir, readdir, readFile, truncate, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  api,
  clientFlags,
  gannet,
  makeTempDir,
  printedQemuLines,
  startDaemon,
  stopAll,
  type DaemonHandle,
} from './helpers/daemon.js';
import { guestPieces, type GuestPieces } from './helpers/guest.js';
import { describeResult, requireTool, runCommand, runOk } from './helpers/process.js';
import { startQemu, stopAllQemu, type Qemu } from './helpers/qemu.js';

const MiB = 1024 * 1024;
const vmSizeBytes = 64 * MiB;
const scratchSizeBytes = 32 * MiB;
/** Checkpoints taken while the workload runs, one a second, before the failover. */
const checkpointsBeforeFailover = 6;
const checkpointIntervalMs = 1000;
const bootTimeoutMs = 60_000;
const stepTimeoutMs = 30_000;
const workloadTimeoutMs = 90_000;
const testTimeoutMs = 240_000;

let pieces: GuestPieces;

beforeAll(async () => {
  for (const tool of ['qemu-system-x86_64', 'mkfs.ext4', 'e2fsck', 'debugfs', 'nbdcopy']) requireTool(tool);
  pieces = await guestPieces(await readFile(new URL('./guest/init', import.meta.url), 'utf8'));
});
afterAll(async () => {
  await stopAllQemu();
  await stopAll();
});

function nbdUri(daemon: DaemonHandle, exportName: string): string {
  return `nbd://${daemon.nbd.host}:${daemon.nbd.port}/${encodeURIComponent(exportName)}`;
}

/** An ext4 image of `sizeBytes` labelled `label`, holding the file `seed`. */
async function ext4Seed(dir: string, label: string, sizeBytes: number): Promise<string> {
  const content = join(dir, `${label}-content`);
  await mkdir(content);
  await writeFile(join(content, 'seed'), `seeded by ${label}\n`);
  const image = join(dir, `${label}-seed.img`);
  await writeFile(image, '');
  await truncate(image, sizeBytes);
  await runOk(requireTool('mkfs.ext4'), ['-F', '-q', '-L', label, '-d', content, image]);
  return image;
}

/** Copies an export into a local file (the host-side view of what a client of it reads). */
async function exportToFile(daemon: DaemonHandle, exportName: string, file: string): Promise<Buffer> {
  await runOk(requireTool('nbdcopy'), [nbdUri(daemon, exportName), file]);
  return readFile(file);
}

/** sha256 of every regular file in directory `path` of the ext4 image, read by debugfs (no kernel mount). */
async function filesIn(image: string, path: string, out: string): Promise<Map<string, string>> {
  await mkdir(out, { recursive: true });
  await runOk(requireTool('debugfs'), ['-R', `rdump ${path} ${out}`, image]);
  // rdump puts a directory's contents under its name, and the root's directly in `out`.
  const dir = path === '/' ? out : join(out, basename(path));
  const result = new Map<string, string>();
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    if (entry.isFile()) result.set(entry.name, createHash('sha256').update(await readFile(join(dir, entry.name))).digest('hex'));
  }
  return result;
}

/** The guest's reports so far (its `gannet-guest: ` lines, without the prefix). */
function guestLines(qemu: Qemu): string[] {
  const prefix = 'gannet-guest: ';
  return qemu
    .console()
    .split('\n')
    .map((line) => line.replace(/\r$/, ''))
    .filter((line) => line.startsWith(prefix))
    .map((line) => line.slice(prefix.length));
}

/** `sha256  /mnt/x/name` lines with `prefix` → name → sha256, the last line for a name winning. */
function sums(lines: string[], prefix: RegExp): Map<string, string> {
  const result = new Map<string, string>();
  for (const line of lines) {
    const match = new RegExp(`^${prefix.source}([0-9a-f]{64})  \\S*/([^/\\s]+)$`).exec(line);
    if (match) result.set(match[2], match[1]);
  }
  return result;
}

function lastIteration(qemu: Qemu): number {
  let last = 0;
  for (const line of guestLines(qemu)) {
    const match = /^sum (\d+) /.exec(line);
    if (match) last = Number(match[1]);
  }
  return last;
}

describe('a Linux guest on gannet (QEMU, TCG)', () => {
  it(
    'loses the SVM writes at a checkpoint, and keeps an ext4 workload whole through checkpoints and failover',
    async () => {
      const started = Date.now();
      const dir = await makeTempDir('gannet-guest-');
      const vmSeed = await ext4Seed(dir, 'vm', vmSizeBytes);
      const scratchSeed = await ext4Seed(dir, 'scratch', scratchSizeBytes);
      const daemon = await startDaemon({ volumes: [`vm:${vmSizeBytes / MiB}M`, `scratch:${scratchSizeBytes / MiB}M`] });
      for (const [volume, seed] of [['vm', vmSeed], ['scratch', scratchSeed]]) {
        await runOk(requireTool('nbdcopy'), [seed, nbdUri(daemon, `${volume}/primary`)]);
      }
      const seeded = await gannet(['checkpoint', ...clientFlags(daemon)]);
      expect(seeded.stdout.split('\n').sort().join(' ').trim()).toBe('scratch: epoch 1 vm: epoch 1');
      const pvmImage = join(dir, 'pvm.img');
      await copyFile(vmSeed, pvmImage);

      const vmLines = printedQemuLines(daemon, 'vm');
      const scratchLines = printedQemuLines(daemon, 'scratch');
      const svmChild = vmLines.secondaryDrive
        .split(',')
        .filter((option) => !/^(if|id|cache)=/.test(option))
        .map((option) => `children.1.${option}`);
      const kernelConsole = join(dir, 'kernel-console.log');
      const qemu = await startQemu(
        [
          '-S',
          '-machine', 'pc,accel=tcg',
          '-m', '256',
          '-nodefaults',
          '-display', 'none',
          // ttyS0, the kernel's console, goes to a file; ttyS1, the guest's reports, to stdio.
          '-serial', `file:${kernelConsole}`,
          '-serial', 'stdio',
          '-no-reboot',
          '-kernel', pieces.kernel,
          '-initrd', pieces.initramfs,
          '-append', 'console=ttyS0 quiet panic=-1',
          '-drive', [vmLines.primaryDrive.replace('PVM_IMAGE', pvmImage), ...svmChild].join(','),
          '-drive', scratchLines.secondaryDrive,
        ],
        dir,
        { logFiles: [kernelConsole] },
      );
      for (const command of vmLines.primaryQmp) await qemu.qmp.execute(command);
      await qemu.qmp.execute({ execute: 'cont' });
      expect((await qemu.waitForLine(/gannet-guest: ready (\S+)/, bootTimeoutMs))[1]).toBe(pieces.release);
      const bootedMs = Date.now() - started;

      // Phase 1: the SVM's writes reach scratch/secondary, and a checkpoint drops them.
      await qemu.waitForLine(/gannet-guest: svm-wrote/, stepTimeoutMs);
      const svmSums = sums(guestLines(qemu), /svm-sum /);
      expect([...svmSums.keys()].sort()).toEqual(['svm1', 'svm2', 'svm3', 'svm4']);
      await exportToFile(daemon, 'scratch/secondary', join(dir, 'svm-before.img'));
      const before = await filesIn(join(dir, 'svm-before.img'), '/', join(dir, 'svm-before'));
      for (const [name, sum] of svmSums) expect(before.get(name), `${name} on scratch/secondary`).toBe(sum);
      const checkpoint = await gannet(['checkpoint', 'scratch', ...clientFlags(daemon)]);
      expect(checkpoint.stdout.trim()).toBe('scratch: epoch 2');
      const after = await exportToFile(daemon, 'scratch/secondary', join(dir, 'svm-after.img'));
      expect(after.equals(await readFile(scratchSeed)), 'scratch/secondary is the seed again').toBe(true);
      qemu.typeLine('checkpointed');
      const left = await qemu.waitForLine(/gannet-guest: svm-after-checkpoint (.*)$/, stepTimeoutMs);
      expect(left[1].trim()).toBe('lost+found seed');

      // Phase 2: the PVM's workload under a checkpoint a second, then failover.
      await qemu.waitForLine(/gannet-guest: workload-start/, stepTimeoutMs);
      const iterationsAtCheckpoint: number[] = [];
      for (let n = 0; n < checkpointsBeforeFailover; n++) {
        await delay(checkpointIntervalMs);
        await qemu.qmp.execute({ execute: 'stop' });
        const response = await api(daemon, 'POST', '/v1/volumes/vm/checkpoint');
        expect(response.status, response.text).toBe(200);
        expect(response.json.epoch).toBe(2 + n);
        await qemu.qmp.execute({ execute: 'cont' });
        iterationsAtCheckpoint.push(lastIteration(qemu));
      }
      const failover = await gannet(['failover', 'vm', '--to', 'secondary', ...clientFlags(daemon)]);
      expect(failover.stderr).toBe('');
      expect(failover.stdout).toContain('failed over to secondary');
      const iterationsAtFailover = lastIteration(qemu);
      qemu.typeLine('failed-over');

      const done = await qemu.waitForLine(/gannet-guest: done (\d+)/, workloadTimeoutMs);
      expect(await qemu.waitExit(stepTimeoutMs)).toEqual({ code: 0, signal: null });
      const lines = guestLines(qemu);
      expect(lines.filter((line) => line.startsWith('FAIL'))).toEqual([]);
      expect(lines).toContain('host said failed-over');
      // The workload ran before, across and after the checkpoints, and after the failover.
      expect(iterationsAtCheckpoint[0], `iterations at the checkpoints: ${iterationsAtCheckpoint}`).toBeGreaterThan(0);
      expect(iterationsAtCheckpoint.at(-1)).toBeGreaterThan(iterationsAtCheckpoint[0]);
      expect(Number(done[1])).toBeGreaterThan(iterationsAtFailover);

      const written = sums(lines, /sum \d+ /);
      expect(sums(lines, /reread /), 'what the guest re-read after remounting').toEqual(written);
      expect((await daemon.stop()).code).toBe(0);
      const backing = join(daemon.dataDir, 'volumes/vm/disk.img');
      const fsck = await runCommand(requireTool('e2fsck'), ['-fn', backing]);
      expect(fsck.status, describeResult('e2fsck -fn', fsck)).toBe(0);
      expect(await filesIn(backing, '/work', join(dir, 'vm-after'))).toEqual(written);
      expect((await readFile(backing)).equals(await readFile(pvmImage)), 'the backing file equals the PVM image').toBe(true);

      console.log(
        `guest: booted in ${bootedMs} ms; ${done[1]} iterations, checkpoints at ${iterationsAtCheckpoint.join(', ')}, ` +
          `failover at ${iterationsAtFailover}; ${Date.now() - started} ms in all`,
      );
    },
    testTimeoutMs,
  );
});
