import type { EventEmitter } from 'node:events';
import type { BlockDevice } from '@gannet/block-device';

/**
 * What every volume strategy (gannet, colo, passthrough) offers, so the daemon and the benchmark harness
 * drive them all the same way.
 */

export type StrategyName = 'gannet' | 'colo' | 'passthrough';

/** COLO/GANNET keep the secondary; Remus/LLM roll back to the checkpoint; rRVM keeps the primary. */
export type FailoverTarget = 'secondary' | 'checkpoint' | 'primary';

export type VolumeState = 'replicating' | 'failing-over' | 'failed-over' | 'closed';

export interface ByteRange {
  readonly offset: number;
  readonly length: number;
}

export interface VolumeStats {
  readonly strategy: StrategyName;
  readonly state: VolumeState;
  readonly sizeBytes: number;
  readonly epoch: number;
  readonly durableEpoch: number;
  readonly failoverTarget?: FailoverTarget;
  readonly bufferedBytes: { readonly primary: number; readonly secondary: number; readonly committed: number };
  readonly spilledBytes: number;
  /** Ranges an interrupted flush may have left half-written: they need a resync from the primary. */
  readonly tornRanges: readonly ByteRange[];
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
  readonly durationMs: number;
}

export interface VolumeEvents {
  checkpoint: [CheckpointEvent];
  flushed: [FlushedEvent];
  pressure: [PressureEvent];
  failover: [FailoverEvent];
  error: [Error];
}

export interface Volume extends EventEmitter<VolumeEvents> {
  /** The primary view: P over C over B. Receives the PVM's forwarded writes. */
  readonly primary: BlockDevice;
  /** The secondary view: S over C over B. The SVM's disk. */
  readonly secondary: BlockDevice;
  readonly sizeBytes: number;
  /** Seals the current epoch and returns the new epoch number. */
  checkpoint(): Promise<number>;
  failover(options?: { to?: FailoverTarget }): Promise<void>;
  stats(): VolumeStats;
  /** Waits for committed flushes, then closes the metadata store. */
  close(): Promise<void>;
}
