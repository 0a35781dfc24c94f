/**
 * One bit per cluster: which clusters of a scratch file (COLO's hidden or active disk) hold data for
 * the current epoch. A count is kept so stats are O(1).
 */

import { MiB } from '@gannet/block-device';

/** 64 MiB of bitmap covers 2 TiB at 4 KiB clusters; a larger volume needs larger clusters. */
export const bitmapBytesMax = 64 * MiB;

export class ClusterBitmap {
  readonly clusters: number;
  private readonly bits: Uint8Array;
  private setCount = 0;

  constructor(clusters: number) {
    if (!(Number.isSafeInteger(clusters) && clusters > 0)) throw new Error(`ClusterBitmap: bad cluster count ${clusters}`);
    const bytes = Math.ceil(clusters / 8);
    if (bytes > bitmapBytesMax) {
      throw new Error(`ClusterBitmap: ${clusters} clusters need ${bytes} bytes of bitmap, more than ${bitmapBytesMax}`);
    }
    this.clusters = clusters;
    this.bits = new Uint8Array(bytes);
  }

  get count(): number {
    return this.setCount;
  }

  has(cluster: number): boolean {
    return (this.bits[cluster >>> 3] & (1 << (cluster & 7))) !== 0;
  }

  add(cluster: number): void {
    if (cluster < 0 || cluster >= this.clusters) throw new Error(`ClusterBitmap: cluster ${cluster} out of range`);
    const mask = 1 << (cluster & 7);
    const byte = cluster >>> 3;
    if ((this.bits[byte] & mask) === 0) {
      this.bits[byte] |= mask;
      this.setCount++;
    }
  }

  clear(): void {
    this.bits.fill(0);
    this.setCount = 0;
  }

  /** Maximal runs [first, end) of set clusters, in order; skips empty bytes so a sparse map is cheap. */
  *runs(): Generator<{ first: number; end: number }> {
    let start = -1;
    for (let byte = 0; byte < this.bits.length; byte++) {
      const value = this.bits[byte];
      if ((value === 0 && start < 0) || (value === 0xff && start >= 0)) continue;
      for (let bit = 0; bit < 8; bit++) {
        const cluster = byte * 8 + bit;
        if (cluster >= this.clusters) break;
        const set = (value & (1 << bit)) !== 0;
        if (set && start < 0) start = cluster;
        else if (!set && start >= 0) {
          yield { first: start, end: cluster };
          start = -1;
        }
      }
    }
    if (start >= 0) yield { first: start, end: this.clusters };
  }
}
