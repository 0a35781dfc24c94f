import {
  defaultBlockSizes,
  settleAll,
  type BlockDevice,
  type BlockSizes,
  type Capabilities,
  type Extent,
  type WriteOptions,
  type WriteRun,
  type ZeroOptions,
} from './device.js';
import { BlockDeviceError, rangeError, type RangeVerb } from './errors.js';
import { zeroChunkBytes, zeroes } from './units.js';

/** What `_zero` is asked to do; the public verb has already refused fastZero where it cannot be fast. */
export interface ZeroRequest {
  readonly fua: boolean;
  readonly noHole: boolean;
  readonly fastZero: boolean;
}

const resolved = Promise.resolve();

/**
 * The base of every device, layer and view, in the style of abstract-level: the public verbs check
 * their input once (open, range, read-only, flags, capabilities), answer zero-length requests and the
 * declared answers for unsupported verbs themselves (see device.ts), count the request in flight, and
 * only then call the protected `_verb`, which trusts its arguments. `close()` stops new requests, waits
 * for those in flight, then calls `_close()`.
 *
 * A subclass implements `_read` and `_write`, and overrides what it does better than the defaults:
 * `_writev` (pieces written one after the other), `_writeBatch` (runs written through `_writev`, all at
 * once), `_zero` (zero buffers written through `_write`),
 * `_flush`, `_trim` and `_cache` (nothing to do), `_extents` (all data), `_close`.
 */
export abstract class AbstractBlockDevice implements BlockDevice {
  readonly size: number;
  readonly blockSizes: BlockSizes;
  #state: 'open' | 'closing' | 'closed' = 'open';
  #inflight = 0;
  #drained: (() => void) | null = null;
  #closing: Promise<void> | null = null;
  readonly #end = (): void => {
    this.#inflight--;
    if (this.#inflight === 0 && this.#drained !== null) {
      this.#drained();
      this.#drained = null;
    }
  };

  protected constructor(size: number, blockSizes: BlockSizes = defaultBlockSizes) {
    if (!Number.isSafeInteger(size) || size < 0) throw new BlockDeviceError('EINVAL', `invalid device size ${size}`);
    this.size = size;
    this.blockSizes = blockSizes;
  }

  abstract get capabilities(): Capabilities;

  /** Whether the device still takes requests (false from the start of `close()`). */
  protected get isOpen(): boolean {
    return this.#state === 'open';
  }

  protected abstract _read(buf: Uint8Array, offset: number): Promise<void>;
  protected abstract _write(data: Uint8Array, offset: number, fua: boolean): Promise<void>;

  protected async _writev(buffers: readonly Uint8Array[], offset: number, fua: boolean): Promise<void> {
    let at = offset;
    for (let i = 0; i < buffers.length; i++) {
      const last = i === buffers.length - 1;
      if (buffers[i].byteLength > 0 || last) await this._write(buffers[i], at, fua && last);
      at += buffers[i].byteLength;
    }
  }

  protected async _writeBatch(runs: readonly WriteRun[]): Promise<void> {
    const writes: Promise<void>[] = [];
    for (const run of runs) {
      if (run.buffers.length === 1) writes.push(this._write(run.buffers[0], run.offset, false));
      else if (run.buffers.length > 1) writes.push(this._writev(run.buffers, run.offset, false));
    }
    await settleAll(writes);
  }

  protected _flush(): Promise<void> {
    return resolved;
  }

  protected _trim(_offset: number, _length: number, _fua: boolean): Promise<void> {
    return resolved;
  }

  protected async _zero(offset: number, length: number, request: ZeroRequest): Promise<void> {
    for (let done = 0; done < length; done += zeroChunkBytes) {
      const n = Math.min(zeroChunkBytes, length - done);
      await this._write(zeroes(n), offset + done, request.fua && done + n === length);
    }
  }

  protected _cache(_offset: number, _length: number): Promise<void> {
    return resolved;
  }

  protected _extents(_offset: number, length: number): Promise<Extent[]> {
    return Promise.resolve([{ length, flags: 0 }]);
  }

  protected _close(): Promise<void> {
    return resolved;
  }

  read(buf: Uint8Array, offset: number): Promise<void> {
    const err = this.#check('read', offset, buf.byteLength, false, false);
    if (err !== null) return Promise.reject(err);
    if (buf.byteLength === 0) return resolved;
    return this.#track(() => this._read(buf, offset));
  }

  write(data: Uint8Array, offset: number, options?: WriteOptions): Promise<void> {
    const fua = options?.fua === true;
    const err = this.#check('write', offset, data.byteLength, true, fua);
    if (err !== null) return Promise.reject(err);
    if (data.byteLength === 0) return resolved;
    return this.#track(() => this._write(data, offset, fua));
  }

  writev(buffers: readonly Uint8Array[], offset: number, options?: WriteOptions): Promise<void> {
    const fua = options?.fua === true;
    let length = 0;
    for (const b of buffers) length += b.byteLength;
    const err = this.#check('write', offset, length, true, fua);
    if (err !== null) return Promise.reject(err);
    if (length === 0) return resolved;
    return this.#track(() => (buffers.length === 1 ? this._write(buffers[0], offset, fua) : this._writev(buffers, offset, fua)));
  }

  writeBatch(runs: readonly WriteRun[]): Promise<void> {
    let total = 0;
    for (const run of runs) {
      let length = 0;
      for (const b of run.buffers) length += b.byteLength;
      const err = this.#check('write', run.offset, length, true, false);
      if (err !== null) return Promise.reject(err);
      total += length;
    }
    if (total === 0) return resolved;
    return this.#track(() => this._writeBatch(runs));
  }

  flush(): Promise<void> {
    if (this.#state !== 'open') return Promise.reject(this.#closedError('flush'));
    if (!this.capabilities.flush) return resolved;
    return this.#track(() => this._flush());
  }

  trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    const fua = options?.fua === true;
    const err = this.#check('trim', offset, length, true, fua);
    if (err !== null) return Promise.reject(err);
    if (length === 0 || !this.capabilities.trim) return resolved;
    return this.#track(() => this._trim(offset, length, fua));
  }

  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    const fua = options?.fua === true;
    const err = this.#check('zero', offset, length, true, fua);
    if (err !== null) return Promise.reject(err);
    const fastZero = options?.fastZero === true;
    if (fastZero && !this.capabilities.fastZero) {
      return Promise.reject(new BlockDeviceError('ENOTSUP', 'zero: this device cannot zero quickly'));
    }
    if (length === 0) return resolved;
    return this.#track(() => this._zero(offset, length, { fua, noHole: options?.noHole === true, fastZero }));
  }

  cache(offset: number, length: number): Promise<void> {
    const err = this.#check('cache', offset, length, false, false);
    if (err !== null) return Promise.reject(err);
    if (length === 0 || !this.capabilities.cache) return resolved;
    return this.#track(() => this._cache(offset, length));
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    const err = this.#check('extents', offset, length, false, false);
    if (err !== null) return Promise.reject(err);
    if (length === 0) return Promise.resolve([]);
    if (!this.capabilities.extents) return Promise.resolve([{ length, flags: 0 }]);
    return this.#track(() => this._extents(offset, length));
  }

  close(): Promise<void> {
    this.#closing ??= this.#closeNow();
    return this.#closing;
  }

  async #closeNow(): Promise<void> {
    this.#state = 'closing';
    if (this.#inflight > 0) await new Promise<void>((resolve) => (this.#drained = resolve));
    this.#state = 'closed';
    await this._close();
  }

  #closedError(verb: string): BlockDeviceError {
    return new BlockDeviceError('ESHUTDOWN', `${verb}: the device is closed`);
  }

  #check(verb: RangeVerb, offset: number, length: number, mutates: boolean, fua: boolean): BlockDeviceError | null {
    if (this.#state !== 'open') return this.#closedError(verb);
    const err = rangeError(this.size, offset, length, verb);
    if (err !== null) return err;
    if (mutates || fua) {
      const caps = this.capabilities;
      if (mutates && caps.readOnly) return new BlockDeviceError('EPERM', `${verb}: the device is read-only`);
      if (fua && !caps.fua) return new BlockDeviceError('EINVAL', `${verb}: FUA is not supported by this device`);
    }
    return null;
  }

  /** Counts the request until it settles, so close() waits for it. */
  #track<T>(run: () => Promise<T>): Promise<T> {
    let p: Promise<T>;
    try {
      p = run();
    } catch (err) {
      return Promise.reject(err);
    }
    this.#inflight++;
    p.then(this.#end, this.#end);
    return p;
  }
}
