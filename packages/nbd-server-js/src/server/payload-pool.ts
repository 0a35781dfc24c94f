/**
 * Recycled buffers for WRITE payloads and READ replies. A fresh 1 MiB buffer per request costs more
 * than the copy into it: malloc hands back newly mapped pages, each faulted in on first touch, and the
 * garbage collector then has to notice and free megabytes of external memory per millisecond. A payload
 * goes back to the pool once the device's write has settled, which the BlockDevice contract allows
 * (`write` keeps no reference to `data` after its promise settles); a READ buffer once the socket has
 * written the reply.
 *
 * Buffers come in power-of-two classes from `pooledBytesMin` up; a payload is a view of the first
 * `length` bytes of one. Smaller payloads use Node's allocator, which slices buffers under 4 KiB out of
 * a shared pool already (a 4 KiB buffer is its own allocation there, hence the pool from 4 KiB).
 */

import { KiB, MiB } from '@gannet/block-device';

export const pooledBytesMin = 4 * KiB;
/** Free buffers kept per server; what a burst allocated beyond this is left to the garbage collector. */
export const payloadPoolBytesMaxDefault = 64 * MiB;

export class PayloadPool {
  /** Free ArrayBuffers by class (log2 of the size). */
  private readonly free = new Map<number, ArrayBuffer[]>();
  /** ArrayBuffers handed out and not yet returned: catches a double release, which would alias two payloads. */
  private readonly lent = new WeakSet<ArrayBuffer>();
  private retained = 0;

  constructor(readonly retainedBytesMax: number = payloadPoolBytesMaxDefault) {
    if (!(Number.isSafeInteger(retainedBytesMax) && retainedBytesMax >= 0)) {
      throw new RangeError(`retainedBytesMax must be a non-negative integer: ${retainedBytesMax}`);
    }
  }

  /** Free bytes held for reuse. */
  get retainedBytes(): number {
    return this.retained;
  }

  /** Bytes a buffer of `length` really holds: its whole class when pooled. In-flight budgets count this. */
  footprint(length: number): number {
    return length < pooledBytesMin ? length : 2 ** Math.ceil(Math.log2(length));
  }

  /** A buffer of exactly `length` bytes with undefined contents. */
  acquire(length: number): Buffer {
    if (length < pooledBytesMin) return Buffer.allocUnsafe(length);
    const cls = Math.ceil(Math.log2(length));
    const list = this.free.get(cls);
    let ab = list?.pop();
    if (ab !== undefined) this.retained -= ab.byteLength;
    else ab = Buffer.allocUnsafeSlow(2 ** cls).buffer as ArrayBuffer;
    this.lent.add(ab);
    return Buffer.from(ab, 0, length);
  }

  /** Returns a buffer from `acquire`; the caller must not touch it afterwards. Small ones are ignored. */
  release(buf: Buffer): void {
    if (buf.byteLength < pooledBytesMin) return;
    const ab = buf.buffer as ArrayBuffer;
    if (!this.lent.delete(ab)) throw new Error('PayloadPool: released a buffer it did not lend (or released it twice)');
    if (this.retained + ab.byteLength > this.retainedBytesMax) return;
    const cls = Math.log2(ab.byteLength);
    let list = this.free.get(cls);
    if (list === undefined) {
      list = [];
      this.free.set(cls, list);
    }
    list.push(ab);
    this.retained += ab.byteLength;
  }
}
