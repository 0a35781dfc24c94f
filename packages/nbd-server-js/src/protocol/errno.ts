import type { BlockErrorCode } from '@gannet/block-device';
import {
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
} from './constants.js';

/** The one table between BlockDeviceError codes and NBD wire errors, used by the server and the client. */
export const wireErrnoByCode: Readonly<Record<BlockErrorCode, number>> = {
  EPERM: NBD_EPERM,
  EIO: NBD_EIO,
  ENOMEM: NBD_ENOMEM,
  EINVAL: NBD_EINVAL,
  ENOSPC: NBD_ENOSPC,
  EOVERFLOW: NBD_EOVERFLOW,
  ENOTSUP: NBD_ENOTSUP,
  ESHUTDOWN: NBD_ESHUTDOWN,
};

const codeByWireErrno: ReadonlyMap<number, BlockErrorCode> = new Map(
  Object.entries(wireErrnoByCode).map(([code, errno]) => [errno, code as BlockErrorCode]),
);

/** The code for a wire errno; the spec tells clients to treat values they do not know as EIO. */
export function errnoToCode(errno: number): BlockErrorCode {
  return codeByWireErrno.get(errno) ?? 'EIO';
}
