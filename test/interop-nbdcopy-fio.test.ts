/**
 * Goal: bulk and concurrent traffic from real clients round-trips bit-exactly: nbdcopy (multi-connection,
 * many requests in flight) file -> export -> file, and fio's nbd engine with queue depth 32 verifying
 * every block it wrote (crc32c).
 * Method: spawn the CLI, run the client, compare bytes (`cmp`-equivalent in-process) or fio's exit status
 * and JSON error counters.
 */
import { randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startNbdCli } from './helpers/nbd-cli.js';
import { describeResult, makeTmpDir, removeTmpDirs, requireTool, runCommand, runOk, stopAllProcesses } from './helpers/process.js';

const MiB = 1024 * 1024;

beforeAll(() => {
  requireTool('nbdcopy');
  requireTool('fio');
});
afterEach(stopAllProcesses);
afterAll(removeTmpDirs);

describe('nbdcopy', () => {
  it('copies a file to a memory export and back bit-exactly', async () => {
    const dir = await makeTmpDir();
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    const diskBytes = 24 * MiB;
    // Random data with a zero gap, so nbdcopy's sparse/zero path (BLOCK_STATUS + WRITE_ZEROES) runs too.
    const content = Buffer.concat([randomBytes(8 * MiB), Buffer.alloc(8 * MiB), randomBytes(8 * MiB)]);
    await writeFile(src, content);
    const cli = await startNbdCli({ memory: diskBytes });
    await runOk('nbdcopy', [src, cli.uri]);
    await runOk('nbdcopy', [cli.uri, dst]);
    expect((await readFile(dst)).equals(content)).toBe(true);
    // And the stream form of the same check (`nbdcopy URI - | cmp`).
    const piped = await runOk('sh', ['-c', 'nbdcopy "$0" - | cmp - "$1"', cli.uri, src]);
    expect(piped.status).toBe(0);
  });

  it('copies into a file export and the file holds the data', async () => {
    const dir = await makeTmpDir();
    const src = join(dir, 'src.img');
    const disk = join(dir, 'disk.img');
    const content = randomBytes(16 * MiB + 4096 + 7);
    await writeFile(src, content);
    await writeFile(disk, Buffer.alloc(content.length));
    const cli = await startNbdCli({ file: disk });
    await runOk('nbdcopy', ['--flush', src, cli.uri]);
    expect((await readFile(disk)).equals(content)).toBe(true);
    const bad = await runCommand('sh', ['-c', 'nbdcopy "$0" - | cmp -s - /dev/zero', cli.uri]);
    expect(bad.status, 'cmp must see a difference from zeroes').not.toBe(0);
  });
});

interface FioJob {
  jobname: string;
  error: number;
  write: { io_bytes: number };
  read: { io_bytes: number };
}

describe('fio nbd engine', () => {
  it('randwrite bs=4k iodepth=32 size=32M verifies every block (crc32c)', async () => {
    const cli = await startNbdCli({ memory: 32 * MiB });
    const dir = await makeTmpDir();
    const r = await runCommand(
      'fio',
      [
        '--name=verify',
        '--ioengine=nbd',
        `--uri=${cli.uri}`,
        '--rw=randwrite',
        '--bs=4k',
        '--iodepth=32',
        '--size=32M',
        '--verify=crc32c',
        '--do_verify=1',
        '--verify_fatal=1',
        // fio would otherwise leave local-*-verify.state files in its working directory.
        '--verify_state_save=0',
        '--output-format=json',
      ],
      { timeoutMs: 45_000, cwd: dir },
    );
    expect(r.status, describeResult('fio', r)).toBe(0);
    expect(r.stderr + r.stdout).not.toMatch(/verify: bad|crc32c: verify failed|bad magic header/i);
    const json = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: FioJob[] };
    expect(json.jobs).toHaveLength(1);
    expect(json.jobs[0].error).toBe(0);
    expect(json.jobs[0].write.io_bytes).toBe(32 * MiB);
    // The verify phase reads everything back.
    expect(json.jobs[0].read.io_bytes).toBe(32 * MiB);
    expect(cli.proc.alive()).toBe(true);
  });
});
