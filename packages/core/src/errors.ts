import type { Generation } from './generation.js';

/**
 * Errors of the engine carry a stable `code` (tests assert codes, never messages). Errors on the block
 * device verbs are `BlockDeviceError`s (@gannet/block-device), so the NBD server maps them to wire errnos.
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
  /** The file system is full: what needed the space waits for it and is retried. */
  | 'ENOSPC'
  /** The volume's metadata or state file is missing, locked or damaged; the message names the file. */
  | 'EMETA'
  /** A failover was refused: a flush was interrupted and some ranges of the disk are a mix of epochs. */
  | 'ETORN'
  /** An engine invariant broke: the volume stopped writing anything until it is reopened. */
  | 'EHALTED'
  /** The primary role's peer is unreachable, hung or refused the session: the volume is degraded. */
  | 'EPEER'
  /** The primary role's peer failed over: this side is stale and takes no more writes. */
  | 'EFENCED'
  /** Both sides of a volume wrote since they split (generation ids): nothing is resynced until an operator discards one side. */
  | 'ESPLITBRAIN'
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

/**
 * A secondary refused a primary's attach: both moved on since they split. It carries both generations, so
 * that the primary, which learns the secondary's only from this refusal, can report both.
 */
export class SplitBrainError extends GannetError {
  constructor(
    message: string,
    readonly secondary: Generation,
    readonly primary: Generation | null,
  ) {
    super('ESPLITBRAIN', message);
    this.name = 'SplitBrainError';
  }
}

/**
 * The peer's volume is a primary too: promoted after a failover (this side then is the old primary), or
 * two primaries configured as each other's peer. Its generation tells which.
 */
export class PeerIsPrimaryError extends GannetError {
  constructor(
    message: string,
    readonly peer: Generation,
  ) {
    super('EPEER', message);
    this.name = 'PeerIsPrimaryError';
  }
}

export function isGannetError(err: unknown): err is GannetError {
  return err instanceof GannetError;
}
