/**
 * Goal: buffered bytes are bounded in memory. A volume with memoryBytesMax = 64 MiB takes 256 MiB of
 * distinct data into its primary view with no checkpoint: it must fire 'pressure', spill the excess, keep
 * the process's peak RSS under the limit plus a stated margin, and read every byte back.
 * Method: memory-child.mjs does the work in its own process (so RSS is that of the volume alone, not of
 * vitest) and reports its peak RSS in one JSON line. The bound applies to private memory (RssAnon +
 * RssShmem): LevelDB reads its tables through mmap, so reading back 192 MiB of spilled blocks maps up to
 * that much clean, reclaimable page cache into the process (RssFile). That is printed, not bounded.
 */
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';

const MiB = 1024 * 1024;
const memoryBytesMax = 64 * MiB;
const totalBytes = 4 * memoryBytesMax;
/**
 * Allowed RSS above the limit: Node itself (~45 MiB of heap, code and libuv), LevelDB's block cache and
 * write buffers, slab headroom and transient request buffers.
 */
const rssMarginBytes = 96 * MiB;
const childTimeoutMs = 150_000;

const coreDist = fileURLToPath(new URL('../dist/index.js', import.meta.url));
const childPath = fileURLToPath(new URL('./memory-child.mjs', import.meta.url));

interface MemoryReport {
  memoryBytesMax: number;
  totalBytes: number;
  pressure: number;
  errors: string[];
  bufferedBytes: { primary: number; secondary: number; committed: number };
  spilledBytes: number;
  anonBaseline: number;
  anonPeakWrite: number;
  anonPeak: number;
  peakRss: number;
  firstMismatch: number;
  secondaryLeak: number;
  writeMs: number;
  readMs: number;
}

describe('memory bound', () => {
  const dir = mkdtempSync(join(tmpdir(), 'gannet-memory-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it(`256 MiB into a 64 MiB volume buffer: spills, private RSS <= limit + ${rssMarginBytes / MiB} MiB, reads back`, async () => {
    if (!existsSync(coreDist)) {
      throw new Error(`${coreDist} is missing: the memory child runs the built package; run \`npx -y pnpm@9 run build\` first`);
    }
    const { stdout, stderr, error } = await new Promise<{ stdout: string; stderr: string; error: Error | null }>((resolve) => {
      execFile(
        process.execPath,
        [childPath, dir, String(memoryBytesMax), String(totalBytes)],
        { timeout: childTimeoutMs, killSignal: 'SIGKILL', maxBuffer: 1 * MiB, encoding: 'utf8' },
        (err, out, errOut) => resolve({ stdout: out, stderr: errOut, error: err }),
      );
    });
    if (error) throw new Error(`memory child failed: ${error.message}\n--- stdout\n${stdout}\n--- stderr\n${stderr}`);
    const report = JSON.parse(stdout.trim().split('\n').pop()!) as MemoryReport;
    const mib = (n: number) => `${(n / MiB).toFixed(1)} MiB`;
    console.log(
      `memory: peak private RSS ${mib(report.anonPeak)} (baseline ${mib(report.anonBaseline)}, during writes ${mib(report.anonPeakWrite)}), ` +
        `peak total RSS incl. LevelDB's mapped tables ${mib(report.peakRss)}, ` +
        `spilled ${mib(report.spilledBytes)}, pressure events ${report.pressure}, write ${report.writeMs} ms, read ${report.readMs} ms`,
    );
    expect(report.errors, "'error' events").toEqual([]);
    expect(report.firstMismatch, 'first byte read back wrong (-1: none)').toBe(-1);
    expect(report.secondaryLeak, 'first non-zero byte of the secondary view (-1: none)').toBe(-1);
    expect(report.pressure, "'pressure' events").toBeGreaterThan(0);
    expect(report.spilledBytes, 'spilledBytes: at least what does not fit under the limit').toBeGreaterThanOrEqual(totalBytes - memoryBytesMax);
    expect(report.anonPeak, `peak private RSS (limit ${mib(memoryBytesMax)} + margin ${mib(rssMarginBytes)})`).toBeLessThanOrEqual(
      memoryBytesMax + rssMarginBytes,
    );
  }, childTimeoutMs + 10_000);
});
