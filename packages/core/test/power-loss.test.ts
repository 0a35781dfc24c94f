/**
 * Power loss: kill -9 keeps the page cache, so it cannot show that a durability claim rests on an fsync.
 * Goal: whatever the engine reported durable survives a power cut that loses everything not synced,
 * and nothing else pretends to. Method: the volume runs on SimStorage (sim-storage.ts), where unsynced
 * writes of the backing file, the journal and the metadata store sit in a volatile layer; a seeded run of
 * writes, zeroes, trims, checkpoints, waits for flushes, a failover and writes, FLUSHes and FUA writes
 * after it is cut by power losses at seeded points: between two requests, or at the n-th storage event
 * after one (so in the middle of a background flush, journal write or failover as often as not). After
 * each cut the volume is reopened on what survived and checked against a model:
 * - the reopened volume's epoch is above every epoch it handed out before;
 * - replicating: the durable epoch is at least every epoch a 'flushed' event reported, and the backing
 *   file holds that epoch's checkpoint view except inside the reported torn ranges; a failover whose
 *   switch was acknowledged but was not durable is reported lost, one that was durable is not lost;
 * - failed over: the kept state is whole (its journal is atomic), every byte a FLUSH or FUA acknowledged
 *   is there, and each other byte holds a value some unacknowledged write could have left.
 * Then the run goes on from what the volume holds (torn ranges are rewritten, as a resync would).
 * A failure prints its seed; GANNET_SEED=n reruns one, GANNET_LONG=1 runs far more.
 */
import { once } from 'node:events';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { FaultDevice, KiB, type BlockDevice } from '@gannet/block-device';
import { ReplicatedVolume, type FailoverTarget, type VolumeOptions } from '@gannet/core';
import { Rng, VolumeModel, firstDifference, hexAround, type ViewName } from './model.js';
import { SimStorage } from './sim-storage.js';

const long = process.env.GANNET_LONG === '1';
const seedCount = long ? 2000 : 100;
const opsPerSeed = long ? 5000 : 1000;
const cutsPerSeedMax = long ? 12 : 6;
/** A step that takes longer has hung (a lost wake-up): fail with the seed rather than at vitest's timeout. */
const stepMsMax = 20_000;
const scratchRoot = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();

class Failure extends Error {}
/** An armed power cut happened while a step was running. */
class CutFired extends Error {}

function fail(what: string): never {
  throw new Failure(what);
}

/** `work`, unless it hangs (a failure) or an armed cut happens first (CutFired). */
async function deadline<T>(storage: SimStorage, what: string, work: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Failure(`${what}: no answer after ${stepMsMax} ms`)), stepMsMax);
  });
  const cut = storage.whenFired.then(() => {
    throw new CutFired(what);
  });
  try {
    return await Promise.race([work, hang, cut]);
  } finally {
    clearTimeout(timer);
  }
}

function same(what: string, want: Uint8Array, got: Uint8Array): void {
  const at = firstDifference(want, got);
  if (at >= 0) fail(`${what}: first difference at byte ${at}: want ${hexAround(want, at)} got ${hexAround(got, at)}`);
}

interface PostWrite {
  readonly seq: number;
  readonly offset: number;
  /** null: zeroes. */
  readonly data: Uint8Array | null;
  readonly length: number;
}

/**
 * After failover: what a cut may leave. `base` holds what FLUSH and FUA acknowledged; a byte may also
 * hold what a later unacknowledged write put there (one not hidden by a FUA acknowledged after it).
 */
class AfterFailover {
  base: Uint8Array;
  writes: PostWrite[] = [];
  fua: { seq: number; offset: number; length: number }[] = [];
  seq = 0;

  constructor(kept: Uint8Array) {
    this.base = kept.slice();
  }

  wrote(offset: number, data: Uint8Array | null, length: number): PostWrite {
    const w = { seq: ++this.seq, offset, data: data?.slice() ?? null, length };
    this.writes.push(w);
    return w;
  }

  flushed(current: Uint8Array): void {
    this.base = current.slice();
    this.writes = [];
    this.fua = [];
  }

  fuaAcked(w: PostWrite): void {
    if (w.data === null) this.base.fill(0, w.offset, w.offset + w.length);
    else this.base.set(w.data, w.offset);
    this.fua.push({ seq: w.seq, offset: w.offset, length: w.length });
  }

  check(actual: Uint8Array): void {
    for (let i = 0; i < actual.length; i++) {
      if (actual[i] === this.base[i]) continue;
      let floor = 0;
      for (const f of this.fua) if (f.offset <= i && i < f.offset + f.length) floor = Math.max(floor, f.seq);
      const allowed = this.writes.some((w) => w.seq > floor && w.offset <= i && i < w.offset + w.length && (w.data === null ? 0 : w.data[i - w.offset]) === actual[i]);
      if (!allowed) fail(`after failover, byte ${i} is ${actual[i]}: neither acknowledged (${this.base[i]}) nor left by an unacknowledged write`);
    }
  }
}

async function runSeed(seed: number): Promise<void> {
  const rng = new Rng(seed);
  const sizeBytes = rng.pick([256 * KiB, 384 * KiB + 512, 512 * KiB]);
  const blockBytes = rng.pick([512, 4096]);
  const dir = mkdtempSync(join(scratchRoot, `gannet-power-${seed}-`));
  const options: VolumeOptions = { path: join(dir, 'disk.img'), dataDir: join(dir, 'meta'), sizeBytes, blockBytes };
  const storage = new SimStorage();
  const step = <T>(what: string, work: Promise<T>) => deadline(storage, what, work);
  const log: string[] = [];
  let model = new VolumeModel(sizeBytes, { keepEpochs: true });
  let durableSeen = 0;
  /** The highest epoch the volume handed out: a reopened volume must start above it. */
  let epochSeen = 0;
  let switchedTo: FailoverTarget | null = null;
  /** A failover asked for whose call a cut interrupted: the reopened volume may report it lost, or not. */
  let askedTo: FailoverTarget | null = null;
  let failoverAt = opsPerSeed;
  /** A lost failover stays reported until the next failover is durable. */
  let lostSeen = false;
  let failedOverOnce = false;
  let durableFailover = false;
  let after: AfterFailover | null = null;
  let vol!: ReplicatedVolume;

  const open = async () => {
    vol = await step('open', ReplicatedVolume.open(options, { storage }));
    const v = vol;
    v.on('error', () => undefined);
    v.on('flushed', ({ epoch }) => {
      if (v === vol) durableSeen = Math.max(durableSeen, epoch);
    });
    v.on('failover-durable', () => {
      if (v === vol) durableFailover = true;
    });
  };
  const view = (name: ViewName) => (name === 'primary' ? vol.primary : vol.secondary);
  const readWhole = async (name: ViewName) => {
    const buf = new Uint8Array(sizeBytes);
    await view(name).read(buf, 0);
    return buf;
  };
  const range = (): { offset: number; length: number } => {
    const length = rng.chance(0.5) ? rng.between(1, 3 * blockBytes) : rng.between(1, 24 * KiB);
    return { offset: rng.below(sizeBytes - length + 1), length };
  };
  const settle = async (epoch: number) => {
    while (vol.stats().durableEpoch < epoch) await step(`flush of epoch ${epoch}`, once(vol, 'flushed'));
  };

  /** The cut, the reopen on what survived, the checks, and the model from what the volume holds. */
  const cutAndCheck = async (alreadyCut: boolean) => {
    if (alreadyCut) storage.disarm();
    else storage.powerCut(rng);
    const old = vol;
    await step('close after the cut', old.close().catch(() => undefined));
    await open();
    const s = vol.stats();
    if (s.epoch <= epochSeen) fail(`reopened at epoch ${s.epoch}, but epoch ${epochSeen} was handed out before the cut`);
    log.push(`  reopened ${s.state} at epoch ${s.epoch}, durable ${s.durableEpoch}, torn ${JSON.stringify(s.tornRanges)} (cut: ${JSON.stringify(storage.lastCut)})`);
    if (s.state === 'failed-over') {
      if (switchedTo === null) fail('reopened failed over, but no failover had switched');
      if (s.failoverTarget !== switchedTo) fail(`reopened failed over to ${s.failoverTarget}, the run asked for ${switchedTo}`);
      const secondary = await readWhole('secondary');
      after!.check(secondary);
      same('failed over: primary view vs secondary view', secondary, await readWhole('primary'));
      await step('flush after reopen', vol.secondary.flush());
      same('failed over, flushed: backing file', secondary, storage.fileBytes(options.path as string)!);
      model = new VolumeModel(sizeBytes, { keepEpochs: true, start: { bytes: secondary, epoch: s.epoch, failedOverTo: switchedTo } });
      after = new AfterFailover(secondary);
      return;
    }
    if (s.state !== 'replicating') fail(`reopened ${s.state}`);
    if (s.lostFailover !== undefined) lostSeen = true;
    if (durableFailover) fail(`the failover to ${switchedTo} was reported durable, but the volume reopened replicating`);
    if (switchedTo !== null && s.lostFailover?.target !== switchedTo) {
      fail(`the failover to ${switchedTo} had switched, and the reopened volume does not report it lost`);
    }
    if (s.lostFailover !== undefined && switchedTo === null && askedTo === null && !lostSeen) fail(`reopened with a lost failover ${JSON.stringify(s.lostFailover)}, none was asked for`);
    const d = s.durableEpoch;
    if (d < durableSeen) fail(`durable epoch ${d} after the cut, but epoch ${durableSeen} was reported flushed`);
    const want = model.checkpointViewAt(d);
    const file = storage.fileBytes(options.path as string)!;
    for (let i = 0; i < sizeBytes; i++) {
      if (file[i] === want[i]) continue;
      if (!s.tornRanges.some((t) => t.offset <= i && i < t.offset + t.length)) {
        fail(`backing byte ${i} is ${file[i]}, epoch ${d} has ${want[i]}, outside the torn ranges ${JSON.stringify(s.tornRanges)}`);
      }
    }
    same('replicating after the cut: secondary view vs backing file', file, await readWhole('secondary'));
    // What a primary's resync does: the torn ranges get the checkpoint's bytes again, and a checkpoint.
    for (const t of s.tornRanges) await vol.primary.write(want.subarray(t.offset, t.offset + t.length), t.offset);
    const epoch = await vol.checkpoint();
    epochSeen = Math.max(epochSeen, epoch);
    await settle(epoch);
    if (vol.stats().tornRanges.length > 0) fail(`torn ranges remain after they were rewritten: ${JSON.stringify(vol.stats().tornRanges)}`);
    model = new VolumeModel(sizeBytes, { keepEpochs: true, start: { bytes: want, epoch } });
    durableSeen = epoch;
    switchedTo = null;
    askedTo = null;
    durableFailover = false;
    after = null;
  };

  try {
    await open();
    const cuts = new Set(Array.from({ length: rng.between(1, cutsPerSeedMax) }, () => rng.below(opsPerSeed)));
    let armed = false;
    // One failover per run, late enough that most of the run exercises the flush pipeline.
    failoverAt = rng.between(Math.floor(opsPerSeed * 0.4), Math.floor(opsPerSeed * 0.95));
    for (let op = 0; op < opsPerSeed; op++) {
      if (cuts.has(op) && !armed) {
        if (rng.chance(0.5)) {
          log.push(`#${op} power cut`);
          await cutAndCheck(false);
          continue;
        }
        const events = rng.between(1, 60);
        log.push(`#${op} power cut armed for the storage event ${events} from here`);
        storage.armCut(rng, events);
        armed = true;
      }
      try {
        await runOp(op);
      } catch (err) {
        if (!(err instanceof CutFired) && !storage.fired) throw err;
      }
      if (armed && storage.fired) {
        log.push(`#${op} the armed power cut happened`);
        armed = false;
        await cutAndCheck(true);
      }
    }
    storage.disarm();
    log.push('close');
    await step('close', vol.close());
    await open();
    // Replicating, a reopened volume is at its checkpoint (the secondary's writes are gone); failed over, it is the disk.
    const want = model.failedOver ? model.read('secondary', 0, sizeBytes) : model.committedBytes();
    same('reopened after close: secondary view', want, await readWhole('secondary'));
    await step('final close', vol.close());
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err);
    throw new Error(
      `power loss: seed ${seed} failed: ${msg}\nreproduce: GANNET_SEED=${seed} npx vitest run packages/core/test/power-loss.test.ts\nlast steps:\n${log.slice(-30).join('\n')}`,
      { cause: err },
    );
  } finally {
    await vol?.close().catch(() => undefined);
    rmSync(dir, { recursive: true, force: true });
  }

  async function runOp(op: number): Promise<void> {
    const r = rng.below(100);
    if (!model.failedOver) {
      const name: ViewName = rng.chance(0.5) ? 'primary' : 'secondary';
      if (r < 45) {
        const { offset, length } = range();
        const data = rng.fill(new Uint8Array(length));
        log.push(`#${op} write ${name} ${offset}+${length}`);
        await step('write', view(name).write(data, offset));
        model.write(name, offset, data);
      } else if (r < 55) {
        const { offset, length } = range();
        const trim = rng.chance(0.5);
        log.push(`#${op} ${trim ? 'trim' : 'zero'} ${name} ${offset}+${length}`);
        await step('zero', trim ? view(name).trim(offset, length) : view(name).writeZeroes(offset, length, { noHole: rng.chance(0.3) }));
        model.zero(name, offset, length);
      } else if (r < 70) {
        log.push(`#${op} checkpoint`);
        const epoch = await vol.checkpoint();
        epochSeen = Math.max(epochSeen, epoch);
        if (epoch !== model.checkpoint()) fail(`checkpoint returned ${epoch}, the model is at ${model.epoch}`);
      } else if (r < 78) {
        log.push(`#${op} settle`);
        await settle(model.epoch);
      } else if (op >= failoverAt && !failedOverOnce) {
        failedOverOnce = true;
        const to = rng.pick(['secondary', 'checkpoint', 'primary'] as const);
        log.push(`#${op} failover --to ${to}`);
        await step('failover', vol.failover({ to, force: true }));
        switchedTo = to;
        model.failover(to);
        after = new AfterFailover(model.committedBytes());
      } else {
        const { offset, length } = range();
        const got = new Uint8Array(length);
        await step('read', view(name).read(got, offset));
        same(`#${op} read ${name} ${offset}+${length}`, model.read(name, offset, length), got);
      }
    } else {
      if (r < 45) {
        const { offset, length } = range();
        const data = rng.fill(new Uint8Array(length));
        const fua = rng.chance(0.15);
        log.push(`#${op} write${fua ? ' fua' : ''} secondary ${offset}+${length}`);
        const w = after!.wrote(offset, data, length);
        await step('write', vol.secondary.write(data, offset, fua ? { fua } : undefined));
        model.write('secondary', offset, data);
        if (fua) after!.fuaAcked(w);
      } else if (r < 55) {
        const { offset, length } = range();
        log.push(`#${op} zero secondary ${offset}+${length}`);
        after!.wrote(offset, null, length);
        await step('zero', vol.secondary.writeZeroes(offset, length));
        model.zero('secondary', offset, length);
      } else if (r < 70) {
        log.push(`#${op} flush`);
        await step('flush', vol.secondary.flush());
        after!.flushed(model.committedBytes());
      } else {
        const { offset, length } = range();
        const got = new Uint8Array(length);
        await step('read', vol.secondary.read(got, offset));
        same(`#${op} read after failover ${offset}+${length}`, model.read('secondary', offset, length), got);
      }
    }
  }
}

const only = process.env.GANNET_SEED;
const seeds = only === undefined ? Array.from({ length: seedCount }, (_, i) => i + 1) : [Number(only)];
describe(`power loss (${seeds.length} seeds x ${opsPerSeed} ops, power cuts)`, () => {
  for (const seed of seeds) it(`seed ${seed}`, () => runSeed(seed), long ? 600_000 : 60_000);
});

/** The worst cut: every unsynced write of every file and store is lost, no entry is kept by chance. */
class LoseEverything extends Rng {
  constructor() {
    super(1);
  }
  override below(): number {
    return 0;
  }
  override chance(): boolean {
    return false;
  }
  override pick<T>(items: readonly T[]): T {
    return items[0];
  }
}

/** SimStorage whose backing file, while `holding`, holds every write: a failover's journal stays unapplied. */
class HeldBacking extends SimStorage {
  holding = true;
  override async openBacking(path: string, sizeBytes: number, options: { create: boolean }): Promise<BlockDevice> {
    const device = new FaultDevice(await super.openBacking(path, sizeBytes, options));
    if (this.holding) device.hold('write');
    return device;
  }
}

describe('a durable failover needs nothing unsynced', () => {
  it('survives a cut that loses every unsynced write, taken before its journal reached the backing file', async () => {
    const dir = mkdtempSync(join(scratchRoot, 'gannet-powerloss-journal-'));
    try {
      const options: VolumeOptions = { path: join(dir, 'disk.img'), dataDir: join(dir, 'meta'), sizeBytes: 256 * KiB };
      const storage = new HeldBacking();
      const volume = await ReplicatedVolume.open(options, { storage });
      volume.on('error', () => undefined);
      const data = new Rng(7).fill(new Uint8Array(64 * KiB));
      await volume.secondary.write(data, 16 * KiB);
      const durable = once(volume, 'failover-durable');
      await volume.failover({ to: 'secondary' });
      await durable;
      storage.powerCut(new LoseEverything());
      storage.holding = false;
      const reopened = await ReplicatedVolume.open(options, { storage });
      try {
        expect(reopened.stats().state).toBe('failed-over');
        const got = new Uint8Array(64 * KiB);
        await reopened.secondary.read(got, 16 * KiB);
        expect(firstDifference(data, got), 'the kept bytes after the cut').toBe(-1);
      } finally {
        await reopened.close();
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
