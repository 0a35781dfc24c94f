import type { BlockDevice } from 'nbd-server-js';
import type { Profile } from './profiles.js';
import { LatencyRecorder } from './stats.js';
import { Rng } from '@gannet/core';
import { MiB } from '@gannet/block-device';

/**
 * The workload generator and the stream driver. A stream is the op sequence one VM issues; with the
 * same profile and seed, two streams are identical (active-active: both VMs run the same workload),
 * which is what the harness sends to `<vol>/primary` and `<vol>/secondary` at the same time.
 */


export type WorkloadOp =
  | { readonly kind: 'read' | 'write'; readonly offset: number; readonly length: number }
  | { readonly kind: 'flush' };

/** Write payloads are slices of one random pattern of this size per stream (no per-op allocation). */
export const patternBytes = MiB;

export class WorkloadGenerator {
  readonly profile: Profile;
  /** Offsets stay in [0, regionBytes). */
  readonly regionBytes: number;
  private readonly rng: Rng;
  private cursor = 0;
  private writesSinceFlush = 0;

  constructor(profile: Profile, volumeBytes: number, seed: number) {
    this.profile = profile;
    const region = Math.min(profile.regionBytes, volumeBytes);
    this.regionBytes = region - (region % profile.requestBytes);
    if (this.regionBytes < profile.requestBytes) {
      throw new Error(`profile ${profile.name}: volume of ${volumeBytes} bytes is smaller than one request`);
    }
    this.rng = new Rng(seed);
  }

  next(): WorkloadOp {
    const p = this.profile;
    if (p.flushEveryWrites > 0 && this.writesSinceFlush >= p.flushEveryWrites) {
      this.writesSinceFlush = 0;
      return { kind: 'flush' };
    }
    let offset: number;
    let length = p.requestBytes;
    let kind: 'read' | 'write' = 'write';
    if (p.pattern === 'random') {
      offset = this.rng.below(this.regionBytes / p.requestBytes) * p.requestBytes;
      if (p.readPercent > 0 && this.rng.below(10_000) < p.readPercent * 100) kind = 'read';
    } else {
      if (p.pattern === 'append') {
        const min = p.requestBytesMin ?? p.requestBytes;
        length = min + this.rng.below((p.requestBytes - min) / 512 + 1) * 512;
      }
      if (this.cursor + length > this.regionBytes) this.cursor = 0;
      offset = this.cursor;
      this.cursor += length;
    }
    if (kind === 'write') this.writesSinceFlush++;
    return { kind, offset, length };
  }
}

export interface StreamLimits {
  readonly durationMs: number;
  /** A hard bound on ops, whatever the duration. */
  readonly opsMax: number;
  /** This stream's side of a pair kept in step (see Lockstep). */
  readonly lockstep?: { readonly group: Lockstep; readonly side: 0 | 1 };
}

export interface StreamResult {
  readonly elapsedMs: number;
  readonly reads: number;
  readonly writes: number;
  readonly flushes: number;
  readonly bytes: number;
  /** Reads and writes, µs. */
  readonly latency: LatencyRecorder;
  /** Flushes, µs. */
  readonly flushLatency: LatencyRecorder;
}

export interface StreamProgress {
  ops: number;
}

/**
 * Runs one stream against a device until the duration or the op bound is reached: up to queueDepth
 * reads/writes in flight; a flush waits for them to drain and then runs alone (fsync semantics).
 * Any failed request fails the stream.
 */
/**
 * Keeps two streams within `aheadOpsMax` requests of each other: the PVM and the SVM execute the same
 * instructions and their outputs are compared, so neither VM runs far ahead of the other, and the pair
 * goes at the slower one's pace. Each stream waits, before issuing a request, while it has issued more
 * than `aheadOpsMax` beyond what the other has completed. `release` (when either stream ends) lets the
 * other run out alone.
 */
export class Lockstep {
  private readonly done = [0, 0];
  private readonly waiting: ((() => void) | null)[] = [null, null];
  private released = false;

  constructor(readonly aheadOpsMax: number) {}

  async admit(side: 0 | 1, issued: number): Promise<void> {
    while (!this.released && issued - this.done[1 - side] > this.aheadOpsMax) {
      await new Promise<void>((resolve) => {
        this.waiting[side] = resolve;
      });
    }
  }

  completed(side: 0 | 1): void {
    this.done[side]++;
    this.wake(1 - side);
  }

  release(): void {
    this.released = true;
    this.wake(0);
    this.wake(1);
  }

  private wake(side: number): void {
    const waiter = this.waiting[side];
    this.waiting[side] = null;
    waiter?.();
  }
}

export async function runStream(
  device: BlockDevice,
  profile: Profile,
  seed: number,
  limits: StreamLimits,
  progress: StreamProgress = { ops: 0 },
): Promise<StreamResult> {
  const generator = new WorkloadGenerator(profile, device.size, seed);
  const pattern = new Rng(seed ^ 0x5eed).fill(new Uint8Array(patternBytes + profile.requestBytes));
  const readBuffers = Array.from({ length: profile.queueDepth }, () => new Uint8Array(profile.requestBytes));
  const freeSlots = readBuffers.map((_, i) => i);
  const latency = new LatencyRecorder(seed);
  const flushLatency = new LatencyRecorder(seed + 1);
  let reads = 0;
  let writes = 0;
  let flushes = 0;
  let bytes = 0;
  let failure: unknown;
  const inFlight = new Set<Promise<void>>();
  const started = performance.now();
  const deadline = started + limits.durationMs;

  const issue = (op: Extract<WorkloadOp, { offset: number }>): void => {
    const slot = freeSlots.pop()!;
    const t0 = performance.now();
    const request =
      op.kind === 'read'
        ? device.read(readBuffers[slot].subarray(0, op.length), op.offset)
        : device.write(pattern.subarray(op.offset % patternBytes, (op.offset % patternBytes) + op.length), op.offset);
    const tracked: Promise<void> = request.then(
      () => {
        latency.record((performance.now() - t0) * 1000);
        if (op.kind === 'read') reads++;
        else writes++;
        bytes += op.length;
        progress.ops++;
        limits.lockstep?.group.completed(limits.lockstep.side);
      },
      (error: unknown) => {
        failure ??= error;
      },
    ).finally(() => {
      freeSlots.push(slot);
      inFlight.delete(tracked);
    });
    inFlight.add(tracked);
  };

  let issued = 0;
  let dataIssued = 0;
  while (failure === undefined && issued < limits.opsMax && performance.now() < deadline) {
    const op = generator.next();
    issued++;
    if (op.kind === 'flush') {
      await Promise.all(inFlight);
      if (failure !== undefined) break;
      const t0 = performance.now();
      await device.flush();
      flushLatency.record((performance.now() - t0) * 1000);
      flushes++;
      continue;
    }
    if (inFlight.size >= profile.queueDepth) await Promise.race(inFlight);
    if (limits.lockstep !== undefined) {
      dataIssued++;
      await limits.lockstep.group.admit(limits.lockstep.side, dataIssued);
      if (failure !== undefined) break;
    }
    issue(op);
  }
  await Promise.all(inFlight);
  if (failure !== undefined) throw failure;
  return { elapsedMs: performance.now() - started, reads, writes, flushes, bytes, latency, flushLatency };
}
