import type { EventEmitter } from 'node:events';
import type { BlockDevice } from '@gannet/block-device';
import type { Generation } from './generation.js';

/**
 * What every volume strategy (gannet, colo, passthrough) offers, so the daemon and the benchmark harness
 * drive them all the same way.
 */

export type StrategyName = 'gannet' | 'colo' | 'passthrough';

/** COLO/GANNET keep the secondary; Remus/LLM roll back to the checkpoint; rRVM keeps the primary. */
export type FailoverTarget = 'secondary' | 'checkpoint' | 'primary';

/**
 * `failing-over` is the colo and passthrough baselines' copy in progress (gannet's failover switches at
 * once); `halted`: an engine invariant broke and the volume stopped writing anything.
 */
export type VolumeState = 'replicating' | 'failing-over' | 'failed-over' | 'closed' | 'halted';

/** An error that holds the volume back until it heals (or, halted, until it is reopened). */
export interface VolumeError {
  /** ENOSPC, EIO, EHALTED, ... */
  readonly code: string;
  readonly message: string;
  /** ISO time it began. */
  readonly since: string;
}

/** Where a failover stands: switched at once, then made durable, then applied to the backing file. */
export interface FailoverStatus {
  readonly target: FailoverTarget;
  readonly requestedAt: string;
  /** The foreground: until both views read and wrote the kept state (absent after a restart). */
  readonly foregroundMs?: number;
  /** Until the kept state was durable (its journal committed); absent until then or after a restart. */
  readonly durableMs?: number;
  /** journaling: not durable yet; applying: durable, being written to the backing file; done. */
  readonly phase: 'journaling' | 'applying' | 'done';
}

export interface ByteRange {
  readonly offset: number;
  readonly length: number;
}

export interface VolumeStats {
  readonly strategy: StrategyName;
  readonly state: VolumeState;
  /** The volume's uuid (gannet): a primary tells a different disk from the one it synced by it. */
  readonly volumeId?: string;
  readonly sizeBytes: number;
  readonly epoch: number;
  readonly durableEpoch: number;
  readonly failoverTarget?: FailoverTarget;
  readonly bufferedBytes: { readonly primary: number; readonly secondary: number; readonly committed: number };
  readonly spilledBytes: number;
  /** Ranges an interrupted flush may have left half-written: they need a resync from the primary. */
  readonly tornRanges: readonly ByteRange[];
  readonly error?: VolumeError;
  readonly failover?: FailoverStatus;
  /** A failover requested before the last stop that never became durable: the volume is at its checkpoint. */
  readonly lostFailover?: { readonly target: FailoverTarget; readonly requestedAt: string; readonly lostAt: string };
  /** A resync from the primary is under way (gannet): the disk is part old, part new, and failover is refused. */
  readonly inconsistent?: { readonly since: string };
  /** The volume's lineage (gannet; generation.ts): null when it has none yet. */
  readonly generation?: Generation | null;
  /**
   * A primary attached after both it and this volume wrote since they split (gannet): its attach was
   * refused, nothing was overwritten. Cleared when a primary attaches that is not split from it (after
   * an operator discarded one side). Stored: a restart still shows it.
   */
  readonly splitBrain?: SplitBrain;
}

/** Both sides of a split brain: this side's generation, the other's, and since when it is known. */
export interface SplitBrain {
  readonly local: Generation;
  readonly peer: Generation;
  readonly since: string;
}

export interface SplitBrainEvent {
  readonly local: Generation;
  readonly peer: Generation;
}

export interface CheckpointEvent {
  readonly epoch: number;
  readonly pauseMs: number;
}
export interface FlushedEvent {
  readonly epoch: number;
  readonly bytes: number;
  readonly durationMs: number;
}
export interface PressureEvent {
  readonly bufferedBytes: number;
  readonly memoryBytesMax: number;
}
export interface FailoverEvent {
  readonly to: FailoverTarget;
  /** The foreground: until both views served the kept state. */
  readonly durationMs: number;
}
export interface FailoverDurableEvent {
  readonly to: FailoverTarget;
  /** From the request until the kept state was durable. */
  readonly durableMs: number;
  /** Bytes of kept state the journal holds. */
  readonly journalBytes: number;
}
export interface FailoverAppliedEvent {
  readonly to: FailoverTarget;
  /** From the request (or the reopen) until the kept state was in the backing file. */
  readonly appliedMs: number;
}

export interface VolumeEvents {
  checkpoint: [CheckpointEvent];
  flushed: [FlushedEvent];
  pressure: [PressureEvent];
  failover: [FailoverEvent];
  'failover-durable': [FailoverDurableEvent];
  'failover-applied': [FailoverAppliedEvent];
  'split-brain': [SplitBrainEvent];
  error: [Error];
}

export interface FailoverOptions {
  readonly to?: FailoverTarget;
  /** Fail over although an interrupted flush left torn ranges (the kept disk then mixes epochs there). */
  readonly force?: boolean;
}

export interface Volume extends EventEmitter<VolumeEvents> {
  /** The primary view: P over C over B. Receives the PVM's forwarded writes. */
  readonly primary: BlockDevice;
  /** The secondary view: S over C over B. The SVM's disk. */
  readonly secondary: BlockDevice;
  readonly sizeBytes: number;
  /** Seals the current epoch and returns the new epoch number. */
  checkpoint(): Promise<number>;
  failover(options?: FailoverOptions): Promise<void>;
  stats(): VolumeStats;
  /** Waits for committed flushes, then closes the metadata store. */
  close(): Promise<void>;
}
