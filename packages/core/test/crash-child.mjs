/**
 * Child program of crash.test.ts: opens a volume from the built package (dist), runs a deterministic
 * seeded workload, and reports on stdout what was acknowledged, one line per event:
 *   checkpoint <epoch>      checkpoint() resolved
 *   flushed <epoch>         'flushed' event
 *   flushing <epoch>        the final checkpoint resolved; the flush of <epoch> is in progress
 *   failing-over <to>       failover({ to }) is about to be called (everything before it was acknowledged)
 *   failed-over <to>        failover() resolved: both views serve the kept state
 *   durable <to>            'failover-durable' event: the kept state is durable (its journal committed)
 *   post-write <i>          the i-th write after failover (to the secondary view) resolved
 *   post-flushed            a FLUSH after those writes resolved: they and the kept state are on disk
 *   tick <n>                one step of the critical phase (the parent answers each with a line on stdin)
 *   done                    the critical phase finished; the child waits to be killed
 * In the critical phase (the last flush, or the failover) the child and the parent go in lockstep: the
 * child prints a tick and waits for the parent's answer while the volume's I/O carries on, so the parent
 * kills it (SIGKILL) on the Nth tick, a point counted in events rather than wall-clock time.
 *
 * The workload is `crashPlan(seed, scenario)`, exported so the parent builds the same model.
 * Usage: node crash-child.mjs <dir> <seed> <scenario>
 */
import { pathToFileURL } from 'node:url';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { Rng } from '@gannet/core';

const KiB = 1024;
const MiB = 1024 * KiB;

export const crashScenarios = ['flush', 'failover-secondary', 'failover-checkpoint', 'failover-primary'];
export const crashVolumeBytes = 4 * MiB;
export const crashBlockBytes = 4096;
/** Bound on critical-phase ticks: a flush or failover of a few MiB takes far fewer. */
export const ticksMax = 100_000;

const rng = (seed) => new Rng(seed);

function write(r, view, lengthMax) {
  const length = r.between(1, lengthMax);
  const offset = r.below(crashVolumeBytes - length + 1);
  const data = new Uint8Array(length);
  const fill = r.between(1, 255);
  const stamp = r.u32();
  // A fill byte plus a 4-byte stamp every 512 bytes: distinct per write, cheap to generate.
  data.fill(fill);
  for (let i = 0; i + 4 <= length; i += 512) {
    data[i] = stamp & 0xff;
    data[i + 1] = (stamp >>> 8) & 0xff;
    data[i + 2] = (stamp >>> 16) & 0xff;
    data[i + 3] = stamp >>> 24;
  }
  return { kind: 'write', view, offset, data };
}

/** A zero or trim over a run of whole blocks (a quarter of the disk or more, sometimes), ragged ends at times. */
function zeroRange(r, view) {
  const blocks = crashVolumeBytes / crashBlockBytes;
  const count = r.chance(0.3) ? r.between(blocks / 4, blocks) : r.between(1, blocks / 4);
  const first = r.below(blocks - count + 1);
  const offset = first * crashBlockBytes + (r.chance(0.3) ? r.between(1, 511) : 0);
  const end = (first + count) * crashBlockBytes - (r.chance(0.3) ? r.between(1, 511) : 0);
  return { kind: 'zero', view, offset, length: end - offset, trim: r.chance(0.5) };
}

/** Share of the steps of an epoch that are zero ranges rather than writes. */
const zeroChance = 0.08;

function mutation(r, view, lengthMax) {
  return r.chance(zeroChance) ? zeroRange(r, view) : write(r, view, lengthMax);
}

/**
 * Steps: {kind:'write', view, offset, data} | {kind:'zero', view, offset, length, trim} | {kind:'checkpoint'}
 * | {kind:'wait-flushed'} and, last, {kind:'final-flush'} (a checkpoint whose flush is the critical phase)
 * or {kind:'failover', to, after} (`after`: whole-block writes to the secondary view once failed over,
 * then a FLUSH).
 */
export function crashPlan(seed, scenario) {
  if (!crashScenarios.includes(scenario)) throw new Error(`crashPlan: unknown scenario ${scenario}`);
  const r = rng(seed);
  const steps = [];
  const rounds = r.between(1, 3);
  for (let round = 0; round < rounds; round++) {
    const writes = r.between(10, 40);
    for (let i = 0; i < writes; i++) steps.push(mutation(r, r.chance(0.6) ? 'primary' : 'secondary', 64 * KiB));
    steps.push({ kind: 'checkpoint' });
    if (r.chance(0.5)) steps.push({ kind: 'wait-flushed' });
  }
  // The last epoch is big and scattered, so its flush (or the failover's) has many pieces to interrupt.
  const lastWrites = r.between(40, 80);
  for (let i = 0; i < lastWrites; i++) steps.push(mutation(r, r.chance(0.6) ? 'primary' : 'secondary', 96 * KiB));
  // Both buffers end with a zero range: the final flush, and the failover's journal (of the kept buffer or
  // of this epoch once sealed), have zero ranges to write.
  steps.push(zeroRange(r, 'primary'), zeroRange(r, 'secondary'));
  if (scenario === 'flush') {
    steps.push({ kind: 'final-flush' });
  } else {
    // Sometimes a sealed epoch is still being flushed when the failover starts.
    if (r.chance(0.5)) {
      steps.push({ kind: 'checkpoint' });
      const trailing = r.between(5, 20);
      for (let i = 0; i < trailing; i++) steps.push(mutation(r, r.chance(0.5) ? 'primary' : 'secondary', 64 * KiB));
    }
    const after = [];
    const blocks = crashVolumeBytes / crashBlockBytes;
    const used = new Set();
    for (let i = r.between(1, 6); i > 0; i--) {
      const block = r.below(blocks);
      if (used.has(block)) continue;
      used.add(block);
      const data = new Uint8Array(crashBlockBytes).fill(r.between(1, 255));
      new DataView(data.buffer).setUint32(0, r.u32());
      after.push({ offset: block * crashBlockBytes, data });
    }
    steps.push({ kind: 'failover', to: scenario.slice('failover-'.length), after });
  }
  return { sizeBytes: crashVolumeBytes, blockBytes: crashBlockBytes, steps };
}

export function crashVolumeOptions(dir, plan) {
  return { path: join(dir, 'disk.img'), dataDir: join(dir, 'meta'), sizeBytes: plan.sizeBytes, blockBytes: plan.blockBytes };
}

async function main(argv) {
  const [dir, seedText, scenario] = argv;
  const seed = Number(seedText);
  if (!dir || !Number.isSafeInteger(seed) || !crashScenarios.includes(scenario)) {
    throw new Error('usage: crash-child.mjs <dir> <seed> <scenario>');
  }
  const { openVolume } = await import('@gannet/core');
  const plan = crashPlan(seed, scenario);
  const say = (line) => process.stdout.write(`${line}\n`);

  const answers = createInterface({ input: process.stdin });
  const lines = answers[Symbol.asyncIterator]();
  const awaitAnswer = async () => {
    const { done } = await lines.next();
    if (done) throw new Error('stdin closed during the critical phase');
  };

  const vol = await openVolume(crashVolumeOptions(dir, plan));
  let durable = vol.stats().durableEpoch;
  const flushWaiters = [];
  vol.on('flushed', ({ epoch }) => {
    say(`flushed ${epoch}`);
    durable = Math.max(durable, epoch);
    for (const w of flushWaiters.splice(0)) w();
  });
  vol.on('error', (err) => {
    process.stderr.write(`volume error: ${err.stack ?? err}\n`);
    process.exit(3);
  });
  const waitFlushed = async (epoch) => {
    while (durable < epoch) await new Promise((resolve) => flushWaiters.push(resolve));
  };

  /** Runs `work` while ticking in lockstep with the parent, then reports `doneLine`. */
  const critical = async (work) => {
    let settled = false;
    let failure;
    const running = work().then(
      () => (settled = true),
      (err) => {
        settled = true;
        failure = err;
      },
    );
    for (let n = 0; !settled; n++) {
      if (n >= ticksMax) throw new Error(`critical phase still running after ${ticksMax} ticks`);
      say(`tick ${n}`);
      await awaitAnswer();
    }
    await running;
    if (failure) throw failure;
  };

  let epoch = vol.stats().epoch;
  for (const step of plan.steps) {
    switch (step.kind) {
      case 'write':
        await (step.view === 'primary' ? vol.primary : vol.secondary).write(step.data, step.offset);
        break;
      case 'zero': {
        const view = step.view === 'primary' ? vol.primary : vol.secondary;
        await (step.trim ? view.trim(step.offset, step.length) : view.writeZeroes(step.offset, step.length));
        break;
      }
      case 'checkpoint':
        epoch = await vol.checkpoint();
        say(`checkpoint ${epoch}`);
        break;
      case 'wait-flushed':
        await waitFlushed(epoch);
        break;
      case 'final-flush':
        epoch = await vol.checkpoint();
        say(`checkpoint ${epoch}`);
        say(`flushing ${epoch}`);
        await critical(() => waitFlushed(epoch));
        break;
      case 'failover':
        say(`failing-over ${step.to}`);
        vol.on('failover-durable', () => say(`durable ${step.to}`));
        await critical(async () => {
          await vol.failover({ to: step.to });
          say(`failed-over ${step.to}`);
          for (const [i, w] of step.after.entries()) {
            await vol.secondary.write(w.data, w.offset);
            say(`post-write ${i}`);
          }
          await vol.secondary.flush();
          say('post-flushed');
        });
        break;
      default:
        throw new Error(`unknown step ${step.kind}`);
    }
  }
  say('done');
  // Stay up until the parent kills us: a kill after "done" checks the completed state too.
  for (;;) {
    const { done } = await lines.next();
    if (done) break;
  }
  process.exit(0);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).catch((err) => {
    process.stderr.write(`crash-child: ${err?.stack ?? err}\n`);
    process.exit(2);
  });
}
