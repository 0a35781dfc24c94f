/**
 * Goal: a volume killed with SIGKILL in the middle of a flush or a failover reopens consistent: either at
 * its last durable checkpoint (backing file == the model's checkpoint view at durableEpoch, except inside
 * stats().tornRanges, which must cover every byte that differs and nothing outside the epochs being
 * flushed), with a failover it had switched to reported lost and nothing written after it visible; or
 * fully failed over (the views, and after a FLUSH the backing file, == the kept view with every write
 * after the failover that a FLUSH acknowledged, and each other one either wholly there or not at all),
 * and stats().state says which.
 *
 * Method: crash-child.mjs runs a seeded workload on the built package and, in its critical phase (the
 * final flush, or the failover), ticks in lockstep with this test; we kill it on a chosen tick, so kill
 * points are counted in events, not wall-clock sleeps. One run per scenario first goes to completion, to
 * count the ticks a phase takes (and to check the completed state); every kill then lands on a tick
 * drawn from that span (a seed that finishes sooner is rerun, killed inside the span it took). The
 * volume is reopened in this process and checked against VolumeModel.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openVolume, type FailoverTarget } from '@gannet/core';
import { Rng, VolumeModel, differingRanges, firstDifference, hexAround } from './model.js';
import { crashPlan, crashScenarios, crashVolumeOptions, type CrashScenario as Scenario } from './crash-child.mjs';

const long = process.env.GANNET_LONG === '1';
/** Kill points in one run: six per scenario by default, and most must land inside the phase. */
const killCount = long ? 200 : 24;
const midPhaseKillsMin = long ? 160 : 20;
/** Runs per kill point when the child keeps finishing its phase before the chosen tick. */
const killAttemptsMax = 3;
/** Bound on one child's life, from spawn to reaped. */
const childTimeoutMs = 30_000;
const seedBase = Number(process.env.GANNET_SEED ?? 1000);

const coreDist = fileURLToPath(new URL('../dist/index.js', import.meta.url));
const childPath = fileURLToPath(new URL('./crash-child.mjs', import.meta.url));

interface ChildRun {
  readonly lines: string[];
  readonly stderr: string;
  /** Ticks answered before the kill. */
  readonly ticks: number;
  /** Killed on a tick inside the critical phase, rather than after "done". */
  readonly midPhase: boolean;
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
}

const children = new Set<ChildProcess>();

/** Runs the child, killing it on tick `killAtTick` (or once it prints "done"); resolves once reaped. */
function runChild(dir: string, seed: number, scenario: Scenario, killAtTick: number | undefined): Promise<ChildRun> {
  const child = spawn(process.execPath, [childPath, dir, String(seed), scenario], { stdio: ['pipe', 'pipe', 'pipe'] });
  children.add(child);
  const lines: string[] = [];
  let stderr = '';
  let ticks = 0;
  let midPhase = false;
  let timedOut = false;
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (chunk: string) => {
    stderr = (stderr + chunk).slice(-64 * 1024);
  });
  // The child may be dead before it reads its answer; a broken pipe is expected, not a failure.
  child.stdin!.on('error', () => {});
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, childTimeoutMs);
  createInterface({ input: child.stdout! }).on('line', (line) => {
    if (child.exitCode !== null || child.signalCode !== null || child.killed) return;
    lines.push(line);
    if (line.startsWith('tick ')) {
      if (killAtTick !== undefined && ticks >= killAtTick) {
        midPhase = true;
        child.kill('SIGKILL');
        return;
      }
      ticks++;
      child.stdin!.write('\n');
    } else if (line === 'done') {
      child.kill('SIGKILL');
    }
  });
  return new Promise((resolve, reject) => {
    child.once('error', (err) => {
      clearTimeout(timer);
      children.delete(child);
      reject(err);
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      children.delete(child);
      const run: ChildRun = { lines, stderr, ticks, midPhase, code, signal };
      if (timedOut) reject(new Error(`crash child (seed ${seed}, ${scenario}) still running after ${childTimeoutMs} ms\n${describeRun(run)}`));
      else if (signal !== 'SIGKILL') reject(new Error(`crash child (seed ${seed}, ${scenario}) exited on its own\n${describeRun(run)}`));
      else resolve(run);
    });
  });
}

function describeRun(run: ChildRun): string {
  return (
    `exit code=${run.code} signal=${run.signal}, ${run.ticks} ticks answered, killed ${run.midPhase ? 'mid-phase' : 'after done'}\n` +
    `--- stdout (last 30 lines)\n${run.lines.slice(-30).join('\n')}\n--- stderr\n${run.stderr}`
  );
}

interface Outcome {
  readonly state: 'replicating' | 'failed-over';
  readonly durableEpoch: number;
  readonly tornBytes: number;
}

/** Reopens the killed volume in this process and checks it against the model of the acknowledged plan. */
async function verify(dir: string, seed: number, scenario: Scenario, run: ChildRun): Promise<Outcome> {
  const p = crashPlan(seed, scenario);
  const model = new VolumeModel(p.sizeBytes, { keepEpochs: true });
  // Which byte ranges each epoch's primary buffer wrote: a torn range must lie inside the flushed ones.
  const primaryWrites: { epoch: number; offset: number; length: number }[] = [];
  let failoverTo: FailoverTarget | undefined;
  let kept: Uint8Array | undefined;
  let after: { offset: number; data: Uint8Array }[] = [];
  for (const step of p.steps) {
    if (step.kind === 'write') {
      model.write(step.view, step.offset, step.data);
      if (step.view === 'primary') primaryWrites.push({ epoch: model.epoch, offset: step.offset, length: step.data.length });
    } else if (step.kind === 'zero') {
      model.zero(step.view, step.offset, step.length);
      if (step.view === 'primary') primaryWrites.push({ epoch: model.epoch, offset: step.offset, length: step.length });
    } else if (step.kind === 'checkpoint' || step.kind === 'final-flush') {
      model.checkpoint();
    } else if (step.kind === 'failover') {
      failoverTo = step.to;
      kept = model.keptView(step.to);
      after = step.after;
    }
  }
  const acked = run.lines.filter((l) => l.startsWith('checkpoint ')).map((l) => Number(l.split(' ')[1]));
  expect(acked, 'checkpoint epochs acknowledged by the child').toEqual(acked.map((_, i) => i + 1));
  expect(acked.length, 'the child reached its critical phase, so every checkpoint was acknowledged').toBe(model.epoch);
  const flushed = Math.max(0, ...run.lines.filter((l) => l.startsWith('flushed ')).map((l) => Number(l.split(' ')[1])));
  const failingOver = run.lines.some((l) => l.startsWith('failing-over '));
  const switched = run.lines.some((l) => l.startsWith('failed-over '));
  const durable = run.lines.some((l) => l.startsWith('durable '));
  const postFlushed = run.lines.includes('post-flushed');

  const opts = crashVolumeOptions(dir, p);
  const vol = await openVolume(opts);
  try {
    const s = vol.stats();
    const file = readFileSync(opts.path);
    expect(file.length, 'backing file size').toBe(p.sizeBytes);
    const readWhole = async (view: 'primary' | 'secondary'): Promise<Uint8Array> => {
      const buf = new Uint8Array(p.sizeBytes).fill(0xa5);
      await (view === 'primary' ? vol.primary : vol.secondary).read(buf, 0);
      return buf;
    };
    const sameBytes = (what: string, want: Uint8Array, got: Uint8Array): void => {
      const at = firstDifference(want, got);
      if (at >= 0) throw new Error(`${what}: first difference at byte ${at}: want ${hexAround(want, at)} got ${hexAround(got, at)}`);
    };

    if (s.state === 'failed-over') {
      if (!failingOver) throw new Error(`reopened failed-over, but the child never started a failover`);
      expect(s.failoverTarget).toBe(failoverTo);
      expect(s.tornRanges, 'a failed-over volume has no torn ranges').toEqual([]);
      // The kept view, then each write after failover: one a FLUSH acknowledged is there, any other one is
      // wholly there or wholly absent (a plain disk may lose unflushed writes, never tear a block).
      const want = kept!.slice();
      const secondary = await readWhole('secondary');
      for (const w of after) {
        const at = secondary.subarray(w.offset, w.offset + w.data.length);
        const landed = firstDifference(w.data, at) < 0;
        if (postFlushed && !landed) throw new Error(`a write after failover at ${w.offset} was acknowledged by a FLUSH and is gone`);
        if (landed) want.set(w.data, w.offset);
      }
      sameBytes('failed over: secondary view', want, secondary);
      sameBytes('failed over: primary view', want, await readWhole('primary'));
      await vol.secondary.flush();
      sameBytes(`failed over to ${failoverTo}, flushed: backing file`, want, readFileSync(opts.path));
      return { state: 'failed-over', durableEpoch: s.durableEpoch, tornBytes: 0 };
    }
    if (s.state !== 'replicating') throw new Error(`reopened in state ${s.state}; want replicating or failed-over`);
    if (durable) throw new Error(`the failover to ${failoverTo} was durable, but the volume reopened replicating`);
    if (switched && s.lostFailover?.target !== failoverTo) {
      throw new Error(`the volume switched to ${failoverTo} before the kill and reopened replicating without reporting the failover lost`);
    }
    const d = s.durableEpoch;
    if (d < flushed || d > model.epoch) throw new Error(`durableEpoch ${d}: want between ${flushed} (last 'flushed' seen) and ${model.epoch}`);
    if (flushed === model.epoch) expect(s.tornRanges, 'every epoch was flushed: nothing may be torn').toEqual([]);

    const want = model.checkpointViewAt(d);
    const torn = s.tornRanges;
    for (const diff of differingRanges(want, file)) {
      const covered = torn.some((t) => t.offset <= diff.offset && diff.offset + diff.length <= t.offset + t.length);
      if (!covered) {
        throw new Error(
          `backing differs from epoch ${d} at ${diff.offset}+${diff.length}, outside tornRanges ${JSON.stringify(torn)}: ` +
            `want ${hexAround(want, diff.offset)} got ${hexAround(file, diff.offset)}`,
        );
      }
    }
    // Torn ranges may only be where a sealed epoch after `d` wrote (rounded out to blocks): claiming the
    // whole disk torn would make the check above empty, and the unsealed buffers never reach the file
    // before a failover's journal is complete.
    const block = p.blockBytes;
    const flushable = primaryWrites
      .filter((w) => w.epoch >= d && w.epoch < model.epoch)
      .map((w) => ({ from: Math.floor(w.offset / block) * block, to: Math.min(p.sizeBytes, Math.ceil((w.offset + w.length) / block) * block) }));
    for (const t of torn) {
      for (let b = t.offset; b < t.offset + t.length; b += block) {
        if (!flushable.some((f) => f.from <= b && b < f.to)) {
          throw new Error(`torn range ${t.offset}+${t.length} covers block at ${b}, which no epoch after ${d} wrote`);
        }
      }
    }
    // Nothing but the backing file is left: both views read it.
    sameBytes('replicating after crash: primary view vs backing file', file, await readWhole('primary'));
    sameBytes('replicating after crash: secondary view vs backing file', file, await readWhole('secondary'));
    return { state: 'replicating', durableEpoch: d, tornBytes: torn.reduce((n, t) => n + t.length, 0) };
  } finally {
    await vol.close();
  }
}

describe(`crash: SIGKILL during flush and failover (${killCount} kills)`, () => {
  const dirs: string[] = [];
  const freshDir = (): string => {
    const dir = mkdtempSync(join(tmpdir(), 'gannet-crash-'));
    dirs.push(dir);
    return dir;
  };
  const ticksPerScenario = new Map<Scenario, number>();

  beforeAll(() => {
    if (!existsSync(coreDist)) {
      throw new Error(`${coreDist} is missing: the crash child runs the built package; run \`npx -y pnpm@9 run build\` first`);
    }
  });

  afterAll(async () => {
    for (const child of children) child.kill('SIGKILL');
    await Promise.all([...children].map((c) => new Promise((resolve) => c.once('close', resolve))));
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  });

  for (const scenario of crashScenarios) {
    it(`${scenario}: completes, and the completed state survives kill -9`, async () => {
      const dir = freshDir();
      const run = await runChild(dir, seedBase, scenario, undefined);
      expect(run.lines, describeRun(run)).toContain('done');
      ticksPerScenario.set(scenario, run.ticks);
      const outcome = await verify(dir, seedBase, scenario, run).catch((err: unknown) => {
        throw new Error(`seed ${seedBase} ${scenario} (killed after done): ${String(err)}\n${describeRun(run)}`, { cause: err });
      });
      expect(outcome.state).toBe(scenario === 'flush' ? 'replicating' : 'failed-over');
    });
  }

  it(`kill -9 at ${killCount} points inside flushes and failovers`, async () => {
    const rng = new Rng(seedBase);
    const tally = new Map<string, number>();
    let midPhase = 0;
    for (let i = 0; i < killCount; i++) {
      const scenario = crashScenarios[i % crashScenarios.length];
      const seed = seedBase + 1 + i;
      let span = ticksPerScenario.get(scenario);
      if (span === undefined) throw new Error(`no calibration run for ${scenario} (did it fail?)`);
      // A seed's phase may be shorter than the calibration run's: when the child finishes before the
      // chosen tick, that run is checked too (a completed phase) and the seed is run again, killed
      // inside the span it actually took.
      for (let attempt = 0; attempt < killAttemptsMax; attempt++) {
        const killAtTick = rng.below(Math.max(1, span));
        const dir = freshDir();
        const run = await runChild(dir, seed, scenario, killAtTick);
        const outcome = await verify(dir, seed, scenario, run).catch((err: unknown) => {
          throw new Error(
            `crash: seed ${seed} ${scenario} killed at tick ${killAtTick} (of ~${span}): ${String(err)}\n` +
              `reproduce: GANNET_SEED=${seedBase} npx vitest run packages/core/test/crash.test.ts\n${describeRun(run)}`,
            { cause: err },
          );
        });
        rmSync(dir, { recursive: true, force: true });
        const key = `${scenario} -> ${outcome.state}${outcome.tornBytes > 0 ? ' (torn)' : ''}${run.midPhase ? '' : ' (completed)'}`;
        tally.set(key, (tally.get(key) ?? 0) + 1);
        if (run.midPhase) {
          midPhase++;
          break;
        }
        if (run.ticks === 0) break;
        span = run.ticks;
      }
    }
    console.log(`crash outcomes: ${JSON.stringify(Object.fromEntries(tally))}; ${midPhase}/${killCount} kills mid-phase`);
    expect(midPhase, 'kills that landed inside a flush or failover').toBeGreaterThanOrEqual(midPhaseKillsMin);
  }, long ? 1_800_000 : 240_000);
});
