import type { FailoverTarget } from '@gannet/core';

export type CrashScenario = 'flush' | 'failover-secondary' | 'failover-checkpoint' | 'failover-primary';
export type CrashStep =
  | { kind: 'write'; view: 'primary' | 'secondary'; offset: number; data: Uint8Array }
  | { kind: 'zero'; view: 'primary' | 'secondary'; offset: number; length: number; trim: boolean }
  | { kind: 'checkpoint' | 'wait-flushed' | 'final-flush' }
  | { kind: 'failover'; to: FailoverTarget; after: { offset: number; data: Uint8Array }[] };
export interface CrashPlan {
  sizeBytes: number;
  blockBytes: number;
  steps: CrashStep[];
}
export const crashScenarios: readonly CrashScenario[];
export const crashVolumeBytes: number;
export const crashBlockBytes: number;
export const ticksMax: number;
export function crashPlan(seed: number, scenario: CrashScenario): CrashPlan;
export function crashVolumeOptions(
  dir: string,
  plan: CrashPlan,
): { path: string; dataDir: string; sizeBytes: number; blockBytes: number };
