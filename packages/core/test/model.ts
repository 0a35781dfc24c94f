/**
 * Reference model of a replicated volume, for the model-based and crash tests: plain byte arrays and
 * the layering rules of DESIGN.md, nothing else. No slabs, no spill, no flusher, no concurrency: if the
 * engine and this model disagree on a byte, the engine is wrong (or DESIGN.md is).
 *
 * Layers: P (primary buffer) and S (secondary buffer) are overlays with a per-byte mask; `committed` is
 * C over B, the checkpoint view, i.e. what the backing file holds once every sealed epoch is flushed.
 *   primary view   = P over C over B
 *   secondary view = S over C over B
 *   checkpoint     : P sealed into C, S dropped, epoch + 1
 *   failover       : 'secondary' keeps S, 'checkpoint' keeps neither, 'primary' keeps P; then a plain disk
 * After failover both views read the same bytes; secondary writes go through; primary writes get EPERM.
 * Trim is modelled as writing zeroes: the engine records a trim as a zero range (README, "Buffers";
 * view.ts sends trim and write-zeroes down the same path), and so must every strategy.
 */
import type { FailoverTarget } from '@gannet/core';

export type ViewName = 'primary' | 'secondary';

export { Rng } from '../src/rng.js';

/** Mask values: which bytes an epoch's buffer holds, and whether they came from data or a zero range. */
const maskData = 1;
const maskZero = 2;

/** A buffer of one epoch: bytes plus a mask of which bytes were written, and bounds for cheap clears. */
class Overlay {
  readonly data: Uint8Array;
  readonly mask: Uint8Array;
  lo = Infinity;
  hi = 0;
  constructor(sizeBytes: number) {
    this.data = new Uint8Array(sizeBytes);
    this.mask = new Uint8Array(sizeBytes);
  }
  /**
   * Bytes holding written data, kept up to date so asking is O(1); zero ranges may cost the engine no
   * memory, so they do not count.
   */
  dataBytes = 0;
  write(offset: number, bytes: Uint8Array): void {
    this.data.set(bytes, offset);
    for (let i = offset; i < offset + bytes.length; i++) if (this.mask[i] !== maskData) this.dataBytes++;
    this.mask.fill(maskData, offset, offset + bytes.length);
    this.lo = Math.min(this.lo, offset);
    this.hi = Math.max(this.hi, offset + bytes.length);
  }
  zero(offset: number, length: number): void {
    this.data.fill(0, offset, offset + length);
    for (let i = offset; i < offset + length; i++) if (this.mask[i] === maskData) this.dataBytes--;
    this.mask.fill(maskZero, offset, offset + length);
    this.lo = Math.min(this.lo, offset);
    this.hi = Math.max(this.hi, offset + length);
  }
  /** Copies this overlay's bytes in [offset, offset + out.length) over `out`. */
  applyTo(out: Uint8Array, offset: number): void {
    const from = Math.max(offset, this.lo);
    const to = Math.min(offset + out.length, this.hi);
    for (let i = from; i < to; i++) if (this.mask[i] !== 0) out[i - offset] = this.data[i];
  }
  /** Writes this overlay's bytes into `target` (a full-size array). */
  sealInto(target: Uint8Array): void {
    for (let i = this.lo; i < this.hi; i++) if (this.mask[i] !== 0) target[i] = this.data[i];
  }
  clear(): void {
    if (this.hi > this.lo) this.mask.fill(0, this.lo, this.hi);
    this.dataBytes = 0;
    this.lo = Infinity;
    this.hi = 0;
  }
}

export interface ModelOptions {
  /** Keep a copy of the checkpoint view at every epoch (crash tests ask for the bytes at durableEpoch). */
  readonly keepEpochs?: boolean;
  /** Start from a reopened volume: its checkpoint view (or plain disk), epoch, and failover. */
  readonly start?: { readonly bytes: Uint8Array; readonly epoch: number; readonly failedOverTo?: FailoverTarget };
}

export class VolumeModel {
  readonly sizeBytes: number;
  /** C over B: the checkpoint view. After failover, the whole plain disk. */
  private readonly committed: Uint8Array;
  private readonly p: Overlay;
  private readonly s: Overlay;
  private readonly epochs: Map<number, Uint8Array> | undefined;
  private epochNow = 0;
  private target: FailoverTarget | undefined;

  constructor(sizeBytes: number, options: ModelOptions = {}) {
    this.sizeBytes = sizeBytes;
    this.committed = options.start === undefined ? new Uint8Array(sizeBytes) : options.start.bytes.slice();
    this.p = new Overlay(sizeBytes);
    this.s = new Overlay(sizeBytes);
    this.epochNow = options.start?.epoch ?? 0;
    this.target = options.start?.failedOverTo;
    this.epochs = options.keepEpochs ? new Map([[this.epochNow, this.committed.slice()]]) : undefined;
  }

  get epoch(): number {
    return this.epochNow;
  }
  get failoverTarget(): FailoverTarget | undefined {
    return this.target;
  }
  get failedOver(): boolean {
    return this.target !== undefined;
  }

  private check(offset: number, length: number): void {
    if (!(Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0)) {
      throw new Error(`VolumeModel: bad range ${offset}+${length}`);
    }
    if (offset + length > this.sizeBytes) throw new Error(`VolumeModel: range ${offset}+${length} past ${this.sizeBytes}`);
  }

  read(view: ViewName, offset: number, length: number): Uint8Array {
    this.check(offset, length);
    const out = this.committed.slice(offset, offset + length);
    if (!this.failedOver) (view === 'primary' ? this.p : this.s).applyTo(out, offset);
    return out;
  }

  /**
   * The whole checkpoint view (C over B), or the plain disk after failover. Not a copy: valid until the
   * model next changes.
   */
  committedBytes(): Uint8Array {
    return this.committed;
  }

  /** Whether a write of this view is accepted; after failover the primary view is read-only. */
  writable(view: ViewName): boolean {
    return !(this.failedOver && view === 'primary');
  }

  write(view: ViewName, offset: number, bytes: Uint8Array): void {
    this.check(offset, bytes.length);
    if (!this.writable(view)) throw new Error('VolumeModel: primary view is read-only after failover');
    if (this.failedOver) this.committed.set(bytes, offset);
    else (view === 'primary' ? this.p : this.s).write(offset, bytes);
  }

  /** Zeroes and trims: both read back as zeroes. */
  zero(view: ViewName, offset: number, length: number): void {
    this.check(offset, length);
    if (!this.writable(view)) throw new Error('VolumeModel: primary view is read-only after failover');
    if (this.failedOver) this.committed.fill(0, offset, offset + length);
    else (view === 'primary' ? this.p : this.s).zero(offset, length);
  }

  /** Seals P into C, drops S, and returns the new epoch number. */
  checkpoint(): number {
    if (this.failedOver) throw new Error('VolumeModel: checkpoint after failover');
    this.p.sealInto(this.committed);
    this.p.clear();
    this.s.clear();
    this.epochNow += 1;
    this.epochs?.set(this.epochNow, this.committed.slice());
    return this.epochNow;
  }

  /** The checkpoint view as of the start of `epoch` (needs keepEpochs). */
  checkpointViewAt(epoch: number): Uint8Array {
    if (!this.epochs) throw new Error('VolumeModel: constructed without keepEpochs');
    const bytes = this.epochs.get(epoch);
    if (!bytes) throw new Error(`VolumeModel: no epoch ${epoch} (now ${this.epochNow})`);
    return bytes;
  }

  /** The bytes the volume holds after failing over to `to`, without changing the model. */
  keptView(to: FailoverTarget): Uint8Array {
    const out = this.committed.slice();
    if (!this.failedOver) {
      if (to === 'secondary') this.s.applyTo(out, 0);
      else if (to === 'primary') this.p.applyTo(out, 0);
    }
    return out;
  }

  failover(to: FailoverTarget): void {
    if (this.failedOver) throw new Error(`VolumeModel: second failover (already to ${this.target})`);
    if (to === 'secondary') this.s.sealInto(this.committed);
    else if (to === 'primary') this.p.sealInto(this.committed);
    this.p.clear();
    this.s.clear();
    this.target = to;
  }

  /** Data bytes written in the current epoch per buffer: a lower bound of what the engine buffers. */
  dataBytes(): { primary: number; secondary: number } {
    return { primary: this.p.dataBytes, secondary: this.s.dataBytes };
  }
}

/** First index where two byte arrays differ, or -1. */
export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  if (Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length))) return -1;
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

/** Ranges where two equal-length arrays differ, coalesced. */
export function differingRanges(a: Uint8Array, b: Uint8Array): { offset: number; length: number }[] {
  if (a.length !== b.length) throw new Error(`differingRanges: lengths ${a.length} and ${b.length}`);
  const out: { offset: number; length: number }[] = [];
  let start = -1;
  for (let i = 0; i <= a.length; i++) {
    const differs = i < a.length && a[i] !== b[i];
    if (differs && start < 0) start = i;
    else if (!differs && start >= 0) {
      out.push({ offset: start, length: i - start });
      start = -1;
    }
  }
  return out;
}

/** A short hex dump around `at`, for failure messages; the byte at `at` is in brackets. */
export function hexAround(bytes: Uint8Array, at: number, span = 8): string {
  const from = Math.max(0, at - span);
  const to = Math.min(bytes.length, at + span);
  const hex = (b: number, i: number) => (from + i === at ? `[${b.toString(16).padStart(2, '0')}]` : b.toString(16).padStart(2, '0'));
  return Array.from(bytes.subarray(from, to), hex).join(' ');
}
