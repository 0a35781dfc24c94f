/**
 * Errors of the block verbs, and the one mapping from what the operating system reports to them. The
 * NBD server turns a code into a wire errno in exactly one table; the engine, the file devices and the
 * server all fold system errors through `toBlockDeviceError`, so ENOSPC stays ENOSPC all the way to the
 * client (QEMU pauses a VM on it) and EIO means a real I/O error.
 */

/** Errno-style codes, the set the NBD protocol can carry. */
export type BlockErrorCode = 'EPERM' | 'EIO' | 'ENOMEM' | 'EINVAL' | 'ENOSPC' | 'EOVERFLOW' | 'ENOTSUP' | 'ESHUTDOWN';

export class BlockDeviceError extends Error {
  readonly code: BlockErrorCode;
  constructor(code: BlockErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BlockDeviceError';
    this.code = code;
  }
}

export function isBlockDeviceError(err: unknown): err is BlockDeviceError {
  return err instanceof BlockDeviceError;
}

/**
 * Node/libuv system error codes folded onto the NBD set: out of space in any form is ENOSPC, a refusal
 * to write is EPERM; anything not listed is EIO, so a client learns the request failed without us
 * inventing a cause.
 */
const systemCodes: Readonly<Record<string, BlockErrorCode>> = {
  EPERM: 'EPERM',
  EACCES: 'EPERM',
  EROFS: 'EPERM',
  EIO: 'EIO',
  ENOMEM: 'ENOMEM',
  ENOSPC: 'ENOSPC',
  EDQUOT: 'ENOSPC',
  EFBIG: 'ENOSPC',
  EOVERFLOW: 'EOVERFLOW',
  ENOTSUP: 'ENOTSUP',
  EOPNOTSUPP: 'ENOTSUP',
  ESHUTDOWN: 'ESHUTDOWN',
};

/** The code a system error (or anything thrown) stands for. */
export function blockErrorCode(err: unknown): BlockErrorCode {
  if (err instanceof BlockDeviceError) return err.code;
  const raw = typeof err === 'object' && err !== null ? (err as { code?: unknown }).code : undefined;
  return (typeof raw === 'string' && systemCodes[raw]) || 'EIO';
}

/** `err` as a BlockDeviceError: itself, or the mapped code with `context` in the message and `err` as cause. */
export function toBlockDeviceError(err: unknown, context: string): BlockDeviceError {
  if (err instanceof BlockDeviceError) return err;
  const detail = err instanceof Error ? err.message : String(err);
  return new BlockDeviceError(blockErrorCode(err), `${context}: ${detail}`, { cause: err });
}

export type RangeVerb = 'read' | 'write' | 'trim' | 'zero' | 'cache' | 'extents';

/**
 * The range check of the NBD spec: ENOSPC for writes and zeroes past the end, EINVAL for everything
 * else (and for negative or non-integer values). Returns the error rather than throwing, so a caller on
 * the hot path rejects a promise without a try block.
 */
export function rangeError(size: number, offset: number, length: number, verb: RangeVerb): BlockDeviceError | null {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    return new BlockDeviceError('EINVAL', `${verb}: invalid range offset=${offset} length=${length}`);
  }
  if (offset + length > size) {
    const code = verb === 'write' || verb === 'zero' ? 'ENOSPC' : 'EINVAL';
    return new BlockDeviceError(code, `${verb}: range ${offset}+${length} is past the end (size ${size})`);
  }
  return null;
}

/** `rangeError`, thrown. */
export function checkRange(size: number, offset: number, length: number, verb: RangeVerb): void {
  const err = rangeError(size, offset, length, verb);
  if (err !== null) throw err;
}
