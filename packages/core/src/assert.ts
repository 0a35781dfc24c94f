import { toBlockDeviceError, type BlockDeviceError } from '@gannet/block-device';
/**
 * Engine invariants are checked in code, TigerBeetle-style: a broken invariant means the buffers no longer
 * describe the disk, and carrying on would corrupt data, so we throw loudly instead.
 */
export class InvariantError extends Error {
  constructor(message: string) {
    super(`gannet invariant violated: ${message}`);
    this.name = 'InvariantError';
  }
}

export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new InvariantError(message);
}

/**
 * A failure of the storage below, as the device error a client gets; a broken invariant passes through
 * unchanged, so that the request path halts the volume instead of answering one EIO.
 */
export function storageError(err: unknown, context: string): BlockDeviceError | InvariantError {
  return err instanceof InvariantError ? err : toBlockDeviceError(err, context);
}
