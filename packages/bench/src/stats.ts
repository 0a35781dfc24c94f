/**
 * Latency samples and summary statistics. A recorder keeps every sample up to `samplesMax`, then a
 * uniform reservoir of that many (seeded, so reruns agree), which bounds memory on long runs while
 * percentiles stay unbiased.
 */

export const samplesMaxDefault = 262_144;

export class LatencyRecorder {
  private readonly samples: Float64Array;
  private kept = 0;
  private seen = 0;
  private rngState: number;
  private sum = 0;

  constructor(seed = 1, samplesMax = samplesMaxDefault) {
    this.samples = new Float64Array(samplesMax);
    this.rngState = seed >>> 0 || 1;
  }

  get count(): number {
    return this.seen;
  }

  get mean(): number {
    return this.seen === 0 ? Number.NaN : this.sum / this.seen;
  }

  record(value: number): void {
    this.seen++;
    this.sum += value;
    if (this.kept < this.samples.length) {
      this.samples[this.kept++] = value;
      return;
    }
    // xorshift32 for reservoir slots: Algorithm R keeps each sample with probability samplesMax/seen.
    let x = this.rngState;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.rngState = x >>> 0;
    const slot = Math.floor((this.rngState / 0x1_0000_0000) * this.seen);
    if (slot < this.samples.length) this.samples[slot] = value;
  }

  /** Adds another recorder's samples (both streams of one run into one distribution). */
  merge(other: LatencyRecorder): void {
    for (let i = 0; i < other.kept; i++) this.record(other.samples[i]);
    // Samples the other recorder dropped still count toward its mean.
    this.seen += other.seen - other.kept;
    this.sum += other.sum - sumOf(other.samples.subarray(0, other.kept));
  }

  /** Nearest-rank percentile, p in [0, 100]; NaN when empty. */
  percentile(p: number): number {
    return percentile(this.samples.subarray(0, this.kept), p);
  }
}

function sumOf(values: Float64Array): number {
  let s = 0;
  for (const v of values) s += v;
  return s;
}

export function percentile(values: ArrayLike<number>, p: number): number {
  if (!(p >= 0 && p <= 100)) throw new Error(`percentile: p=${p} out of [0, 100]`);
  if (values.length === 0) return Number.NaN;
  const sorted = Float64Array.from(values).sort();
  const rank = Math.max(1, Math.ceil((p / 100) * sorted.length));
  return sorted[rank - 1];
}
