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

import v8 from 'node:v8';
import vm from 'node:vm';
import { KiB, MiB } from '@gannet/block-device';

export const pooledBytesMin = 4 * KiB;
/** Free buffers kept per server; what a burst allocated beyond this is dropped (and collected, below). */
export const payloadPoolBytesMaxDefault = 64 * MiB;
/**
 * Dropped buffers are only memory returned to the system once the garbage collector runs, and V8 runs
 * it when the JavaScript heap grows, not when external memory is let go: after a burst an idle server
 * kept every buffer of it for as long as it stayed idle (2.3 GiB after one attack). Once this much has
 * been dropped, the pool asks for a full collection.
 */
export const collectAfterDroppedBytes = 32 * MiB;
/** Forced collections are at least this far apart, so a steady churn costs at most one per interval. */
export const collectIntervalMsMin = 1000;

/** What a connection takes payload buffers from. */
export interface PayloadSource {
  /** Bytes a buffer of `length` really holds: its whole class when pooled. Budgets count this. */
  footprint(length: number): number;
  /** A buffer of exactly `length` bytes (undefined contents), or null when memory is short right now. */
  tryAcquire(length: number): Buffer | null;
  /** Hands a buffer back; the caller must not touch it afterwards. */
  release(buf: Buffer): void;
}

/** Bytes a buffer of `length` really holds: its whole class when pooled. Budgets count this. */
export function pooledFootprint(length: number): number {
  return length < pooledBytesMin ? length : 2 ** Math.ceil(Math.log2(length));
}

let fullCollection: (() => void) | null | undefined;

/**
 * The engine's full garbage collection: `gc` when node runs with --expose-gc, else the same function
 * taken from a fresh context after setting the flag (V8 installs it in contexts created afterwards).
 * Null where neither works; dropped buffers then wait for V8's own schedule.
 */
function collector(): (() => void) | null {
  if (fullCollection !== undefined) return fullCollection;
  const exposed = (globalThis as { gc?: () => void }).gc;
  if (typeof exposed === 'function') {
    fullCollection = exposed;
    return fullCollection;
  }
  try {
    v8.setFlagsFromString('--expose-gc');
    const gc: unknown = vm.runInNewContext('gc');
    fullCollection = typeof gc === 'function' ? (gc as () => void) : null;
  } catch {
    fullCollection = null;
  }
  return fullCollection;
}

export class PayloadPool implements PayloadSource {
  /** Free ArrayBuffers by class (log2 of the size). */
  private readonly free = new Map<number, ArrayBuffer[]>();
  /** ArrayBuffers handed out and not yet returned: catches a double release, which would alias two payloads. */
  private readonly lent = new WeakSet<ArrayBuffer>();
  private retained = 0;
  private dropped = 0;
  private collectTimer: NodeJS.Timeout | null = null;
  private lastCollectMs = 0;

  constructor(readonly retainedBytesMax: number = payloadPoolBytesMaxDefault) {
    if (!(Number.isSafeInteger(retainedBytesMax) && retainedBytesMax >= 0)) {
      throw new RangeError(`retainedBytesMax must be a non-negative integer: ${retainedBytesMax}`);
    }
  }

  /** Free bytes held for reuse. */
  get retainedBytes(): number {
    return this.retained;
  }

  /** Bytes released beyond the retention cap and not yet collected. */
  get droppedBytes(): number {
    return this.dropped;
  }

  /** Bytes a buffer of `length` really holds: its whole class when pooled. In-flight budgets count this. */
  footprint(length: number): number {
    return pooledFootprint(length);
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

  /** The pool itself has no limit: it never refuses. */
  tryAcquire(length: number): Buffer {
    return this.acquire(length);
  }

  /** Returns a buffer from `acquire`; the caller must not touch it afterwards. Small ones are ignored. */
  release(buf: Buffer): void {
    if (buf.byteLength < pooledBytesMin) return;
    const ab = buf.buffer as ArrayBuffer;
    if (!this.lent.delete(ab)) throw new Error('PayloadPool: released a buffer it did not lend (or released it twice)');
    if (this.retained + ab.byteLength > this.retainedBytesMax) {
      this.drop(ab.byteLength);
      return;
    }
    const cls = Math.log2(ab.byteLength);
    let list = this.free.get(cls);
    if (list === undefined) {
      list = [];
      this.free.set(cls, list);
    }
    list.push(ab);
    this.retained += ab.byteLength;
  }

  /** Stops a pending collection (the server closed); dropped memory is then left to V8. */
  close(): void {
    if (this.collectTimer !== null) clearTimeout(this.collectTimer);
    this.collectTimer = null;
  }

  private drop(bytes: number): void {
    this.dropped += bytes;
    if (this.dropped < collectAfterDroppedBytes || this.collectTimer !== null) return;
    const delayMs = Math.max(0, this.lastCollectMs + collectIntervalMsMin - Date.now());
    this.collectTimer = setTimeout(() => this.collect(), delayMs);
    this.collectTimer.unref();
  }

  private collect(): void {
    this.collectTimer = null;
    this.lastCollectMs = Date.now();
    this.dropped = 0;
    collector()?.();
  }
}
