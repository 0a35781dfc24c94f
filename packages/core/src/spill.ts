import { assert } from './assert.js';
import { isSlot, type BlockBuffers, type Layer } from './buffer.js';
import type { MetaStore } from './meta.js';

/** Bytes moved to LevelDB per spill batch. */
export const spillBatchBytesMax = 4 * 1024 * 1024;

interface Victim {
  layer: Layer;
  block: number;
  slot: number;
  version: number;
}

/**
 * At the memory limit the coldest blocks (an LRU of slots, with a second chance for slots used again;
 * see `pickVictims`) move to LevelDB under (layer id, block index) and keep being served from there. A
 * spilled slot is freed only after the LevelDB batch completes and only if nothing changed the slot
 * meanwhile (same block, same write version, layer not dropped or pinned); otherwise the copy in LevelDB
 * is just garbage that the layer's drop clears. One spill runs at a time.
 */
export class Spiller {
  private readonly buffers: BlockBuffers;
  private readonly meta: MetaStore;
  private readonly liveLayers: () => Iterable<Layer>;
  private running: Promise<number> | null = null;

  constructor(buffers: BlockBuffers, meta: MetaStore, liveLayers: () => Iterable<Layer>) {
    this.buffers = buffers;
    this.meta = meta;
    this.liveLayers = liveLayers;
  }

  /** Waits for a spill in flight (close must not close the store under it). */
  async idle(): Promise<void> {
    if (this.running !== null) await this.running.catch(() => undefined);
  }

  /**
   * Spills up to `bytes` (at most one batch). Resolves with the bytes freed, or -1 when nothing is
   * spillable now (everything in memory is pinned by a flush); 0 means the victims changed meanwhile.
   */
  async spill(bytes: number): Promise<number> {
    if (this.running !== null) {
      await this.running.catch(() => undefined);
      return 0;
    }
    this.running = this.spillBatch(Math.min(Math.max(bytes, this.buffers.blockBytes), spillBatchBytesMax));
    try {
      return await this.running;
    } finally {
      this.running = null;
    }
  }

  private async spillBatch(bytes: number): Promise<number> {
    const victims = this.pickVictims(Math.ceil(bytes / this.buffers.blockBytes));
    if (victims.length === 0) return -1;
    for (const v of victims) v.layer.hasSpillKeys = true;
    await this.meta.putSpill(
      victims.map((v) => ({ layerId: v.layer.id, block: v.block, data: this.buffers.slotBytes(v.slot) })),
    );
    let freed = 0;
    for (const v of victims) {
      const { layer, block, slot } = v;
      if (layer.dropped || layer.pinned || layer.map.get(block) !== slot) continue;
      const slab = this.buffers.pool.slabOf(slot);
      if (slab === null || slab.versions[this.buffers.pool.slotIndex(slot)] !== v.version) continue;
      this.buffers.markSpilled(layer, block, slot);
      this.buffers.lru.delete(slot);
      freed += this.buffers.blockBytes;
    }
    return freed;
  }

  /**
   * The coldest unpinned slots, from the LRU's cold end. A slot used again since it was (re)placed there
   * has its referenced bit set: it gets a second chance, moving to the warm end with the bit cleared,
   * so a pass where every slot was used again still ends with victims on the second pass.
   */
  private pickVictims(count: number): Victim[] {
    const { pool, lru } = this.buffers;
    const victims: Victim[] = [];
    for (let pass = 0; pass < 2 && victims.length < count; pass++) {
      const stale: number[] = [];
      const secondChance: number[] = [];
      for (const slot of lru.rkeys()) {
        if (victims.length >= count) break;
        const slab = pool.slabOf(slot);
        const layer = slab?.owner ?? null;
        if (slab === null || layer === null) {
          stale.push(slot);
          continue;
        }
        if (layer.pinned) continue;
        const index = pool.slotIndex(slot);
        const block = slab.blocks[index];
        if (layer.map.get(block) !== slot) {
          stale.push(slot);
          continue;
        }
        if (slab.referenced[index] === 1) {
          slab.referenced[index] = 0;
          secondChance.push(slot);
          continue;
        }
        victims.push({ layer, block, slot, version: slab.versions[index] });
      }
      for (const slot of stale) lru.delete(slot);
      for (const slot of secondChance) lru.set(slot, true);
    }
    if (victims.length > 0) return victims;
    return this.scanVictims(count);
  }

  /** Slots the LRU forgot (it tracks a bounded number): found by a scan, which is rare and slow. */
  private scanVictims(count: number): Victim[] {
    const victims: Victim[] = [];
    for (const layer of this.liveLayers()) {
      if (layer.pinned || layer.dropped) continue;
      for (const [block, entry] of layer.map) {
        if (victims.length >= count) return victims;
        if (!isSlot(entry)) continue;
        const slab = this.buffers.pool.slabOf(entry);
        assert(slab !== null && slab.owner === layer, 'a live slot belongs to its layer');
        victims.push({ layer, block, slot: entry, version: slab.versions[this.buffers.pool.slotIndex(entry)] });
      }
    }
    return victims;
  }
}
