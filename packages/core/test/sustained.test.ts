/**
 * Sustained writes under frequent checkpoints: the workload the engine exists for. Goal: the flusher is
 * never starved and writes never stall for a whole flush pass, with memory under its cap, and nothing is
 * lost. Method: 32 writers keep random 4 KiB writes in flight on the primary view (as fast as the volume
 * admits them), with a checkpoint after every `writesPerEpoch` writes, so epochs advance only as fast as
 * writes are admitted; the memory cap is a small fraction of what is written. Checked: every epoch is
 * durable before `epochLagMax` more are sealed; every flush pass overlaps admitted writes; buffered
 * memory never exceeds the cap (plus one request); afterwards the file holds exactly the last write of
 * every block. Bounded by a write count and a deadline.
 */
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { KiB, MiB } from '@gannet/block-device';
import { ReplicatedVolume, Rng } from '@gannet/core';

const root = mkdtempSync(join(tmpdir(), 'gannet-sustained-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const volumeBytes = 64 * MiB;
const blockBytes = 4 * KiB;
const memoryBytesMax = 4 * MiB;
const writers = 32;
const writesTotal = 24_000;
const writesPerEpoch = 300;
/** Epochs sealed while an earlier one is still not durable, at most. */
const epochLagMax = 8;
const deadlineMs = 90_000;

/** Bytes of block `b` as written by write number `n`: distinct per (block, write). */
function blockData(b: number, n: number): Buffer {
  const out = Buffer.alloc(blockBytes);
  out.writeUInt32LE(b, 0);
  out.writeUInt32LE(n, 4);
  for (let i = 8; i < blockBytes; i += 4) out.writeUInt32LE((b * 2654435761 + n * 40503 + i) >>> 0, i);
  return out;
}

describe('sustained writes under frequent checkpoints', () => {
  it('keeps admitting writes through every flush pass, keeps epochs durable within a bound, stays under the memory cap, loses nothing', async () => {
    const dir = mkdtempSync(join(root, 'v-'));
    const path = join(dir, 'disk.img');
    const volume = await ReplicatedVolume.open({ path, dataDir: join(dir, 'meta'), sizeBytes: volumeBytes, blockBytes, memoryBytesMax });
    const rng = new Rng(7);
    const blocks = volumeBytes / blockBytes;
    const last = new Map<number, number>();
    const admitted: number[] = [];
    const passes: { start: number; end: number }[] = [];
    const sealedAt = new Map<number, number>();
    let lagMax = 0;
    let memoryMax = 0;
    volume.on('flushed', (event) => {
      const end = performance.now();
      passes.push({ start: end - event.durationMs, end });
      // Every epoch up to the durable one is now durable; how many were sealed meanwhile?
      for (const [epoch, sealedWhenEpochWas] of sealedAt) {
        if (epoch > event.epoch) continue;
        lagMax = Math.max(lagMax, volume.stats().epoch - sealedWhenEpochWas);
        sealedAt.delete(epoch);
      }
    });
    const deadline = performance.now() + deadlineMs;
    let issued = 0;
    const inFlight = new Set<number>();
    let sinceCheckpoint = 0;
    const writer = async () => {
      while (issued < writesTotal) {
        if (performance.now() > deadline) throw new Error(`${issued} of ${writesTotal} writes issued after ${deadlineMs} ms`);
        const n = ++issued;
        // One write per block in flight, so the last to complete is the last applied.
        let b = rng.below(blocks);
        while (inFlight.has(b)) b = rng.below(blocks);
        inFlight.add(b);
        await volume.primary.write(blockData(b, n), b * blockBytes);
        inFlight.delete(b);
        last.set(b, n);
        admitted.push(performance.now());
        const s = volume.stats();
        memoryMax = Math.max(memoryMax, s.bufferedBytes.primary + s.bufferedBytes.secondary + s.bufferedBytes.committed);
        if (++sinceCheckpoint >= writesPerEpoch) {
          sinceCheckpoint = 0;
          const epoch = await volume.checkpoint();
          sealedAt.set(epoch, epoch);
        }
      }
    };
    await Promise.all(Array.from({ length: writers }, writer));
    const writersDone = performance.now();
    const final = await volume.checkpoint();
    while (volume.stats().durableEpoch < final) await once(volume, 'flushed');

    expect(lagMax, 'epochs sealed before an earlier one became durable').toBeLessThanOrEqual(epochLagMax);
    const whileWriting = passes.filter((p) => p.end < writersDone);
    expect(whileWriting.length).toBeGreaterThan(5);
    const starved = whileWriting.filter((p) => p.end - p.start > 1 && !admitted.some((t) => t >= p.start && t <= p.end));
    expect(starved, 'flush passes during which no write was admitted').toEqual([]);
    expect(memoryMax).toBeLessThanOrEqual(memoryBytesMax + blockBytes);

    const file = readFileSync(path);
    for (const [b, n] of last) {
      const at = b * blockBytes;
      if (!file.subarray(at, at + blockBytes).equals(blockData(b, n))) expect.fail(`block ${b}: the file does not hold write ${n}`);
    }
    await volume.close();
  }, 120_000);
});
