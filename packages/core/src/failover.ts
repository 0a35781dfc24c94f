import { performance } from 'node:perf_hooks';
import { assert } from './assert.js';
import type { Engine } from './engine.js';
import type { Flusher } from './flusher.js';
import { journalZeroRecordBytes, type JournalEntry } from './meta.js';
import { layerSource, planFlush, planRanges, planRuns, writePlan, type Run } from './plan.js';
import { mergeRanges, subtractRanges } from './ranges.js';
import type { ByteRange, FailoverTarget } from './types.js';
import { MiB } from '@gannet/block-device';

/** Journal bytes per synced batch during failover. */
export const journalChunkBytes = 16 * MiB;

/**
 * Failover ends replication with one side's state as the disk. It writes the kept buffer merged over
 * the unflushed committed data to a journal in the metadata store (block contents, and one record per
 * run of zeroed blocks), then the state record 'failing-over' (with the target), applies the journal to
 * the backing file, fdatasyncs, and records 'failed-over' while deleting the journal in one batch.
 * Replaying the journal is idempotent (it holds final contents, its records never overlap), so a crash
 * anywhere in between is finished by the next open (`replay`).
 */
export class Failover {
  constructor(
    private readonly engine: Engine,
    private readonly flusher: Flusher,
  ) {}

  async run(to: FailoverTarget): Promise<void> {
    const { engine } = this;
    const { epochs, buffers, meta } = engine;
    await this.flusher.idle();
    const kept = to === 'secondary' ? epochs.S : to === 'primary' ? epochs.P : null;
    const layers = kept === null ? epochs.committed.slice() : [...epochs.committed, kept];
    buffers.pin(epochs.live(), true);
    const plan = await planFlush(layers);
    const source = layerSource(buffers, engine.spiller, layers);
    await meta.clearJournal();
    let chunk: JournalEntry[] = [];
    let chunkBytes = 0;
    const add = async (entry: JournalEntry, bytes: number) => {
      chunk.push(entry);
      chunkBytes += bytes;
      if (chunkBytes >= journalChunkBytes) {
        await meta.putJournal(chunk);
        chunk = [];
        chunkBytes = 0;
      }
    };
    for (const block of plan.blocks) {
      const found = source(block);
      const data = found instanceof Promise ? await found : found;
      await add({ block, data }, engine.geometry.blockBytes);
    }
    for (const holes of plan.holeRuns) await add({ holes }, journalZeroRecordBytes);
    for (const zeroes of plan.zeroRuns) await add({ zeroes }, journalZeroRecordBytes);
    if (chunk.length > 0) await meta.putJournal(chunk);
    await meta.recordFailingOver(to);
    const runs = planRuns(plan.blocks, engine.geometry.blockBytes);
    await writePlan(engine.backing, runs, source, plan, engine.geometry);
    await this.finish(to, planRanges(runs, plan, engine.geometry), plan);
    epochs.dropAll();
  }

  /** Open found 'failing-over': the journal is complete (the state record follows it), apply it again. */
  async replay(to: FailoverTarget): Promise<void> {
    const { engine } = this;
    const start = performance.now();
    const blocks: number[] = [];
    const holeRuns: Run[] = [];
    const zeroRuns: Run[] = [];
    const ranges: ByteRange[] = [];
    for await (const chunk of engine.meta.readJournal(journalChunkBytes)) {
      const data = new Map<number, Uint8Array | null>();
      const chunkHoleRuns: Run[] = [];
      const chunkZeroRuns: Run[] = [];
      for (const e of chunk) {
        if ('holes' in e) {
          chunkHoleRuns.push(e.holes);
        } else if ('zeroes' in e) {
          chunkZeroRuns.push(e.zeroes);
        } else {
          assert(e.data === null || e.data.byteLength >= engine.buffers.blockLength(e.block), `journal block ${e.block} holds a whole block`);
          data.set(e.block, e.data);
          blocks.push(e.block);
        }
      }
      const runs = planRuns([...data.keys()], engine.geometry.blockBytes);
      const chunkPlan = { holeRuns: chunkHoleRuns, zeroRuns: chunkZeroRuns };
      await writePlan(engine.backing, runs, (b) => data.get(b)!, chunkPlan, engine.geometry);
      ranges.push(...planRanges(runs, chunkPlan, engine.geometry));
      holeRuns.push(...chunkHoleRuns);
      zeroRuns.push(...chunkZeroRuns);
    }
    await this.finish(to, mergeRanges(ranges), { blocks, holeRuns, zeroRuns });
    engine.emit('failover', { to, durationMs: performance.now() - start });
  }

  private async finish(
    to: FailoverTarget,
    ranges: ByteRange[],
    journal: { blocks: Iterable<number>; holeRuns: Iterable<Run>; zeroRuns: Iterable<Run> },
  ): Promise<void> {
    const { engine } = this;
    await engine.backing.flush();
    const torn = subtractRanges(engine.torn, ranges);
    await engine.meta.recordFailedOver(to, journal, torn);
    engine.torn = torn;
    engine.state = 'failed-over';
    engine.target = to;
  }
}
