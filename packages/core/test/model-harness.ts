/**
 * Model-based randomized test of a volume strategy: one seed drives a whole run of reads, unaligned
 * writes, zeroes (with and without NO_HOLE) and trims (short, or over whole-block ranges up to the whole
 * volume: in gannet, holes punched and ranges zeroed in the backing file at flush), flushes, checkpoints
 * and at most one failover, on both views, several requests in flight at once. Every read is checked byte-exact against `VolumeModel`; the backing file is checked
 * byte-exact wherever the contract says what it holds (after a settled flush, after failover, after a
 * flush of the plain disk, after close), and the volume is reopened at the end.
 *
 * Concurrency: requests in one batch run together (Promise.all). Requests to overlapping byte ranges of
 * the same layer are not ordered by the contract, so a batch never holds two of them when one mutates;
 * before failover the views are separate layers, so a primary write and a secondary read of the same
 * bytes may share a batch. Checkpoints run with primary writes in flight: each must land wholly in the
 * sealed epoch or in the next one, never split, and the model follows whichever happened.
 *
 * A failure prints the seed, the op index and the ops leading to it, and writes the whole op list to a
 * file; `GANNET_SEED=n` reruns one seed (`a..b` a range), `GANNET_LONG=1` runs many more seeds and
 * longer runs.
 */
import { once } from 'node:events';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'vitest';
import {
  openVolume,
  type FailoverTarget,
  type StrategyName,
  type Volume,
  type VolumeOptions,
} from '@gannet/core';
import type { BlockDevice } from '@gannet/block-device';
import { Rng, VolumeModel, firstDifference, hexAround, type ViewName } from './model.js';

const KiB = 1024;
const MiB = 1024 * KiB;

const long = process.env.GANNET_LONG === '1';
/** Seeds and ops per seed: the default run must stay well under a minute on a shared 2-core machine. */
export const seedCountDefault = 50;
export const opsPerSeedDefault = 2_000;
export const seedCountLong = 1_000;
export const opsPerSeedLong = 10_000;
/** Requests in flight together, at most. */
const batchOpsMax = 8;
/** Longest single write/zero/trim; small volumes make most requests a few blocks. */
const requestBytesMax = 128 * KiB;
/** Share of zeroes and trims over long whole-block ranges (the rest are the short shapes of reads and writes). */
const longZeroChanceDefault = 0.5;
const longZeroChanceSpill = 0.1;
/** How long a settle (waiting for the background flusher) may take before the run fails. */
const settleMsMax = 20_000;
/** A batch (or close, or reopen) that takes longer has hung: fail with the op list, before vitest's timeout. */
const batchMsMax = 15_000;
/** Ops shown in a failure message (the whole list goes to a file). */
const failureContextOps = 40;
/**
 * Where volumes live: tmpfs when there is one. This test checks logic, not the disk (crash.test.ts does
 * that), and every flush's fdatasync on a real disk would make 50 seeds take minutes.
 */
const scratchRoot = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
/** Per-seed limit on wall time; the default run has 50 seeds to fit in ~60 s. */
const seedTimeoutMs = long ? 600_000 : 60_000;

/** What a strategy promises beyond the common contract, so one harness drives gannet and colo. */
interface StrategyProfile {
  /**
   * Once every sealed epoch is flushed, the backing file holds exactly the checkpoint view (gannet buffers
   * P in memory; COLO writes P through and keeps the old bytes aside, so only close rolls it back).
   */
  readonly backingIsCheckpointView: boolean;
  /** Buffers are in memory with a hard limit and spill (the memoryBytesMax option means something). */
  readonly spills: boolean;
}
const profiles: Record<'gannet' | 'colo', StrategyProfile> = {
  gannet: { backingIsCheckpointView: true, spills: true },
  colo: { backingIsCheckpointView: false, spills: false },
};

type RangeOp = { readonly view: ViewName; readonly offset: number; readonly length: number };
type WriteOp = RangeOp & { readonly kind: 'write'; readonly data: Uint8Array; readonly misalign: number };
type Op =
  | (RangeOp & { readonly kind: 'read'; readonly misalign: number })
  | WriteOp
  | (RangeOp & { readonly kind: 'zero'; readonly noHole: boolean })
  | (RangeOp & { readonly kind: 'trim' })
  | { readonly kind: 'flush'; readonly view: ViewName }
  | { readonly kind: 'checkpoint'; readonly racing: readonly WriteOp[] }
  | { readonly kind: 'settle' }
  | { readonly kind: 'failover'; readonly to: FailoverTarget };

function describeOp(op: Op): string {
  switch (op.kind) {
    case 'read':
    case 'trim':
      return `${op.kind} ${op.view} ${op.offset}+${op.length}`;
    case 'zero':
      return `zero${op.noHole ? ' noHole' : ''} ${op.view} ${op.offset}+${op.length}`;
    case 'write':
      return `write ${op.view} ${op.offset}+${op.length} [${Buffer.from(op.data.subarray(0, 4)).toString('hex')}..]`;
    case 'flush':
      return `flush ${op.view}`;
    case 'checkpoint':
      return `checkpoint${op.racing.length ? ` racing {${op.racing.map(describeOp).join('; ')}}` : ''}`;
    case 'settle':
      return 'settle (wait for flushed, compare backing file)';
    case 'failover':
      return `failover --to ${op.to}`;
  }
}

const mutates = (op: Op): boolean => op.kind === 'write' || op.kind === 'zero' || op.kind === 'trim';

/** Ops that run alone: they change the epoch or the layering, or read the backing file. */
const exclusive = (op: Op): boolean => op.kind === 'checkpoint' || op.kind === 'settle' || op.kind === 'failover';

function conflicts(a: Op, b: Op, failedOver: boolean): boolean {
  if (!('offset' in a) || !('offset' in b)) return false;
  if (!mutates(a) && !mutates(b)) return false;
  if (!failedOver && a.view !== b.view) return false;
  return a.offset < b.offset + b.length && b.offset < a.offset + a.length;
}

interface SeedConfig {
  readonly sizeBytes: number;
  readonly blockBytes: number;
  readonly memoryBytesMax?: number;
  readonly pressureRatio?: number;
  /** Chance that an op is a checkpoint: rare checkpoints let buffers grow past a small memory limit. */
  readonly checkpointChance: number;
  readonly failoverAt?: number;
  readonly failoverTo?: FailoverTarget;
}

const failoverTargets: readonly (FailoverTarget | undefined)[] = [undefined, 'secondary', 'checkpoint', 'primary'];

function pickConfig(rng: Rng, seed: number, opCount: number): SeedConfig {
  // Spill seeds: a 1 MiB limit (the schema's minimum) with long epochs and big writes, on a 2 MiB volume.
  const spill = seed % 5 === 2;
  // Sizes include ones that are not a multiple of the block (the last block is partial).
  const sizeBytes = spill ? 2 * MiB : rng.pick([256 * KiB, 512 * KiB, 1 * MiB, 768 * KiB + 512 + 3]);
  const failoverTo = failoverTargets[seed % failoverTargets.length];
  return {
    sizeBytes,
    blockBytes: rng.pick([512, 4096]),
    memoryBytesMax: spill ? 1 * MiB : undefined,
    pressureRatio: spill ? rng.pick([0.5, 0.75, 1]) : undefined,
    checkpointChance: spill ? 0.002 : rng.pick([0.01, 0.04, 0.1]),
    failoverTo,
    failoverAt: failoverTo === undefined ? undefined : rng.between(Math.floor(opCount * 0.2), Math.floor(opCount * 0.8)),
  };
}

function pickRange(rng: Rng, cfg: SeedConfig, big: boolean): { offset: number; length: number } {
  const { sizeBytes, blockBytes } = cfg;
  let length: number;
  let offset: number;
  if (big && rng.chance(0.3)) {
    length = Math.min(rng.between(16 * KiB, requestBytesMax), sizeBytes);
    return { offset: rng.below(sizeBytes - length + 1), length };
  }
  const shape = rng.below(10);
  if (shape < 3) {
    length = rng.between(1, 511);
    offset = rng.below(sizeBytes - length + 1);
  } else if (shape < 5) {
    length = Math.min(blockBytes * rng.between(1, 4), sizeBytes);
    offset = Math.floor(rng.below(sizeBytes - length + 1) / blockBytes) * blockBytes;
  } else if (shape < 8) {
    length = rng.between(1, 3 * blockBytes + 17);
    // Start just before a block boundary half the time, so the request straddles it.
    offset = rng.chance(0.5)
      ? Math.max(0, Math.min(sizeBytes - length, rng.below(Math.ceil(sizeBytes / blockBytes)) * blockBytes - rng.between(1, 7)))
      : rng.below(sizeBytes - length + 1);
  } else if (shape < 9) {
    length = rng.between(1, 64 * KiB);
    offset = rng.below(sizeBytes - length + 1);
  } else {
    // The end of the device, including the partial last block.
    length = rng.between(1, 2 * blockBytes);
    offset = sizeBytes - length - (rng.chance(0.5) ? 0 : rng.below(blockBytes));
  }
  length = Math.min(length, sizeBytes);
  offset = Math.max(0, Math.min(offset, sizeBytes - length));
  return { offset, length };
}

/**
 * Zero and trim ranges: the short shapes of pickRange, or (`longChance`) whole-block ranges of any length
 * up to the whole volume, as a guest's discard of a partition or of the disk, sometimes a few bytes off the
 * block boundaries so a long range comes with partial head and tail blocks.
 */
function pickZeroRange(rng: Rng, cfg: SeedConfig, longChance: number): { offset: number; length: number } {
  if (!rng.chance(longChance)) return pickRange(rng, cfg, false);
  const { sizeBytes, blockBytes } = cfg;
  const blocks = Math.ceil(sizeBytes / blockBytes);
  const shape = rng.below(4);
  const count =
    shape === 0
      ? blocks
      : shape === 1
        ? Math.min(blocks, rng.between(1, 8))
        : shape === 2
          ? Math.min(blocks, rng.between(8, Math.max(8, Math.floor(blocks / 4))))
          : rng.between(Math.floor(blocks / 4), blocks);
  const first = rng.below(blocks - count + 1);
  let offset = first * blockBytes;
  let end = Math.min((first + count) * blockBytes, sizeBytes);
  if (rng.chance(0.3)) offset = Math.min(offset + rng.between(1, 7), end - 1);
  if (rng.chance(0.3)) end = Math.max(end - rng.between(1, 7), offset + 1);
  return { offset, length: end - offset };
}

function genWrite(rng: Rng, cfg: SeedConfig, view: ViewName, big: boolean): WriteOp {
  const { offset, length } = pickRange(rng, cfg, big);
  // Repeated small patterns half the time, so the engine cannot pass by comparing lengths only.
  const data = rng.chance(0.5) ? rng.fill(new Uint8Array(length)) : new Uint8Array(length).fill(rng.between(1, 255));
  return { kind: 'write', view, offset, length, data, misalign: rng.below(8) };
}

function genOp(rng: Rng, cfg: SeedConfig, failedOver: boolean, spill: boolean): Op {
  const view: ViewName = rng.chance(0.5) ? 'primary' : 'secondary';
  if (rng.chance(cfg.checkpointChance) && !failedOver) {
    const racing: WriteOp[] = [];
    if (rng.chance(0.3)) {
      const n = rng.between(1, 3);
      for (let i = 0; i < n; i++) {
        const w = genWrite(rng, cfg, 'primary', false);
        if (!racing.some((r) => conflicts(r, w, false))) racing.push(w);
      }
    }
    return { kind: 'checkpoint', racing };
  }
  const r = rng.below(100);
  // After failover a primary write is a mistake the volume must refuse; keep a few of them.
  const mutView: ViewName = failedOver && rng.chance(0.9) ? 'secondary' : view;
  if (r < 34) return genWrite(rng, cfg, mutView, spill);
  if (r < 72) return { kind: 'read', view, ...pickRange(rng, cfg, false), misalign: rng.below(8) };
  // Spill seeds must buffer more than their memory limit: long zero ranges there are rarer.
  const longZeroChance = spill ? longZeroChanceSpill : longZeroChanceDefault;
  if (r < 82) return { kind: 'zero', view: mutView, ...pickZeroRange(rng, cfg, longZeroChance), noHole: rng.chance(0.5) };
  if (r < 90) return { kind: 'trim', view: mutView, ...pickZeroRange(rng, cfg, longZeroChance) };
  if (r < 98) return { kind: 'flush', view: failedOver ? 'secondary' : view };
  return { kind: 'settle' };
}

/** A buffer whose byteOffset is `misalign` into a larger ArrayBuffer, to catch engines ignoring byteOffset. */
function misaligned(length: number, misalign: number, fill: number): Uint8Array {
  return new Uint8Array(new ArrayBuffer(length + misalign + 3), misalign, length).fill(fill);
}

class ModelFailure extends Error {}

interface RunContext {
  readonly seed: number;
  readonly strategy: 'gannet' | 'colo';
  readonly profile: StrategyProfile;
  readonly cfg: SeedConfig;
  readonly backingPath: string;
  readonly model: VolumeModel;
  readonly log: string[];
  opIndex: number;
}

function fail(what: string): never {
  throw new ModelFailure(what);
}

function expectBytes(what: string, expected: Uint8Array, actual: Uint8Array, base = 0): void {
  const at = firstDifference(expected, actual);
  if (at < 0) return;
  fail(
    `${what}: first difference at byte ${base + at} (index ${at} of ${expected.length})\n` +
      `  expected ${hexAround(expected, at)}\n  actual   ${hexAround(actual, at)}`,
  );
}

function compareBackingFile(ctx: RunContext, what: string, expected: Uint8Array): void {
  const actual = readFileSync(ctx.backingPath);
  if (actual.length !== ctx.model.sizeBytes) fail(`${what}: backing file is ${actual.length} bytes, want ${ctx.model.sizeBytes}`);
  expectBytes(`${what}: backing file`, expected, actual);
}

async function readView(dev: BlockDevice, offset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length).fill(0xa5);
  await dev.read(buf, offset);
  return buf;
}

/** Waits (on 'flushed' events, bounded) until every sealed epoch is in the backing file. */
async function settle(vol: Volume, epoch: number): Promise<void> {
  const deadline = AbortSignal.timeout(settleMsMax);
  while (vol.stats().durableEpoch < epoch) {
    await once(vol, 'flushed', { signal: deadline }).catch((err: unknown) => {
      throw new Error(`settle: durableEpoch ${vol.stats().durableEpoch} < ${epoch} after ${settleMsMax} ms`, { cause: err });
    });
  }
}

/** `work`, or a ModelFailure naming `what` if it has not settled within batchMsMax. */
async function withDeadline<T>(what: string, work: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new ModelFailure(`${what} has not finished after ${batchMsMax} ms (hang)`)), batchMsMax);
  });
  try {
    return await Promise.race([work, hang]);
  } finally {
    clearTimeout(timer);
  }
}

function errorCode(err: unknown): string {
  return err !== null && typeof err === 'object' && 'code' in err ? String((err as { code: unknown }).code) : String(err);
}

async function runRangeOp(ctx: RunContext, vol: Volume, op: Op): Promise<() => void> {
  const { model } = ctx;
  const dev = (v: ViewName): BlockDevice => (v === 'primary' ? vol.primary : vol.secondary);
  switch (op.kind) {
    case 'read': {
      const buf = misaligned(op.length, op.misalign, 0xa5);
      await dev(op.view).read(buf, op.offset);
      return () => expectBytes(`read ${op.view}`, model.read(op.view, op.offset, op.length), buf, op.offset);
    }
    case 'write':
    case 'zero':
    case 'trim': {
      const refused = !model.writable(op.view);
      try {
        if (op.kind === 'write') {
          const buf = misaligned(op.length, op.misalign, 0);
          buf.set(op.data);
          await dev(op.view).write(buf, op.offset);
          // The device must not keep `data`: scribbling on it now must not change what it holds.
          buf.fill(0xee);
        } else if (op.kind === 'zero') {
          await dev(op.view).writeZeroes(op.offset, op.length, { noHole: op.noHole });
        } else {
          await dev(op.view).trim(op.offset, op.length);
        }
      } catch (err) {
        if (refused && errorCode(err) === 'EPERM') return () => {};
        return () => fail(`${op.kind} ${op.view} rejected with ${errorCode(err)}${refused ? ' (want EPERM)' : ''}: ${String(err)}`);
      }
      if (refused) return () => fail(`${op.kind} on the primary view after failover succeeded; want EPERM`);
      return () => {
        if (op.kind === 'write') model.write(op.view, op.offset, op.data);
        else model.zero(op.view, op.offset, op.length);
      };
    }
    case 'flush':
      await dev(op.view).flush();
      return () => {};
    default:
      throw new Error(`runRangeOp: ${op.kind} is exclusive`);
  }
}

async function runCheckpoint(ctx: RunContext, vol: Volume, op: Extract<Op, { kind: 'checkpoint' }>): Promise<void> {
  const { model } = ctx;
  // Without the racing writes the sealed epoch holds today's primary view.
  const beforeCkpt = op.racing.map((w) => model.read('primary', w.offset, w.length));
  // The writes are in flight when the checkpoint is requested: each may land in either epoch, not split.
  const writes = op.racing.map(async (w) => {
    const buf = misaligned(w.length, w.misalign, 0);
    buf.set(w.data);
    await vol.primary.write(buf, w.offset);
    buf.fill(0xee);
  });
  const epoch = vol.checkpoint();
  const [newEpoch] = await Promise.all([epoch, ...writes]);
  const sealed: WriteOp[] = [];
  const next: WriteOp[] = [];
  for (let i = 0; i < op.racing.length; i++) {
    const w = op.racing[i];
    // After the checkpoint S is empty, so the secondary view shows C over B: the sealed epoch.
    const seen = await readView(vol.secondary, w.offset, w.length);
    if (firstDifference(seen, w.data) < 0) sealed.push(w);
    else if (firstDifference(seen, beforeCkpt[i]) < 0) next.push(w);
    else {
      const atNew = firstDifference(seen, w.data);
      fail(
        `racing write ${describeOp(w)} was split by the checkpoint: the sealed epoch holds neither all old nor all new bytes\n` +
          `  new    ${hexAround(w.data, atNew)}\n  old    ${hexAround(beforeCkpt[i], atNew)}\n  actual ${hexAround(seen, atNew)} (index ${atNew})`,
      );
    }
  }
  for (const w of sealed) model.write('primary', w.offset, w.data);
  const want = model.checkpoint();
  for (const w of next) model.write('primary', w.offset, w.data);
  if (newEpoch !== want) fail(`checkpoint returned epoch ${newEpoch}, want ${want}`);
  if (op.racing.length === 0) {
    const s = vol.stats();
    if (s.bufferedBytes.primary !== 0 || s.bufferedBytes.secondary !== 0) {
      fail(`after a checkpoint bufferedBytes is ${JSON.stringify(s.bufferedBytes)}; want primary and secondary 0`);
    }
  }
}

function checkStats(ctx: RunContext, vol: Volume): void {
  const s = vol.stats();
  const { model } = ctx;
  const want = model.failedOver ? 'failed-over' : 'replicating';
  if (s.state !== want) fail(`stats().state is ${s.state}, want ${want}`);
  if (s.strategy !== ctx.strategy) fail(`stats().strategy is ${s.strategy}, want ${ctx.strategy}`);
  if (s.sizeBytes !== model.sizeBytes) fail(`stats().sizeBytes is ${s.sizeBytes}, want ${model.sizeBytes}`);
  if (!model.failedOver && s.epoch !== model.epoch) fail(`stats().epoch is ${s.epoch}, want ${model.epoch}`);
  if (s.durableEpoch > s.epoch) fail(`stats().durableEpoch ${s.durableEpoch} > epoch ${s.epoch}`);
  if (model.failedOver && s.failoverTarget !== model.failoverTarget) {
    fail(`stats().failoverTarget is ${s.failoverTarget}, want ${model.failoverTarget}`);
  }
}

async function compareWholeViews(ctx: RunContext, vol: Volume, what: string): Promise<void> {
  for (const view of ['primary', 'secondary'] as const) {
    const dev = view === 'primary' ? vol.primary : vol.secondary;
    expectBytes(`${what}: whole ${view} view`, ctx.model.read(view, 0, ctx.model.sizeBytes), await readView(dev, 0, dev.size));
  }
}

/** Runs one batch: an exclusive op alone, or range ops together; then checks what they returned. */
async function runBatch(ctx: RunContext, v: Volume, batch: readonly Op[]): Promise<void> {
  const head = batch[0];
  if (head.kind === 'checkpoint') {
    await runCheckpoint(ctx, v, head);
  } else if (head.kind === 'failover') {
    const kept = ctx.model.keptView(head.to);
    await v.failover({ to: head.to });
    ctx.model.failover(head.to);
    expectBytes(`failover --to ${head.to}: plain disk`, kept, ctx.model.committedBytes());
    // Both views serve the kept state at once; a FLUSH returns once it is in the backing file.
    await compareWholeViews(ctx, v, `after failover --to ${head.to}`);
    await v.secondary.flush();
    compareBackingFile(ctx, `after failover --to ${head.to} and a flush`, kept);
  } else if (head.kind === 'settle') {
    if (ctx.model.failedOver) {
      await v.secondary.flush();
      compareBackingFile(ctx, 'settle after failover (flush of the plain disk)', ctx.model.committedBytes());
    } else if (ctx.profile.backingIsCheckpointView) {
      await settle(v, ctx.model.epoch);
      compareBackingFile(ctx, `settle at epoch ${ctx.model.epoch}`, ctx.model.committedBytes());
    }
  } else {
    const checks = await Promise.all(batch.map((op) => runRangeOp(ctx, v, op)));
    for (const check of checks) check();
  }
}

function volumeOptions(ctx: { strategy: StrategyName; cfg: SeedConfig; backingPath: string; dataDir: string }): VolumeOptions {
  return {
    path: ctx.backingPath,
    dataDir: ctx.dataDir,
    sizeBytes: ctx.cfg.sizeBytes,
    strategy: ctx.strategy,
    blockBytes: ctx.cfg.blockBytes,
    ...(ctx.cfg.memoryBytesMax === undefined ? {} : { memoryBytesMax: ctx.cfg.memoryBytesMax }),
    ...(ctx.cfg.pressureRatio === undefined ? {} : { pressureRatio: ctx.cfg.pressureRatio }),
  };
}

/** One seed: open, run `opCount` ops in batches, close, check the backing file, reopen, check again. */
export async function runModelSeed(strategy: 'gannet' | 'colo', seed: number, opCount: number): Promise<void> {
  const rng = new Rng(seed);
  const cfg = pickConfig(rng, seed, opCount);
  const dir = mkdtempSync(join(scratchRoot, `gannet-model-${strategy}-${seed}-`));
  const backingPath = join(dir, 'disk.img');
  const dataDir = join(dir, 'meta');
  const ctx: RunContext = {
    seed,
    strategy,
    profile: profiles[strategy],
    cfg,
    backingPath,
    model: new VolumeModel(cfg.sizeBytes),
    log: [],
    opIndex: -1,
  };
  const spill = ctx.profile.spills && cfg.memoryBytesMax !== undefined;
  let vol: Volume | undefined;
  const errors: Error[] = [];
  let pressureEvents = 0;
  try {
    vol = await openVolume(volumeOptions({ strategy, cfg, backingPath, dataDir }));
    const v = vol;
    v.on('error', (err) => errors.push(err));
    v.on('pressure', () => pressureEvents++);
    checkStats(ctx, v);
    await compareWholeViews(ctx, v, 'fresh volume');

    let done = 0;
    let pending: Op | undefined;
    let spillSeen = false;
    while (done < opCount) {
      const batchMax = rng.chance(0.25) ? 1 : rng.between(2, batchOpsMax);
      const batch: Op[] = [];
      while (batch.length < batchMax && done + batch.length < opCount) {
        const failoverNow = cfg.failoverTo !== undefined && !ctx.model.failedOver && done + batch.length >= cfg.failoverAt!;
        const op: Op = pending ?? (failoverNow ? { kind: 'failover', to: cfg.failoverTo! } : genOp(rng, cfg, ctx.model.failedOver, spill));
        pending = undefined;
        if (exclusive(op)) {
          if (batch.length === 0) batch.push(op);
          else pending = op;
          break;
        }
        if (batch.some((b) => conflicts(b, op, ctx.model.failedOver))) {
          pending = op;
          break;
        }
        batch.push(op);
      }
      ctx.opIndex = done;
      ctx.log.push(
        ...batch.map((op, i) => `#${done + i}${batch.length > 1 ? ` [batch of ${batch.length}]` : ''} ${describeOp(op)}`),
      );
      await withDeadline(`batch at op #${done}`, runBatch(ctx, v, batch));
      if (errors.length > 0) fail(`volume emitted 'error': ${errors.map(String).join('; ')}`);
      checkStats(ctx, v);
      if (spill && !ctx.model.failedOver) {
        const bytes = ctx.model.dataBytes();
        if (bytes.primary + bytes.secondary > cfg.memoryBytesMax!) {
          if (v.stats().spilledBytes <= 0) {
            fail(`P+S hold ${bytes.primary + bytes.secondary} data bytes > memoryBytesMax ${cfg.memoryBytesMax} but spilledBytes is 0`);
          }
          if (pressureEvents === 0) fail(`buffers above memoryBytesMax and no 'pressure' event`);
          spillSeen = true;
        }
      }
      done += batch.length;
    }
    ctx.opIndex = opCount;
    ctx.log.push(`#${opCount} close, compare backing file, reopen`);
    if (spill && !spillSeen) fail('spill seed never buffered more than memoryBytesMax: the generator is too tame');

    await compareWholeViews(ctx, v, 'end of run');
    vol = undefined;
    await withDeadline('close', v.close());
    if (errors.length > 0) fail(`volume emitted 'error': ${errors.map(String).join('; ')}`);
    // A closed volume is at its checkpoint (every strategy: P and S are the replication protocol's to
    // keep) or is the plain disk after failover.
    compareBackingFile(ctx, 'after close', ctx.model.committedBytes());

    const reopened = await withDeadline('reopen', openVolume(volumeOptions({ strategy, cfg, backingPath, dataDir })));
    vol = reopened;
    reopened.on('error', (err) => errors.push(err));
    const s = reopened.stats();
    const wantState = ctx.model.failedOver ? 'failed-over' : 'replicating';
    if (s.state !== wantState) fail(`after reopen stats().state is ${s.state}, want ${wantState}`);
    if (!ctx.model.failedOver) {
      // P and S are not durable (the replication protocol protects them): a restart is at the checkpoint.
      if (s.durableEpoch !== ctx.model.epoch) {
        fail(`after reopen durableEpoch is ${s.durableEpoch}, want ${ctx.model.epoch}`);
      }
      const ckpt = ctx.model.committedBytes();
      for (const view of ['primary', 'secondary'] as const) {
        const dev = view === 'primary' ? reopened.primary : reopened.secondary;
        expectBytes(`after reopen: whole ${view} view (the checkpoint view)`, ckpt, await readView(dev, 0, dev.size));
      }
    } else {
      await compareWholeViews(ctx, reopened, 'after reopen (failed over)');
    }
    vol = undefined;
    await withDeadline('close after reopen', reopened.close());
    if (errors.length > 0) fail(`volume emitted 'error': ${errors.map(String).join('; ')}`);
  } catch (err) {
    const logPath = join(tmpdir(), `gannet-model-${strategy}-seed-${seed}.log`);
    writeFileSync(logPath, `${JSON.stringify(cfg)}\n${ctx.log.join('\n')}\n`);
    const tail = ctx.log.slice(-failureContextOps).join('\n');
    const msg = err instanceof Error ? err.message : String(err);
    throw new Error(
      `model-based ${strategy}: seed ${seed} failed at op #${ctx.opIndex}: ${msg}\n` +
        `config ${JSON.stringify(cfg)}\nreproduce: GANNET_SEED=${seed} npx vitest run packages/core/test/model-based.test.ts\n` +
        `full op list: ${logPath}\nlast ops:\n${tail}`,
      { cause: err },
    );
  } finally {
    // A hung volume may never close: bounded, and the failure above is what gets reported.
    if (vol) await withDeadline('close after a failure', vol.close()).catch(() => {});
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Registers the model-based tests of one strategy: one test per seed. `seedCount` overrides the default
 * run's seed count (GANNET_LONG and GANNET_SEED still win), for strategies too slow for 50 seeds in CI.
 */
export function runModelBasedTests(strategy: 'gannet' | 'colo', options: { seedCount?: number } = {}): void {
  const only = process.env.GANNET_SEED;
  const seedCount = long ? seedCountLong : (options.seedCount ?? seedCountDefault);
  const opCount = long ? opsPerSeedLong : opsPerSeedDefault;
  // GANNET_SEED=n reruns one seed; GANNET_SEED=a..b runs a range (to hunt beyond the default seeds).
  const range = only === undefined ? undefined : /^(\d+)\.\.(\d+)$/.exec(only);
  const seeds =
    only === undefined
      ? Array.from({ length: seedCount }, (_, i) => i + 1)
      : range
        ? Array.from({ length: Number(range[2]) - Number(range[1]) + 1 }, (_, i) => Number(range[1]) + i)
        : [Number(only)];
  if (seeds.length === 0 || seeds.some((s) => !Number.isSafeInteger(s))) {
    throw new Error(`GANNET_SEED must be an integer n or a range a..b, got ${only}`);
  }
  describe(`model-based: ${strategy} (${seeds.length} seeds x ${opCount} ops)`, () => {
    for (const seed of seeds) {
      it(`seed ${seed}`, () => runModelSeed(strategy, seed, opCount), seedTimeoutMs);
    }
  });
}
