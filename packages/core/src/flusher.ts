import { assert } from './assert.js';
import type { Backing } from './backing.js';
import { isSlot, isSpilled, ZERO, type BlockBuffers, type Layer } from './buffer.js';
import type { MetaStore } from './meta.js';
import type { ByteRange } from './types.js';

/**
 * Writing buffered blocks to the backing file: the background flush of committed epochs and the failover
 * apply share this. Blocks go out in offset order, coalesced into runs of consecutive blocks of up to
 * runBytesMax, each run one vectored positional write whose entries point into the slabs (adjacent slots
 * of one slab merge into one entry), so the data is never copied on its way to the file.
 */
export const runBytesMax = 4 * 1024 * 1024;

/** The newest entry of every block over `layers` (oldest first), blocks in offset order. */
export function mergeLayers(layers: readonly Layer[]): { blocks: Float64Array; owner: Map<number, Layer> } {
  if (layers.length === 1) {
    const only = layers[0];
    const owner = new Map<number, Layer>();
    for (const b of only.map.keys()) owner.set(b, only);
    return { blocks: Float64Array.from(only.map.keys()).sort(), owner };
  }
  const owner = new Map<number, Layer>();
  for (const layer of layers) for (const b of layer.map.keys()) owner.set(b, layer);
  return { blocks: Float64Array.from(owner.keys()).sort(), owner };
}

export interface Run {
  readonly first: number;
  readonly count: number;
}

/** Consecutive blocks, at most runBytesMax per run. */
export function planRuns(blocks: ArrayLike<number>, blockBytes: number): Run[] {
  const runBlocksMax = Math.max(1, Math.floor(runBytesMax / blockBytes));
  const runs: Run[] = [];
  let i = 0;
  while (i < blocks.length) {
    const first = blocks[i];
    let count = 1;
    while (i + count < blocks.length && count < runBlocksMax && blocks[i + count] === first + count) count++;
    runs.push({ first, count });
    i += count;
  }
  return runs;
}

/** Byte ranges of `runs` (adjacent runs merged), clipped to the volume. */
export function runRanges(runs: readonly Run[], blockBytes: number, sizeBytes: number): ByteRange[] {
  const out: { offset: number; length: number }[] = [];
  for (const run of runs) {
    const offset = run.first * blockBytes;
    const length = Math.min((run.first + run.count) * blockBytes, sizeBytes) - offset;
    const last = out[out.length - 1];
    if (last !== undefined && last.offset + last.length === offset) last.length += length;
    else out.push({ offset, length });
  }
  return out;
}

/** A block's content: bytes (at least the block's length), null for zeroes; may need a LevelDB read. */
export type BlockSource = (block: number) => Uint8Array | null | Promise<Uint8Array | null>;

/** Writes `runs` to the backing file; returns the bytes written. */
export async function writeRuns(
  backing: Backing,
  runs: readonly Run[],
  source: BlockSource,
  geometry: { blockBytes: number; sizeBytes: number },
): Promise<number> {
  const { blockBytes, sizeBytes } = geometry;
  const zeroes = Buffer.alloc(blockBytes);
  let bytes = 0;
  for (const run of runs) {
    const iov: Uint8Array[] = [];
    for (let b = run.first; b < run.first + run.count; b++) {
      const length = Math.min(blockBytes, sizeBytes - b * blockBytes);
      const found = source(b);
      const data = found instanceof Promise ? await found : found;
      const chunk = data === null ? zeroes.subarray(0, length) : data.subarray(0, length);
      assert(chunk.length === length, `block ${b} source holds ${chunk.length} of ${length} bytes`);
      const prev = iov[iov.length - 1];
      if (prev !== undefined && prev.buffer === chunk.buffer && prev.byteOffset + prev.byteLength === chunk.byteOffset && data !== null) {
        iov[iov.length - 1] = new Uint8Array(prev.buffer, prev.byteOffset, prev.byteLength + chunk.byteLength);
      } else {
        iov.push(chunk);
      }
      bytes += length;
    }
    await backing.writev(iov, run.first * blockBytes);
  }
  return bytes;
}

/**
 * The content of a block of a pinned layer (flush and failover pin what they write, so slots stay put
 * and spilled blocks stay in LevelDB until the layer is dropped).
 */
export function layerSource(buffers: BlockBuffers, meta: MetaStore, owner: Map<number, Layer>): BlockSource {
  return (b) => {
    const layer = owner.get(b);
    assert(layer !== undefined && layer.pinned && !layer.dropped, `block ${b} comes from a pinned layer`);
    const entry = layer.map.get(b);
    assert(entry !== undefined, `block ${b} is in layer ${layer.id}`);
    if (isSlot(entry)) return buffers.slotBytes(entry);
    if (entry === ZERO) return null;
    assert(isSpilled(entry), `block ${b} entry ${entry} is a spill tag`);
    return meta.getSpill(layer.id, b).then((data) => {
      assert(data !== undefined, `spilled block ${b} of pinned layer ${layer.id} is in LevelDB`);
      return data;
    });
  };
}
