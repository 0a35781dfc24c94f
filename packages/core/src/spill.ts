import type { BlockBuffers, Layer } from './buffer.js';
import type { MetaStore } from './meta.js';
import { MiB } from '@gannet/block-device';

/** Bytes moved to the spill store per batch. */
export const spillBatchBytesMax = 4 * MiB;

/**
 * At the memory limit the coldest blocks (BlockBuffers.spillVictims: an LRU of slots with a second chance
 * for slots used again) move to the metadata store under (layer id, block index) and keep being served
 * from there. A spilled slot is freed only after the batch completes and only if nothing changed the
 * slot meanwhile (BlockBuffers.spilled); otherwise the stored copy is garbage that the layer's drop
 * clears. One spill runs at a time.
 */
export class Spiller {
  private running: Promise<number> | null = null;

  constructor(
    private readonly buffers: BlockBuffers,
    private readonly meta: MetaStore,
    private readonly liveLayers: () => Iterable<Layer>,
  ) {}

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

  /** A spilled block's bytes, or undefined when its layer was dropped meanwhile. */
  read(layer: Layer, block: number): Promise<Uint8Array | undefined> {
    return this.meta.getSpill(layer.id, block);
  }

  /** Forgets a dropped layer's spilled blocks, after any batch in flight that may still write them. */
  async forget(layer: Layer): Promise<void> {
    await this.idle();
    await this.meta.clearLayerSpill(layer.id);
  }

  private async spillBatch(bytes: number): Promise<number> {
    const victims = this.buffers.spillVictims(Math.ceil(bytes / this.buffers.blockBytes), this.liveLayers());
    if (victims.length === 0) return -1;
    this.buffers.spilling(victims);
    await this.meta.putSpill(victims.map((v) => ({ layerId: v.layer.id, block: v.block, data: this.buffers.slotBytes(v.slot) })));
    let freed = 0;
    for (const v of victims) if (this.buffers.spilled(v)) freed += this.buffers.blockBytes;
    return freed;
  }
}
