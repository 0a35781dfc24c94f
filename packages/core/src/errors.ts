/**
 * Errors of the engine carry a stable `code` (tests assert codes, never messages). Errors on the block
 * device verbs are `BlockDeviceError`s from nbd-server-js, so the NBD server maps them to wire errnos.
 */
export type GannetErrorCode =
  /** Options failed validation; the message names the field. */
  | 'EOPTIONS'
  /** The backing file or metadata store does not match the options (size, block size). */
  | 'EMISMATCH'
  /** The operation is not valid in the volume's state (e.g. checkpoint after failover). */
  | 'ESTATE'
  /** The backing file failed; committed data stays buffered. */
  | 'EIO'
  /** The strategy is not available in this build. */
  | 'ENOTAVAILABLE';

export class GannetError extends Error {
  readonly code: GannetErrorCode;
  constructor(code: GannetErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'GannetError';
    this.code = code;
  }
}

export function isGannetError(err: unknown): err is GannetError {
  return err instanceof GannetError;
}
