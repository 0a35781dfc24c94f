/**
 * The one seam of the project: a block device is a flat table of verbs on byte ranges plus capability
 * queries, like nbdkit's plugin interface. The NBD server serves one; every view of a replicated volume
 * is one; `runBlockDeviceSuite` (nbd-server-js/conformance) checks the contract on each.
 *
 * Contract, for every implementation:
 * - Offsets and lengths are byte-granular non-negative safe integers; `offset + length <= size`.
 *   Devices re-check ranges with `checkRange` (they are importable without the NBD server in front),
 *   and reject with a `BlockDeviceError` whose `code` is the errno the NBD spec assigns.
 * - `read` fills the caller's buffer completely; the device never allocates the result buffer, and
 *   never touches `buf` once its promise settles, failed or not (a device that splits a read waits
 *   for every piece, see `settleAll`): the caller reuses it.
 * - `write` must not keep a reference to `data` once its promise settles: the caller reuses it.
 * - `fua` on write/trim/zero means the data is durable (to the device's guarantee) before resolving.
 * - `flush` makes every write that resolved before `flush` was called durable.
 * - Verbs a device does not support (per `capabilities`) reject with ENOTSUP (or EPERM when read-only).
 */

/** Errno-style codes. The NBD server maps them to wire errors in exactly one place. */
export type BlockErrorCode =
  | 'EPERM'
  | 'EIO'
  | 'ENOMEM'
  | 'EINVAL'
  | 'ENOSPC'
  | 'EOVERFLOW'
  | 'ENOTSUP'
  | 'ESHUTDOWN';

export class BlockDeviceError extends Error {
  readonly code: BlockErrorCode;
  constructor(code: BlockErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BlockDeviceError';
    this.code = code;
  }
}

export interface Capabilities {
  /** Writes, trims and zeroes are refused with EPERM. */
  readonly readOnly: boolean;
  /** FLUSH is meaningful (advertised as SEND_FLUSH). */
  readonly flush: boolean;
  /** Writes accept `fua` (advertised as SEND_FUA). */
  readonly fua: boolean;
  /** `trim` may deallocate. */
  readonly trim: boolean;
  /** `writeZeroes` is efficient (not emulated by writing zero buffers). */
  readonly zero: boolean;
  /** `writeZeroes` with `fastZero` can succeed quickly (else it rejects with ENOTSUP). */
  readonly fastZero: boolean;
  /** `cache` prefetches. */
  readonly cache: boolean;
  /** FLUSH/FUA through one connection is visible and durable on all connections to the same device. */
  readonly multiConn: boolean;
  /** `extents` reports real allocation (holes and zeroes), not just "all data". */
  readonly extents: boolean;
}

/** NBD base:allocation flags. */
export const EXTENT_HOLE = 1;
export const EXTENT_ZERO = 2;

export interface Extent {
  /** Bytes, > 0. */
  readonly length: number;
  /** Bitwise OR of EXTENT_HOLE and EXTENT_ZERO. */
  readonly flags: number;
}

export interface BlockSizes {
  /** Power of two, 1..65536. */
  readonly minimum: number;
  /** Power of two, >= 512 and >= minimum. */
  readonly preferred: number;
  /** >= preferred; the largest single payload the device wants. */
  readonly maximum: number;
}

export interface WriteOptions {
  readonly fua?: boolean;
}

export interface ZeroOptions {
  readonly fua?: boolean;
  /** The range must read back as zeroes and stay allocated (NBD_CMD_FLAG_NO_HOLE). */
  readonly noHole?: boolean;
  /** Fail with ENOTSUP instead of doing slow work (NBD_CMD_FLAG_FAST_ZERO). */
  readonly fastZero?: boolean;
}

export interface BlockDevice {
  /** Size in bytes; not necessarily a multiple of 512. */
  readonly size: number;
  readonly capabilities: Capabilities;
  readonly blockSizes: BlockSizes;
  read(buf: Uint8Array, offset: number): Promise<void>;
  write(data: Uint8Array, offset: number, options?: WriteOptions): Promise<void>;
  flush(): Promise<void>;
  trim(offset: number, length: number, options?: WriteOptions): Promise<void>;
  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void>;
  cache(offset: number, length: number): Promise<void>;
  /**
   * Allocation of [offset, offset + length): extents in order, each length > 0, covering at least the
   * first byte; they may stop short of the end (the caller asks again) but never run past `size`.
   */
  extents(offset: number, length: number): Promise<Extent[]>;
  close(): Promise<void>;
}

/** The defaults most devices use: byte-granular, 4 KiB preferred, 32 MiB maximum payload. */
export const defaultBlockSizes: BlockSizes = Object.freeze({
  minimum: 1,
  preferred: 4096,
  maximum: 32 * 1024 * 1024,
});

export type RangeVerb = 'read' | 'write' | 'trim' | 'zero' | 'cache' | 'extents';

/**
 * Rejects a range outside the device the way the NBD spec asks: ENOSPC for writes and zeroes past the
 * end, EINVAL for everything else (and for negative or non-integer values).
 */
export function checkRange(size: number, offset: number, length: number, verb: RangeVerb): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new BlockDeviceError('EINVAL', `${verb}: invalid range offset=${offset} length=${length}`);
  }
  if (offset + length > size) {
    const code = verb === 'write' || verb === 'zero' ? 'ENOSPC' : 'EINVAL';
    throw new BlockDeviceError(code, `${verb}: range ${offset}+${length} is past the end (size ${size})`);
  }
}

/**
 * Waits for every promise, then rejects with the first failure, if any. `Promise.all` rejects at the
 * first failure while the other pieces of a split read may still be writing into the caller's buffer,
 * which the caller is free to reuse once the read has settled.
 */
export async function settleAll(pieces: readonly Promise<unknown>[]): Promise<void> {
  const results = await Promise.allSettled(pieces);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}

export function isBlockDeviceError(err: unknown): err is BlockDeviceError {
  return err instanceof BlockDeviceError;
}
