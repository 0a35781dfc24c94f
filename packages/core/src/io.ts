import { BlockDeviceError, EXTENT_ZERO, settleAll, toBlockDeviceError, type Extent } from '@gannet/block-device';
import { assert, storageError } from './assert.js';
import { isSlot, isSpilled, ZERO, zeroRangeEntriesMax, type Layer } from './buffer.js';
import type { Engine } from './engine.js';
import type { Flusher } from './flusher.js';
import type { ViewRole } from './view.js';

/** A write retries when a checkpoint replaced its buffer while it fetched old block content. */
const writeAttemptsMax = 64;
/** A read retries a spilled block whose layer was flushed and dropped while it was being fetched. */
const readAttemptsMax = 8;
/** Blocks examined per extents call (the caller asks again for the rest). */
const extentsBlocksMax = 64 * 1024;

/**
 * The buffered data path while replicating: reads through the layers, writes into P or S, and the
 * memory around them (reservation, spill at the hard limit, backpressure on committed data).
 *
 * Writes: whole blocks are copied into a slab slot once. A write covering part of a block needs the
 * block's old content from the layer below (read C over B); we fill the slot from below rather than keep a
 * byte-validity mask, which would cost a mask per block and make every read merge layers byte by byte.
 * The fill may await (the spill store, the file); after the await the write re-checks that its buffer is
 * still the current one and the block's entry did not change, else it fetches again. All blocks of a
 * write are then applied synchronously, so a checkpoint (itself synchronous) falls wholly before or after
 * a write: a checkpoint covers exactly the primary writes acknowledged before it was requested.
 */
export class BufferedIo {
  private reservedBytes = 0;

  constructor(
    private readonly engine: Engine,
    private readonly flusher: Flusher,
  ) {}

  /**
   * The write path's fast lane: a write of whole blocks (or a zero whose head and tail are whole) that
   * fits in memory and under the committed bound is applied at once, synchronously. Returns false, having
   * done nothing, when the write needs the slow path (`write`).
   */
  tryWrite(role: ViewRole, src: Uint8Array | null, offset: number, length: number, noHole: boolean): boolean {
    const { engine } = this;
    const bs = engine.geometry.blockBytes;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + length - 1) / bs);
    if (!this.covers(first, offset, length) || !this.covers(last, offset, length)) return false;
    const bytes = src === null ? 0 : (last - first + 1) * bs;
    if (!engine.buffers.indexRoom(src === null ? zeroRangeEntriesMax : last - first + 1)) return false;
    if (role === 'primary' && engine.epochs.committedBytes() > engine.options.committedBytesMax) return false;
    if (engine.buffers.memBytes + this.reservedBytes + bytes > engine.options.memoryBytesMax) return false;
    this.apply(engine.epochs.top(role), src, offset, length, noHole, noFills);
    return true;
  }

  /** Whether any layer (after failover: W or a committed layer) holds a block of [offset, offset + length). */
  held(offset: number, length: number): boolean {
    const { epochs, geometry } = this.engine;
    const first = Math.floor(offset / geometry.blockBytes);
    const end = Math.floor((offset + length - 1) / geometry.blockBytes) + 1;
    if (epochs.W !== null && epochs.W.touches(first, end)) return true;
    return epochs.committed.some((layer) => layer.touches(first, end));
  }

  /** Returns false when the volume left the replicating state (the caller starts over). */
  async write(role: ViewRole, src: Uint8Array | null, offset: number, length: number, noHole: boolean): Promise<boolean> {
    const { engine } = this;
    const bs = engine.geometry.blockBytes;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + length - 1) / bs);
    const partial: number[] = [];
    if (!this.covers(first, offset, length)) partial.push(first);
    if (last !== first && !this.covers(last, offset, length)) partial.push(last);
    const blocks = last - first + 1;
    // Whole blocks of a zero cost one range however many there are; partial ones are data.
    const entries = src === null ? partial.length + zeroRangeEntriesMax : blocks;
    if (!engine.buffers.indexRoom(entries)) {
      throw new BlockDeviceError('ENOMEM', `write of ${blocks} blocks exceeds the block index limit; checkpoint first`);
    }
    // Room is checked synchronously first: a write that fits costs no extra turn of the event loop.
    if (role === 'primary' && engine.epochs.committedBytes() > engine.options.committedBytesMax && !(await this.committedRoom())) return false;
    const reserve = (src === null ? partial.length : blocks) * bs;
    if (engine.buffers.memBytes + this.reservedBytes + reserve <= engine.options.memoryBytesMax) this.reservedBytes += reserve;
    else if (!(await this.reserveMemory(reserve))) return false;
    try {
      if (partial.length === 0 && engine.buffering) {
        this.apply(engine.epochs.top(role), src, offset, length, noHole, noFills);
        return true;
      }
      for (let attempt = 0; attempt < writeAttemptsMax; attempt++) {
        if (!engine.buffering) return false;
        const layer = engine.epochs.top(role);
        const seen = partial.map((b) => layer.entry(b));
        const fills = partial.map((b, i) => (needsFill(seen[i]) ? this.readBlockFrom(layer, b, seen[i]) : null));
        const filled = fills.some((f) => f !== null) ? await Promise.all(fills) : fills;
        if (!engine.buffering) return false;
        if (layer !== engine.epochs.top(role)) continue;
        const fillOf = new Map<number, Uint8Array | null>();
        let stale = false;
        partial.forEach((b, i) => {
          const now = layer.entry(b);
          if (now !== undefined && (isSlot(now) || now === ZERO)) fillOf.set(b, null);
          else if (now === seen[i] && filled[i] !== null) fillOf.set(b, filled[i] as Uint8Array);
          else stale = true;
        });
        if (stale) continue;
        this.apply(layer, src, offset, length, noHole, fillOf);
        return true;
      }
      throw new BlockDeviceError('EIO', 'write: the buffer kept changing under a partial-block write');
    } finally {
      this.reservedBytes -= reserve;
      assert(this.reservedBytes >= 0, 'reserved bytes never negative');
      engine.wake();
    }
  }

  /**
   * Reads [offset, offset + buf.length) through the view of `role` (null: the checkpoint view, C over B).
   * Memory blocks are copied synchronously; runs of blocks no layer holds are read from the file in one
   * call straight into `buf`; spilled blocks come from the spill store.
   */
  async read(role: ViewRole | null, buf: Uint8Array, offset: number, attempt = 0): Promise<void> {
    assert(attempt < readAttemptsMax, 'a read does not keep racing with flushes');
    const { engine } = this;
    const { buffers, epochs, backing } = engine;
    const bs = engine.geometry.blockBytes;
    const top = role === null ? null : epochs.top(role);
    const pending: Promise<void>[] = [];
    const end = offset + buf.length;
    let backingStart = -1;
    const readBacking = (upTo: number) => {
      if (backingStart < 0) return;
      const at = backingStart;
      pending.push(
        backing.read(buf.subarray(at - offset, upTo - offset), at).catch((err: unknown) => {
          throw storageError(err, 'backing file');
        }),
      );
      backingStart = -1;
    };
    for (let pos = offset; pos < end; ) {
      const b = Math.floor(pos / bs);
      const inBlock = pos - b * bs;
      const n = Math.min(bs - inBlock, end - pos);
      const at = pos - offset;
      const [layer, entry] = epochs.lookup(top, b);
      if (layer === null) {
        if (backingStart < 0) backingStart = pos;
      } else {
        readBacking(pos);
        if (isSlot(entry)) {
          buffers.copyOut(entry, inBlock, n, buf, at);
          buffers.touch(entry);
        } else if (entry === ZERO) {
          buf.fill(0, at, at + n);
        } else {
          const dst = buf.subarray(at, at + n);
          // `pos` moves on before the fetch settles: the retry needs this block's offset.
          const blockPos = pos;
          pending.push(
            engine.spiller.readInto(layer, entry, dst, inBlock).then((found) => {
              if (!found) return this.read(role, dst, blockPos, attempt + 1);
            }),
          );
        }
      }
      pos += n;
    }
    readBacking(end);
    if (pending.length > 0) await settleAll(pending);
  }

  /** Zero extents where a layer holds a zeroed range; everything else is data. */
  extents(role: ViewRole, offset: number, length: number): Extent[] {
    const { epochs } = this.engine;
    const bs = this.engine.geometry.blockBytes;
    const top = epochs.top(role);
    const end = Math.min(offset + length, (Math.floor(offset / bs) + extentsBlocksMax) * bs);
    const extents: { length: number; flags: number }[] = [];
    for (let pos = offset; pos < end; ) {
      const b = Math.floor(pos / bs);
      const n = Math.min((b + 1) * bs, end) - pos;
      const [layer, entry] = epochs.lookup(top, b);
      const flags = layer !== null && entry === ZERO ? EXTENT_ZERO : 0;
      const lastExtent = extents[extents.length - 1];
      if (lastExtent !== undefined && lastExtent.flags === flags) lastExtent.length += n;
      else extents.push({ length: n, flags });
      pos += n;
    }
    return extents;
  }

  /**
   * Synchronous: every block of one write lands in the same buffer, hence the same epoch. A zero's whole
   * blocks become one hole range (one zero range with `noHole`), so its work is bounded by the index, not
   * by its length.
   */
  private apply(layer: Layer, src: Uint8Array | null, offset: number, length: number, noHole: boolean, fillOf: ReadonlyMap<number, Uint8Array | null>): void {
    const { buffers } = this.engine;
    const bs = this.engine.geometry.blockBytes;
    const end = offset + length;
    if (src === null) {
      const first = Math.floor(offset / bs);
      const last = Math.floor((end - 1) / bs);
      const wholeFirst = this.covers(first, offset, length) ? first : first + 1;
      const wholeEnd = this.covers(last, offset, length) ? last + 1 : last;
      if (wholeFirst > first) this.writePart(layer, first, null, offset, length, fillOf);
      if (wholeFirst < wholeEnd) buffers.zeroRange(layer, wholeFirst, wholeEnd, noHole);
      if (last > first && wholeEnd === last) this.writePart(layer, last, null, offset, length, fillOf);
    } else {
      for (let b = Math.floor(offset / bs); b * bs < end; b++) this.writePart(layer, b, src, offset, length, fillOf);
    }
    this.engine.checkPressure();
  }

  /** The part of a write at [offset, offset + length) that falls in block `b`. */
  private writePart(layer: Layer, b: number, src: Uint8Array | null, offset: number, length: number, fillOf: ReadonlyMap<number, Uint8Array | null>): void {
    const bs = this.engine.geometry.blockBytes;
    const start = Math.max(offset, b * bs);
    const n = Math.min(offset + length, (b + 1) * bs) - start;
    assert(n > 0, `block ${b} overlaps the write`);
    this.engine.buffers.writeBlock(layer, b, start - b * bs, n, src, start - offset, fillOf.get(b) ?? null);
  }

  /** Whether [offset, offset + length) covers all of block `b` (up to the end of the volume). */
  private covers(b: number, offset: number, length: number): boolean {
    const start = b * this.engine.geometry.blockBytes;
    return offset <= start && offset + length >= start + this.engine.buffers.blockLength(b);
  }

  /**
   * The content of block `b` as `layer` sees it, when `layer` has no slot for it: its own spilled copy,
   * or the committed layers (newest first) over the backing file.
   */
  private async readBlockFrom(layer: Layer, b: number, entry: number | undefined): Promise<Uint8Array | null> {
    const { buffers, spiller } = this.engine;
    const bs = this.engine.geometry.blockBytes;
    const dst = Buffer.alloc(bs);
    if (entry !== undefined && isSpilled(entry)) {
      const data = await spiller.read(layer, entry);
      if (data === undefined) return null;
      dst.set(data.subarray(0, bs));
      return dst;
    }
    await this.read(null, dst.subarray(0, buffers.blockLength(b)), b * bs);
    return dst;
  }

  /**
   * Reserves memory for a write's new slots. At the hard limit, committed data in memory is waited out
   * (the flusher releases it slab by slab as the disk takes it, so writes are admitted at the disk's
   * rate); beyond what it holds, cold blocks of P and S are spilled. A write larger than the whole budget
   * proceeds once nothing else is in memory, so memory stays under memoryBytesMax plus one request.
   * Returns false when the volume left the replicating state.
   */
  private async reserveMemory(bytes: number): Promise<boolean> {
    const { engine } = this;
    const max = engine.options.memoryBytesMax;
    for (;;) {
      if (!engine.buffering) return false;
      const used = engine.buffers.memBytes + this.reservedBytes;
      if (used + bytes <= max || used === 0) {
        this.reservedBytes += bytes;
        return true;
      }
      if (this.flusher.draining && engine.epochs.committedMemBytes() >= used + bytes - max) {
        await engine.nextWake();
        continue;
      }
      let freed: number;
      try {
        freed = await engine.spiller.spill(used + bytes - max);
      } catch (err) {
        throw storageError(err, 'spilling buffered blocks to their spill file');
      }
      // Nothing spillable (committed, or reserved by other writes): wait for a release, unless memory
      // moved while the spill looked.
      if (freed > 0) {
        engine.wake();
      } else if (freed < 0 && engine.buffers.memBytes + this.reservedBytes >= used) {
        const failure = this.flusher.failure;
        if (failure !== null && engine.epochs.committedMemBytes() > 0) {
          throw toBlockDeviceError(failure, 'committed data holds the memory and cannot reach the backing file');
        }
        await engine.nextWake();
      }
    }
  }

  /** Backpressure: primary writes wait while committed data exceeds committedBytesMax. */
  private async committedRoom(): Promise<boolean> {
    const { engine } = this;
    while (engine.epochs.committedBytes() > engine.options.committedBytesMax) {
      if (!engine.buffering) return false;
      const failure = this.flusher.failure;
      if (failure !== null) throw toBlockDeviceError(failure, 'committed data cannot reach the backing file');
      await engine.nextWake();
    }
    return true;
  }
}

const noFills: ReadonlyMap<number, Uint8Array | null> = new Map();

function needsFill(entry: number | undefined): boolean {
  return entry === undefined || isSpilled(entry);
}
