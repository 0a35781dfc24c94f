/**
 * Goal: `pnpm bench:nbd` keeps working: it starts every server (our CLI, gannet daemons, nbdkit), runs
 * every row, prints the table with a ratio per row and writes the JSON, and leaves no process behind. The numbers are not asserted (they
 * depend on the machine), only that each is a positive measurement.
 * Method: run the built bench with 1 s per row and no ramp on a small disk.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { repoRoot } from './helpers/nbd-cli.js';
import { describeResult, makeTmpDir, removeTmpDirs, requireTool, runCommand } from './helpers/process.js';

const benchJs = fileURLToPath(new URL('../packages/bench/dist/nbd-bench.js', import.meta.url));
const expectedRows = ['randread 4k qd32', 'randwrite 4k qd32', 'seqread 1M qd8', 'seqwrite 1M qd8'].flatMap((w) => [
  `file ${w}`,
  `memory ${w}`,
  `gannet ${w}`,
  `gannet-primary ${w}`,
]);

/** Pids whose command line contains `needle` (Linux /proc). */
async function processesMentioning(needle: string): Promise<number[]> {
  const pids: number[] = [];
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const cmdline = await readFile(`/proc/${entry}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.includes(needle)) pids.push(Number(entry));
  }
  return pids;
}

beforeAll(() => {
  requireTool('fio');
  requireTool('nbdkit');
});
afterAll(removeTmpDirs);

describe('pnpm bench:nbd', () => {
  it('prints every row with IOPS, MB/s, p99 and a ratio, and writes JSON', async () => {
    const dir = await makeTmpDir();
    const jsonPath = join(dir, 'bench.json');
    const r = await runCommand(process.execPath, [benchJs, '--runtime', '1', '--ramp', '0', '--size', '32M', '--json', jsonPath], {
      cwd: repoRoot,
      timeoutMs: 170_000,
    });
    expect(r.status, describeResult('nbd-bench', r)).toBe(0);
    const lines = r.stdout.split('\n');
    // Figures mean nothing without when and where they were measured.
    expect(lines[0]).toMatch(/^nbd-bench: \d{4}-\d\d-\d\dT[\d:.]+Z, \d+ CPUs \(.+\), [\d.]+ GiB RAM, Linux \S+, Node v\d+\.\S+, fio-\S+, nbdkit \S+/);
    const header = lines.find((l) => l.startsWith('row '));
    expect(header).toMatch(/ours IOPS\s+ours MB\/s\s+ours p99 us\s+nbdkit IOPS\s+nbdkit MB\/s\s+nbdkit p99 us\s+ratio/);
    for (const row of expectedRows) {
      const line = lines.find((l) => l.startsWith(`${row} `));
      expect(line, `row ${row} in\n${r.stdout}`).toBeDefined();
      const cells = line!.slice(row.length).trim().split(/\s+/);
      expect(cells).toHaveLength(7);
      expect(cells[6]).toMatch(/^\d+\.\d\dx$/);
      for (const c of cells.slice(0, 6)) expect(Number(c), `cell ${c} of ${row}`).toBeGreaterThan(0);
    }

    // The ratio table: one line per workload, one column per backend.
    const ratioHeader = lines.findIndex((l) => l.startsWith('workload '));
    expect(lines[ratioHeader]).toMatch(/NAME\/secondary \/ nbdkit memory\s+NAME\/primary \/ nbdkit memory$/);
    for (const [i, w] of ['randread 4k qd32', 'randwrite 4k qd32', 'seqread 1M qd8', 'seqwrite 1M qd8'].entries()) {
      expect(lines[ratioHeader + 2 + i]).toMatch(new RegExp(`^${w}(\\s+\\d+\\.\\d\\dx){4}$`));
    }

    const json = JSON.parse(await readFile(jsonPath, 'utf8')) as { rows: { row: string; ratio: number; ours: { iops: number }; nbdkit: { iops: number } }[] };
    expect(json.rows.map((x) => x.row).sort()).toEqual([...expectedRows].sort());
    for (const x of json.rows) expect(x.ratio).toBeCloseTo(x.ours.iops / x.nbdkit.iops, 6);

    // Every server it started has exited: each one's command line names the bench's temporary directory.
    expect(await processesMentioning('/nbd-bench-')).toEqual([]);
  }, 180_000);
});
