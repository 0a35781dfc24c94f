/**
 * Mulberry32: a tiny seeded PRNG, so one seed reproduces a whole run. Shared by the model-based and
 * crash tests and the benchmark workloads, so every source of randomness is driven by one seed.
 */
export class Rng {
  private state: number;
  constructor(seed: number) {
    this.state = seed >>> 0;
  }
  /** Uniform 32-bit unsigned integer. */
  u32(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }
  /** Uniform integer in [0, n). */
  below(n: number): number {
    if (!(Number.isSafeInteger(n) && n > 0)) throw new Error(`Rng.below: bad bound ${n}`);
    if (n <= 0x1_0000_0000) return this.u32() % n;
    return (this.u32() * 0x1_0000_0000 + this.u32()) % n;
  }
  /** Uniform integer in [lo, hi]. */
  between(lo: number, hi: number): number {
    return lo + this.below(hi - lo + 1);
  }
  chance(p: number): boolean {
    return this.u32() / 0x1_0000_0000 < p;
  }
  pick<T>(items: readonly T[]): T {
    return items[this.below(items.length)];
  }
  fill(buf: Uint8Array): Uint8Array {
    let i = 0;
    for (; i + 4 <= buf.length; i += 4) {
      const v = this.u32();
      buf[i] = v & 0xff;
      buf[i + 1] = (v >>> 8) & 0xff;
      buf[i + 2] = (v >>> 16) & 0xff;
      buf[i + 3] = v >>> 24;
    }
    if (i < buf.length) {
      const v = this.u32();
      for (let k = 0; i < buf.length; i++, k++) buf[i] = (v >>> (8 * k)) & 0xff;
    }
    return buf;
  }
}
