import {
  BlockDeviceError,
  checkRange,
  defaultBlockSizes,
  type BlockDevice,
  type BlockSizes,
  type Capabilities,
  type Extent,
  type WriteOptions,
  type ZeroOptions,
} from 'nbd-server-js';

/**
 * The BlockDevice face of one view (primary or secondary) of a disk strategy. It checks what can be
 * checked without the strategy's state (closed, range, unsupported flags) and hands the rest to the
 * strategy, which decides under its lock (e.g. EPERM for primary writes after failover).
 *
 * Capabilities: flush and FUA are real (fdatasync); trim is recorded as zeroes, like the gannet engine
 * and the reference model do; writeZeroes writes zero buffers, so there is no fast zero; no cache
 * hint; extents report "all data" because these baselines keep no allocation map of the backing file.
 * multiConn holds because every connection to a view shares the same files, and a flush syncs them.
 */

export interface ViewOps {
  read(buf: Uint8Array, offset: number): Promise<void>;
  write(data: Uint8Array, offset: number, fua: boolean): Promise<void>;
  zero(offset: number, length: number, fua: boolean): Promise<void>;
  flush(): Promise<void>;
}

export const diskViewCapabilities: Capabilities = Object.freeze({
  readOnly: false,
  flush: true,
  fua: true,
  trim: true,
  zero: true,
  fastZero: false,
  cache: false,
  multiConn: true,
  extents: false,
});

export class StrategyView implements BlockDevice {
  readonly size: number;
  readonly capabilities: Capabilities = diskViewCapabilities;
  readonly blockSizes: BlockSizes = defaultBlockSizes;
  private readonly label: string;
  private readonly ops: ViewOps;
  private readonly isClosed: () => boolean;

  constructor(label: string, size: number, ops: ViewOps, isClosed: () => boolean) {
    this.label = label;
    this.size = size;
    this.ops = ops;
    this.isClosed = isClosed;
  }

  private checkOpen(verb: string): void {
    if (this.isClosed()) throw new BlockDeviceError('ESHUTDOWN', `${this.label}: ${verb} on a closed volume`);
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    this.checkOpen('read');
    checkRange(this.size, offset, buf.length, 'read');
    if (buf.length === 0) return;
    await this.ops.read(buf, offset);
  }

  async write(data: Uint8Array, offset: number, options?: WriteOptions): Promise<void> {
    this.checkOpen('write');
    checkRange(this.size, offset, data.length, 'write');
    if (data.length === 0) return;
    await this.ops.write(data, offset, options?.fua === true);
  }

  async flush(): Promise<void> {
    this.checkOpen('flush');
    await this.ops.flush();
  }

  async trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    this.checkOpen('trim');
    checkRange(this.size, offset, length, 'trim');
    if (length === 0) return;
    await this.ops.zero(offset, length, options?.fua === true);
  }

  async writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    this.checkOpen('writeZeroes');
    checkRange(this.size, offset, length, 'zero');
    if (options?.fastZero === true) {
      throw new BlockDeviceError('ENOTSUP', `${this.label}: zeroes are written, not fast`);
    }
    if (length === 0) return;
    await this.ops.zero(offset, length, options?.fua === true);
  }

  async cache(offset: number, length: number): Promise<void> {
    this.checkOpen('cache');
    checkRange(this.size, offset, length, 'cache');
    throw new BlockDeviceError('ENOTSUP', `${this.label}: no cache hint`);
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    this.checkOpen('extents');
    checkRange(this.size, offset, length, 'extents');
    if (length === 0) throw new BlockDeviceError('EINVAL', `${this.label}: extents of an empty range`);
    return [{ length, flags: 0 }];
  }

  /** The views live as long as their volume; closing a view alone is a no-op (the daemon closes the volume). */
  async close(): Promise<void> {}
}
