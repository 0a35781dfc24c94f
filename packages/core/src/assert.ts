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
