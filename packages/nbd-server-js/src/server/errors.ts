/**
 * Errors on the wire: the code of a failed request (one mapping, `blockErrorCode` of the device seam)
 * and its NBD errno (one table, protocol/errno.ts).
 */
import { BlockDeviceError, blockErrorCode, type BlockErrorCode } from '@gannet/block-device';
import { wireErrnoByCode } from '../protocol/errno.js';

export interface WireError {
  readonly code: BlockErrorCode;
  readonly errno: number;
  readonly message: string;
}

export function toWireError(err: unknown): WireError {
  const code = blockErrorCode(err);
  const message = err instanceof Error ? err.message : String(err);
  return { code, errno: wireErrnoByCode[code], message };
}

/** A request refused at the edge, before any device work. */
export function requestError(code: BlockErrorCode, message: string): BlockDeviceError {
  return new BlockDeviceError(code, message);
}
