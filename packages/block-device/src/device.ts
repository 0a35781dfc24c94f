/**
 * The one seam of the project: a block device is a flat table of verbs on byte ranges plus capability
 * queries, like nbdkit's plugin interface. The NBD server serves one; every view of a replicated volume
 * is one; the engine's backing file is one; `runBlockDeviceSuite` (@gannet/block-device/conformance)
 * checks the contract on each.
 *
 * Contract, for every implementation:
 * - Offsets and lengths are byte-granular non-negative safe integers; `offset + length <= size`.
 *   Input is checked once, at the public verb (`AbstractBlockDevice`): a bad range rejects with the
 *   errno the NBD spec assigns (ENOSPC for write and zero past the end, EINVAL otherwise), a mutating
 *   verb on a read-only device with EPERM, a closed device with ESHUTDOWN.
 * - Zero-length requests succeed without doing anything (`extents` of zero bytes answers []).
 * - `read` fills the caller's buffer completely; the device never allocates the result buffer, and
 *   never touches `buf` once its promise settles, failed or not (a device that splits a read waits
 *   for every piece, see `settleAll`): the caller reuses it.
 * - `write`, `writev` and `writeBatch` must not keep a reference to their data once the promise settles.
 * - `fua` on write/trim/zero means the data is durable (to the device's guarantee) before resolving;
 *   it is refused with EINVAL by a device that does not advertise `fua`.
 * - `flush` makes every write that resolved before `flush` was called durable.
 * - What a device does not support, per `capabilities`, has one declared answer: trim and cache are
 *   advisory and resolve doing nothing; extents reports the whole range as data; flush resolves (there
 *   is no volatile cache to empty); writeZeroes always works, and only `fastZero` is refused (ENOTSUP)
 *   by a device that cannot zero quickly.
 */

import { MiB } from './units.js';

export interface Capabilities {
  /** Writes, trims and zeroes are refused with EPERM. */
  readonly readOnly: boolean;
  /** FLUSH is meaningful (advertised as SEND_FLUSH). */
  readonly flush: boolean;
  /** Writes accept `fua` (advertised as SEND_FUA). */
  readonly fua: boolean;
  /** `trim` may deallocate (advertised as SEND_TRIM); without it, trim does nothing. */
  readonly trim: boolean;
  /** `writeZeroes` is efficient (not emulated by writing zero buffers). */
  readonly zero: boolean;
  /** `writeZeroes` with `fastZero` can succeed quickly (else it rejects with ENOTSUP). */
  readonly fastZero: boolean;
  /** `cache` prefetches; without it, cache does nothing. */
  readonly cache: boolean;
  /** FLUSH/FUA through one connection is visible and durable on all connections to the same device. */
  readonly multiConn: boolean;
  /** `extents` reports real allocation (holes and zeroes); without it, the whole range is data. */
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

/** One write of a batch: `buffers` written back to back from `offset`. */
export interface WriteRun {
  readonly offset: number;
  readonly buffers: readonly Uint8Array[];
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
  /** Writes `buffers` back to back from `offset`, as one write (a flush writes slab slots this way). */
  writev(buffers: readonly Uint8Array[], offset: number, options?: WriteOptions): Promise<void>;
  /**
   * Many writes in one call, done in no particular order (the runs must not overlap); resolves once every
   * run is written, rejects with the first failure once every run has settled. A device may hand the
   * whole batch to another thread (FileDevice does, for data in SharedArrayBuffers): the engine's flush
   * writes thousands of small runs this way without a callback on the event loop for each.
   */
  writeBatch(runs: readonly WriteRun[]): Promise<void>;
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
  maximum: 32 * MiB,
});

/** Every verb works, nothing is durable beyond memory: what memory-backed devices declare. */
export const allCapabilities: Capabilities = Object.freeze({
  readOnly: false,
  flush: true,
  fua: true,
  trim: true,
  zero: true,
  fastZero: true,
  cache: true,
  multiConn: true,
  extents: true,
});

/**
 * Waits for every promise, then rejects with the first failure, if any. `Promise.all` rejects at the
 * first failure while the other pieces of a split read may still be writing into the caller's buffer,
 * which the caller is free to reuse once the read has settled.
 */
export async function settleAll(pieces: readonly Promise<unknown>[]): Promise<void> {
  const results = await Promise.allSettled(pieces);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}
