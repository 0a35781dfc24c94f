/**
 * Goal: QEMU's NBD client (qemu-io, qemu-img) reads back exactly what it wrote through the CLI, over TCP
 * and a Unix socket, on memory and file disks (including a size that is not a multiple of 512), and a
 * read-only export refuses writes.
 * Method: spawn the CLI, drive it with qemu-io pattern writes/reads (qemu-io exits 1 on a failed command
 * or a pattern mismatch), qemu-img convert/compare/map, and for file disks check the bytes on disk.
 */
import { randomBytes } from 'node:crypto';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startNbdCli } from './helpers/nbd-cli.js';
import {
  describeResult,
  makeTmpDir,
  removeTmpDirs,
  requireTool,
  runCommand,
  runOk,
  stopAllProcesses,
} from './helpers/process.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** Runs qemu-io with one `-c` per command; fails with its output unless every command succeeded. */
async function qemuIo(uri: string, commands: string[], options: { readOnly?: boolean } = {}): Promise<string> {
  const r = await runOk('qemu-io', [...(options.readOnly ? ['-r'] : []), '-f', 'raw', uri, ...commands.flatMap((c) => ['-c', c])]);
  expect(r.stdout).not.toMatch(/Pattern verification failed|failed:/);
  return r.stdout;
}

interface QemuMapEntry {
  start: number;
  length: number;
  depth: number;
  present?: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

beforeAll(() => {
  requireTool('qemu-io');
  requireTool('qemu-img');
  requireTool('nbdinfo');
});
afterEach(stopAllProcesses);
afterAll(removeTmpDirs);

describe('qemu-io', () => {
  it('reads back patterns written with write, aio_write, write -z, discard and FUA writes', async () => {
    const cli = await startNbdCli({ memory: 16 * MiB });
    await qemuIo(cli.uri, [
      'write -P 0x55 0 1M',
      'read -P 0x55 0 1M',
      'aio_write -P 0x66 1M 1M',
      'aio_write -P 0x67 2M 512k',
      'aio_flush',
      'write -P 0x99 3M 1M',
      'write -z 3M 512k',
      'write -P 0x98 4M 1M',
      'discard 4M 1M',
      'write -f -P 0x77 5M 64k',
      'write -f -P 0x78 6M 3',
      'flush',
    ]);
    // A second client process (new connection) sees everything.
    await qemuIo(cli.uri, [
      'read -P 0x55 0 1M',
      'read -P 0x66 1M 1M',
      'read -P 0x67 2M 512k',
      'read -P 0 3M 512k',
      'read -P 0x99 3584k 512k',
      'read -P 0x77 5M 64k',
      'read -P 0x78 6M 3',
      'read -P 0 6291459 1021',
      'read -P 0 15M 1M',
    ]);
    // Discarded data must not come back; the memory disk reads trimmed ranges as zero.
    await qemuIo(cli.uri, ['read -P 0 4M 1M']);
  });

  it('fails a pattern mismatch (the check above can fail)', async () => {
    const cli = await startNbdCli({ memory: 4 * MiB });
    await qemuIo(cli.uri, ['write -P 0x55 0 64k']);
    const r = await runCommand('qemu-io', ['-f', 'raw', cli.uri, '-c', 'read -P 0x56 0 64k']);
    expect(r.status).toBe(1);
    expect(r.stdout).toMatch(/Pattern verification failed/);
  });

  it('fails a write past the end and keeps the disk intact', async () => {
    const cli = await startNbdCli({ memory: 4 * MiB });
    await qemuIo(cli.uri, ['write -P 0x31 3M 1M']);
    const r = await runCommand('qemu-io', ['-f', 'raw', cli.uri, '-c', 'write -P 0x32 3M 2M']);
    expect(r.status, describeResult('qemu-io write past end', r)).not.toBe(0);
    await qemuIo(cli.uri, ['read -P 0x31 3M 1M']);
  });

  it('works over a Unix socket', async () => {
    const dir = await makeTmpDir();
    const socket = join(dir, 'nbd.sock');
    const cli = await startNbdCli({ memory: 8 * MiB, socket });
    const uri = `nbd+unix:///?socket=${socket}`;
    await qemuIo(uri, ['write -P 0x42 1M 2M', 'aio_write -P 0x43 4M 4k', 'aio_flush', 'flush']);
    await qemuIo(uri, ['read -P 0x42 1M 2M', 'read -P 0x43 4M 4k', 'read -P 0 0 1M']);
    expect(cli.proc.alive()).toBe(true);
  });

  it('a read-only export serves reads and refuses writes', async () => {
    const dir = await makeTmpDir();
    const file = join(dir, 'ro.img');
    await writeFile(file, Buffer.alloc(2 * MiB, 0x24));
    const cli = await startNbdCli({ file, readOnly: true });
    await qemuIo(cli.uri, ['read -P 0x24 0 2M'], { readOnly: true });
    // qemu learns the export is read-only in the handshake and refuses to open it for writing.
    const w = await runCommand('qemu-io', ['-f', 'raw', cli.uri, '-c', 'write -P 0x25 0 4k']);
    expect(w.status, describeResult('qemu-io write to read-only', w)).not.toBe(0);
    const z = await runCommand('qemu-io', ['-f', 'raw', cli.uri, '-c', 'write -z 0 4k']);
    expect(z.status, describeResult('qemu-io write -z to read-only', z)).not.toBe(0);
    expect((await readFile(file)).equals(Buffer.alloc(2 * MiB, 0x24))).toBe(true);
  });

  it('serves a file whose size is not a multiple of 512, up to its last byte', async () => {
    const dir = await makeTmpDir();
    const file = join(dir, 'odd.img');
    const oddBytes = MiB + 512 + 3;
    const original = randomBytes(oddBytes);
    await writeFile(file, original);
    const cli = await startNbdCli({ file });
    const size = await runOk('nbdinfo', ['--size', cli.uri]);
    expect(Number(size.stdout.trim())).toBe(oddBytes);

    // The last 515 bytes (a partial sector plus one full one) and a few bytes in the middle.
    await qemuIo(cli.uri, [`write -P 0x5a ${MiB} 515`, 'write -P 0xa5 1000 7', 'flush']);
    const past = await runCommand('qemu-io', ['-f', 'raw', cli.uri, '-c', `write -P 0x5b ${MiB} 516`]);
    expect(past.status, describeResult('qemu-io write past odd end', past)).not.toBe(0);
    await qemuIo(cli.uri, [`read -P 0x5a ${MiB} 515`, 'read -P 0xa5 1000 7']);

    const expected = Buffer.from(original);
    expected.fill(0x5a, MiB, oddBytes);
    expected.fill(0xa5, 1000, 1007);
    // Flushed before qemu-io returned: the bytes are in the file while the server still runs.
    expect((await stat(file)).size).toBe(oddBytes);
    expect((await readFile(file)).equals(expected)).toBe(true);
    await cli.stop();
    expect((await readFile(file)).equals(expected)).toBe(true);
  });
});

describe('qemu-img', () => {
  it('converts a file to the export and back, and compare agrees', async () => {
    const dir = await makeTmpDir();
    const src = join(dir, 'src.img');
    const back = join(dir, 'back.img');
    const diskBytes = 8 * MiB;
    // Half random data, half zeroes, so both data and zero paths are exercised.
    const content = Buffer.concat([randomBytes(diskBytes / 2), Buffer.alloc(diskBytes / 4), randomBytes(diskBytes / 4)]);
    await writeFile(src, content);
    const cli = await startNbdCli({ memory: diskBytes });

    await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, cli.uri]);
    const same = await runCommand('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, cli.uri]);
    expect(same.status, describeResult('qemu-img compare', same)).toBe(0);

    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', cli.uri, back]);
    expect((await readFile(back)).equals(content)).toBe(true);

    // Change one byte on the export: compare must notice (exit 1).
    await qemuIo(cli.uri, ['write -P 0x01 5M 1']);
    const differ = await runCommand('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, cli.uri]);
    expect(differ.status, describeResult('qemu-img compare after change', differ)).toBe(1);
  });

  it('map --output=json shows data where written and zero elsewhere', async () => {
    const cli = await startNbdCli({ memory: 16 * MiB });
    await qemuIo(cli.uri, ['write -P 0x11 2M 1M', 'write -P 0x12 10M 64k', 'flush']);
    const r = await runOk('qemu-img', ['map', '--output=json', '-f', 'raw', cli.uri]);
    const map = JSON.parse(r.stdout) as QemuMapEntry[];
    let at = 0;
    for (const e of map) {
      expect(e.start).toBe(at);
      at += e.length;
    }
    expect(at).toBe(16 * MiB);
    const covering = (off: number, len: number) => map.filter((e) => e.start < off + len && e.start + e.length > off);
    for (const e of covering(2 * MiB, MiB)) expect(e.data, JSON.stringify(e)).toBe(true);
    for (const e of covering(10 * MiB, 64 * KiB)) expect(e.data, JSON.stringify(e)).toBe(true);
    for (const e of covering(0, 2 * MiB)) expect(e.zero, JSON.stringify(e)).toBe(true);
    for (const e of covering(4 * MiB, 6 * MiB)) expect(e.zero, JSON.stringify(e)).toBe(true);
    for (const e of covering(11 * MiB, 5 * MiB)) expect(e.zero, JSON.stringify(e)).toBe(true);
  });
});
