import { AbstractBlockDevice, type ZeroRequest } from './abstract.js';
import type { BlockDevice, Capabilities, Extent, WriteRun } from './device.js';

/**
 * A layer over another device, in the style of an nbdkit filter with an explicit `next`: every verb
 * passes through unless a subclass changes it. The filter owns `next`: closing it closes `next`.
 */
export class FilterDevice extends AbstractBlockDevice {
  readonly next: BlockDevice;

  constructor(next: BlockDevice) {
    super(next.size, next.blockSizes);
    this.next = next;
  }

  get capabilities(): Capabilities {
    return this.next.capabilities;
  }

  protected _read(buf: Uint8Array, offset: number): Promise<void> {
    return this.next.read(buf, offset);
  }

  protected _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    return this.next.write(data, offset, fua ? { fua } : undefined);
  }

  protected override _writev(buffers: readonly Uint8Array[], offset: number, fua: boolean): Promise<void> {
    return this.next.writev(buffers, offset, fua ? { fua } : undefined);
  }

  protected override _writeBatch(runs: readonly WriteRun[]): Promise<void> {
    return this.next.writeBatch(runs);
  }

  protected override _flush(): Promise<void> {
    return this.next.flush();
  }

  protected override _trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.next.trim(offset, length, fua ? { fua } : undefined);
  }

  protected override _zero(offset: number, length: number, request: ZeroRequest): Promise<void> {
    return this.next.writeZeroes(offset, length, request);
  }

  protected override _cache(offset: number, length: number): Promise<void> {
    return this.next.cache(offset, length);
  }

  protected override _extents(offset: number, length: number): Promise<Extent[]> {
    return this.next.extents(offset, length);
  }

  protected override _close(): Promise<void> {
    return this.next.close();
  }
}
