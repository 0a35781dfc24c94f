/**
 * The one mapping from errors (BlockDeviceError codes, Node system error codes) to NBD wire errors.
 * Anything unrecognised is EIO: the client learns the request failed without us inventing a cause.
 */
import { BlockDeviceError, type BlockErrorCode } from '../device.js';
import { NBD_EIO } from '../protocol/constants.js';
import { wireErrnoByCode } from '../protocol/errno.js';

/** Node/libuv system error codes a file-backed device may surface, folded onto the NBD set. */
const systemCodes: Readonly<Record<string, BlockErrorCode>> = {
  EPERM: 'EPERM',
  EACCES: 'EPERM',
  EROFS: 'EPERM',
  EIO: 'EIO',
  ENOMEM: 'ENOMEM',
  EINVAL: 'EINVAL',
  ENOSPC: 'ENOSPC',
  EDQUOT: 'ENOSPC',
  EFBIG: 'ENOSPC',
  EOVERFLOW: 'EOVERFLOW',
  ENOTSUP: 'ENOTSUP',
  EOPNOTSUPP: 'ENOTSUP',
  ESHUTDOWN: 'ESHUTDOWN',
};

export interface WireError {
  readonly code: BlockErrorCode;
  readonly errno: number;
  readonly message: string;
}

export function toWireError(err: unknown): WireError {
  if (err instanceof BlockDeviceError) {
    return { code: err.code, errno: wireErrnoByCode[err.code] ?? NBD_EIO, message: err.message };
  }
  const rawCode = typeof err === 'object' && err !== null ? (err as { code?: unknown }).code : undefined;
  const code: BlockErrorCode = (typeof rawCode === 'string' && systemCodes[rawCode]) || 'EIO';
  const message = err instanceof Error ? err.message : String(err);
  return { code, errno: wireErrnoByCode[code], message };
}

/** A request refused at the edge, before any device work. */
export function requestError(code: BlockErrorCode, message: string): BlockDeviceError {
  return new BlockDeviceError(code, message);
}
