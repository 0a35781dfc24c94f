/**
 * Goal: `pnpm bench:core` keeps working. Method: run the built engine benchmark with --quick (tiny sizes)
 * and check that it exits 0 and prints every row of its table with a number in it. The figures themselves
 * are not asserted: a shared CI machine is no place for timing targets (the full bench reports them).
 */
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { describeResult, runCommand } from './helpers/process.js';

const benchPath = fileURLToPath(new URL('../packages/bench/dist/core-bench.js', import.meta.url));
const benchTimeoutMs = 90_000;

/** One pattern per row; the quick run uses 4, 8 and 16 MiB where the full run uses 64 MiB, 256 MiB, 1 GiB. */
const rows: readonly RegExp[] = [
  ...['4 MiB', '8 MiB', '16 MiB'].flatMap((size) => [
    new RegExp(`^\\| checkpoint p50, ${size} buffered .*\\| +[0-9.]+ ms \\|`),
    new RegExp(`^\\| checkpoint p99, ${size} buffered .*\\| +[0-9.]+ ms \\|`),
    new RegExp(`^\\| RSS / \\(buffered \\+ 64 MiB\\), ${size} buffered .*\\| +[0-9.]+ \\(RSS \\d+ MiB\\) \\| <= 1\\.1 +\\| (yes|NO) `),
  ]),
  /^\| flush 16 MiB, checkpoint to 'flushed' .*\| +\d+ MB\/s \|/,
  /^\| raw sequential write 16 MiB \+ fdatasync .*\| +\d+ MB\/s \|/,
  /^\| flush \/ raw .*\| +[0-9.]+x \| >= 0\.8x +\| (yes|NO) /,
  /^\| buffered write 64K, QD16, 16 MiB into the primary view .*\| +\d+ MB\/s \|/,
  /^\| buffered write 4K, QD16, 16 MiB into the primary view .*\| +\d+ MB\/s \|/,
  ...['8 MiB buffered, 2 failovers', '8 MiB buffered \\(memory 2 MiB: spilled\\), 2 failovers'].flatMap((what) => [
    new RegExp(`^\\| failover foreground p50, ${what} .*\\| +[0-9.]+ ms \\|`),
    new RegExp(`^\\| failover foreground p99, ${what} .*\\| +[0-9.]+ ms \\|`),
    new RegExp(`^\\| longest 4K request across the failover, ${what} .*\\| +[0-9.]+ ms \\|`),
    new RegExp(`^\\| failover to the first FLUSH returned \\(kept state on disk\\), median, ${what} .*\\| +\\d+ ms \\|`),
  ]),
];

describe('core bench (quick)', () => {
  it('prints every row of the table', async () => {
    if (!existsSync(benchPath)) throw new Error(`${benchPath} is missing: run \`npx -y pnpm@9 run build\` first`);
    const r = await runCommand(process.execPath, ['--expose-gc', benchPath, '--quick'], { timeoutMs: benchTimeoutMs });
    const out = describeResult('core-bench --quick', r);
    expect(r.status, out).toBe(0);
    const lines = r.stdout.split('\n');
    for (const row of rows) expect(lines.some((l) => row.test(l)), `row ${row} in\n${out}`).toBe(true);
    expect(lines.filter((l) => l.startsWith('| ') && !l.startsWith('| metric')).length, out).toBe(rows.length);
  }, benchTimeoutMs + 10_000);
});
