/**
 * A sparse in-memory block device: data lives in fixed-size chunks allocated on first write, so memory
 * tracks what was written rather than the device size (a 1 TiB device costs nothing until used).
 * Never-written chunks read as zeroes and are reported as EXTENT_HOLE | EXTENT_ZERO. Like nbdkit's
 * memory plugin, nothing here is durable: flush and FUA are accepted and do nothing.
 */
import { AbstractBlockDevice, type ZeroRequest } from './abstract.js';
import { allCapabilities, EXTENT_HOLE, EXTENT_ZERO, type Capabilities, type Extent } from './device.js';

/** Allocation granularity: small enough that scattered writes stay cheap, large enough for few Map entries. */
export const memoryChunkBytes = 64 * 1024;

/** One extents answer is bounded; the contract lets callers ask again from where it stopped. */
const extentsCountMax = 1024;

export interface MemoryDeviceOptions {
  readonly readOnly?: boolean;
}

export class MemoryDevice extends AbstractBlockDevice {
  readonly capabilities: Capabilities;
  readonly #chunks = new Map<number, Buffer>();
  #allocatedBytes = 0;

  constructor(sizeBytes: number, options: MemoryDeviceOptions = {}) {
    super(sizeBytes);
    this.capabilities = Object.freeze({ ...allCapabilities, readOnly: options.readOnly === true });
  }

  /** Bytes of chunk memory held; grows with writes, shrinks with trims and zeroes of whole chunks. */
  get allocatedBytes(): number {
    return this.#allocatedBytes;
  }

  protected async _read(buf: Uint8Array, offset: number): Promise<void> {
    this.#eachPiece(offset, buf.byteLength, (index, within, done, n) => {
      const chunk = this.#chunks.get(index);
      if (chunk === undefined) buf.fill(0, done, done + n);
      else buf.set(chunk.subarray(within, within + n), done);
    });
  }

  protected async _write(data: Uint8Array, offset: number): Promise<void> {
    this.#eachPiece(offset, data.byteLength, (index, within, done, n) => {
      this.#chunkFor(index).set(data.subarray(done, done + n), within);
    });
  }

  protected override async _trim(offset: number, length: number): Promise<void> {
    this.#zero(offset, length, false);
  }

  /**
   * Zeroes the range. Without `noHole`, fully covered chunks are freed. With `noHole`, no hole is
   * created: allocated chunks are zero-filled in place, and never-written chunks stay as they are
   * (they already read as zero, and allocating RAM for them would let one request for a huge range
   * exhaust the process; writes to RAM cannot run out of provisioned space anyway).
   */
  protected override async _zero(offset: number, length: number, request: ZeroRequest): Promise<void> {
    this.#zero(offset, length, request.noHole);
  }

  protected override async _extents(offset: number, length: number): Promise<Extent[]> {
    const out: { length: number; flags: number }[] = [];
    const end = offset + length;
    const push = (flags: number, n: number): boolean => {
      const last = out[out.length - 1];
      if (last !== undefined && last.flags === flags) {
        last.length += n;
        return true;
      }
      if (out.length === extentsCountMax) return false;
      out.push({ length: n, flags });
      return true;
    };
    let cursor = offset;
    for (const index of this.#allocatedIndices(offset, length)) {
      const start = Math.max(offset, index * memoryChunkBytes);
      const stop = Math.min(end, index * memoryChunkBytes + this.#chunkLength(index));
      if (start > cursor && !push(EXTENT_HOLE | EXTENT_ZERO, start - cursor)) return out;
      if (!push(0, stop - start)) return out;
      cursor = stop;
    }
    if (cursor < end) push(EXTENT_HOLE | EXTENT_ZERO, end - cursor);
    return out;
  }

  protected override async _close(): Promise<void> {
    this.#chunks.clear();
    this.#allocatedBytes = 0;
  }

  /** The last chunk is cut at the device size, so no memory is held past the end. */
  #chunkLength(index: number): number {
    return Math.min(memoryChunkBytes, this.size - index * memoryChunkBytes);
  }

  #chunkFor(index: number): Buffer {
    let chunk = this.#chunks.get(index);
    if (chunk === undefined) {
      chunk = Buffer.alloc(this.#chunkLength(index));
      this.#chunks.set(index, chunk);
      this.#allocatedBytes += chunk.length;
    }
    return chunk;
  }

  /** Calls `fn(chunkIndex, offsetWithinChunk, offsetWithinRange, bytes)` for each chunk the range touches. */
  #eachPiece(offset: number, length: number, fn: (index: number, within: number, done: number, n: number) => void): void {
    for (let done = 0; done < length; ) {
      const at = offset + done;
      const index = Math.floor(at / memoryChunkBytes);
      const within = at - index * memoryChunkBytes;
      const n = Math.min(memoryChunkBytes - within, length - done);
      fn(index, within, done, n);
      done += n;
    }
  }

  #zero(offset: number, length: number, noHole: boolean): void {
    if (length === 0) return;
    const zeroPiece = (index: number, within: number, n: number): void => {
      const chunk = this.#chunks.get(index);
      if (chunk === undefined) return;
      if (!noHole && within === 0 && n === chunk.length) {
        this.#chunks.delete(index);
        this.#allocatedBytes -= chunk.length;
      } else {
        chunk.fill(0, within, within + n);
      }
    };
    // Only allocated chunks need work, so a huge range over a sparse device walks the Map, not the range.
    for (const index of this.#allocatedIndices(offset, length)) {
      const start = Math.max(offset, index * memoryChunkBytes);
      const stop = Math.min(offset + length, index * memoryChunkBytes + this.#chunkLength(index));
      zeroPiece(index, start - index * memoryChunkBytes, stop - start);
    }
  }

  /** Allocated chunk indices overlapping the range, ascending; cost bounded by min(range chunks, Map size). */
  #allocatedIndices(offset: number, length: number): number[] {
    const first = Math.floor(offset / memoryChunkBytes);
    const last = Math.floor((offset + length - 1) / memoryChunkBytes);
    const found: number[] = [];
    if (last - first + 1 <= this.#chunks.size) {
      for (let index = first; index <= last; index++) if (this.#chunks.has(index)) found.push(index);
      return found;
    }
    for (const index of this.#chunks.keys()) if (index >= first && index <= last) found.push(index);
    return found.sort((a, b) => a - b);
  }
}
