/**
 * A layer that makes any device read-only, in the style of an nbdkit filter with an explicit `next`:
 * reads, extents, cache and flush pass through; write, trim and writeZeroes are refused with EPERM
 * after the range check (out-of-range requests keep their ENOSPC/EINVAL, as nbdkit orders them).
 * The layer owns `next`: closing it closes `next`.
 */
import {
  BlockDeviceError,
  checkRange,
  type BlockDevice,
  type BlockSizes,
  type Capabilities,
  type Extent,
  type RangeVerb,
  type WriteOptions,
  type ZeroOptions,
} from '../device.js';

export class ReadOnlyDevice implements BlockDevice {
  readonly next: BlockDevice;
  readonly capabilities: Capabilities;

  constructor(next: BlockDevice) {
    this.next = next;
    this.capabilities = Object.freeze({ ...next.capabilities, readOnly: true });
  }

  get size(): number {
    return this.next.size;
  }

  get blockSizes(): BlockSizes {
    return this.next.blockSizes;
  }

  read(buf: Uint8Array, offset: number): Promise<void> {
    return this.next.read(buf, offset);
  }

  async write(data: Uint8Array, offset: number, _options?: WriteOptions): Promise<void> {
    this.#refuse(offset, data.byteLength, 'write');
  }

  flush(): Promise<void> {
    return this.next.flush();
  }

  async trim(offset: number, length: number, _options?: WriteOptions): Promise<void> {
    this.#refuse(offset, length, 'trim');
  }

  async writeZeroes(offset: number, length: number, _options?: ZeroOptions): Promise<void> {
    this.#refuse(offset, length, 'zero');
  }

  cache(offset: number, length: number): Promise<void> {
    return this.next.cache(offset, length);
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    return this.next.extents(offset, length);
  }

  close(): Promise<void> {
    return this.next.close();
  }

  #refuse(offset: number, length: number, verb: RangeVerb): never {
    checkRange(this.size, offset, length, verb);
    throw new BlockDeviceError('EPERM', `${verb}: device is read-only`);
  }
}
