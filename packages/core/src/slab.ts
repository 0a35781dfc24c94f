import { MiB } from '@gannet/block-device';
import { assert } from './assert.js';

/**
 * Buffered blocks live in slabs: large Buffers cut into block-sized slots, so a GiB of buffered data is a
 * few hundred allocations instead of a quarter million, and RSS tracks buffered bytes closely. Slabs are
 * SharedArrayBuffers, so the backing file's writer thread writes committed blocks from where they are.
 */
export const slabBytesDefault = 2 * MiB;
/**
 * Free slabs kept for reuse once the volume is quiet (beyond this they are dropped for the GC to return
 * to the OS). While slabs are being acquired, released ones are kept up to the pool's busy limit (the
 * volume's memory cap): under sustained writes a checkpoint's worth of slabs is released and acquired
 * again every epoch, and a fresh SharedArrayBuffer costs page faults and a major GC for the external
 * memory it adds.
 */
export const idleSlabBytesMax = 16 * MiB;

export interface Slab<Owner> {
  readonly id: number;
  readonly bytes: Buffer;
  /** Block index held by each slot, valid while the slot is in use by `owner`. */
  readonly blocks: Float64Array;
  /** Bumped on every write to a slot, so an asynchronous spill can tell the slot changed under it. */
  readonly versions: Uint32Array;
  /** Set when a slot is written or read again: its second chance when it reaches the LRU's cold end. */
  readonly referenced: Uint8Array;
  /** Slots holding a block of `owner` now; a sealed owner's slab goes back to the pool at 0. */
  live: number;
  owner: Owner | null;
}

/**
 * Hands out whole slabs to layers. A layer owns its slabs, so dropping a layer (the secondary buffer at a
 * checkpoint, a committed buffer after its flush) costs one step per slab, not one per block.
 * Slot numbers are global: slot = slab id * slotsPerSlab + index within the slab.
 */
export class SlabPool<Owner> {
  readonly blockBytes: number;
  readonly slabBytes: number;
  readonly slotsPerSlab: number;
  private readonly slabs: (Slab<Owner> | null)[] = [];
  private readonly freeIds: number[] = [];
  private readonly idle: Slab<Owner>[] = [];
  /** Idle slabs kept while the pool is busy. */
  private readonly busyIdleBytesMax: number;
  /** Whether a slab was acquired since the last trim. */
  private busy = false;
  /** Bytes of slabs currently owned by a layer or idle. */
  allocatedBytes = 0;

  constructor(blockBytes: number, busyIdleBytesMax: number, slabBytes = slabBytesDefault) {
    this.blockBytes = blockBytes;
    this.busyIdleBytesMax = Math.max(busyIdleBytesMax, idleSlabBytesMax);
    this.slabBytes = Math.max(slabBytes, blockBytes);
    this.slotsPerSlab = this.slabBytes / blockBytes;
    assert(Number.isInteger(this.slotsPerSlab), 'slab size is a multiple of the block size');
  }

  acquire(owner: Owner): Slab<Owner> {
    this.busy = true;
    let slab = this.idle.pop();
    if (slab === undefined) {
      const id = this.freeIds.length > 0 ? this.freeIds.pop()! : this.slabs.length;
      slab = {
        id,
        bytes: Buffer.from(new SharedArrayBuffer(this.slabBytes)),
        blocks: new Float64Array(this.slotsPerSlab),
        versions: new Uint32Array(this.slotsPerSlab),
        referenced: new Uint8Array(this.slotsPerSlab),
        live: 0,
        owner: null,
      };
      this.slabs[id] = slab;
      this.allocatedBytes += this.slabBytes;
    }
    assert(slab.owner === null, 'an acquired slab has no owner');
    slab.owner = owner;
    return slab;
  }

  release(slab: Slab<Owner>): void {
    assert(slab.owner !== null && slab.live === 0, 'a released slab had an owner and no live slot');
    assert(this.slabs[slab.id] === slab, 'released slab belongs to this pool');
    slab.owner = null;
    if ((this.idle.length + 1) * this.slabBytes <= this.busyIdleBytesMax) this.idle.push(slab);
    else this.free(slab);
  }

  /** Called every second or so: a pool that acquired nothing since the last call keeps only idleSlabBytesMax. */
  trim(): void {
    if (!this.busy) while (this.idle.length * this.slabBytes > idleSlabBytesMax) this.free(this.idle.pop()!);
    this.busy = false;
  }

  private free(slab: Slab<Owner>): void {
    this.slabs[slab.id] = null;
    this.freeIds.push(slab.id);
    this.allocatedBytes -= this.slabBytes;
    assert(this.allocatedBytes >= 0, 'slab bytes never negative');
  }

  /** The slab holding `slot`, or null when that slab was freed. */
  slabOf(slot: number): Slab<Owner> | null {
    return this.slabs[Math.floor(slot / this.slotsPerSlab)] ?? null;
  }

  slotIndex(slot: number): number {
    return slot % this.slotsPerSlab;
  }

  /** The slot's bytes, a view into its slab (never a copy). */
  slotBytes(slot: number): Buffer {
    const slab = this.slabs[Math.floor(slot / this.slotsPerSlab)];
    assert(slab != null, `slot ${slot} is in a live slab`);
    const start = (slot % this.slotsPerSlab) * this.blockBytes;
    return slab.bytes.subarray(start, start + this.blockBytes);
  }
}
