import { GannetError } from './errors.js';
import type { Volume } from './types.js';

/**
 * Epoch numbers survive kill -9 without an fsync on the checkpoint path: the store holds a ceiling, an
 * epoch number no checkpoint has reached yet, and a volume only hands out epochs up to the ceiling it
 * has durably recorded. A background put moves the ceiling ahead when half of the lease is used. On
 * reopen the volume starts at max(ceiling, durable epoch) + 1, so it never reports an epoch it reported
 * before. A clean close records the exact epoch as the ceiling, so reopening then advances by one.
 */
export const epochLeaseCount = 1 << 16;

export class EpochLease {
  private ceilingValue: number;
  private extending: Promise<void> | null = null;
  private failure: Error | null = null;
  private readonly persist: (ceiling: number) => Promise<void>;

  constructor(ceiling: number, persist: (ceiling: number) => Promise<void>) {
    this.ceilingValue = ceiling;
    this.persist = persist;
  }

  get ceiling(): number {
    return this.ceilingValue;
  }

  /** Whether the checkpoint that returns `epoch` may happen now, without waiting for the store. */
  covers(epoch: number): boolean {
    return epoch <= this.ceilingValue;
  }

  /** After the epoch advanced: extend in the background once half of the lease is used. */
  advanced(epoch: number): void {
    if (this.extending === null && this.ceilingValue - epoch < epochLeaseCount / 2) this.extend(epoch);
  }

  /** Waits until `epoch` is covered (only when checkpoints outrun the background extension). */
  async ensure(epoch: number): Promise<void> {
    for (let attempt = 0; !this.covers(epoch); attempt++) {
      if (this.failure !== null || attempt > 2) {
        throw new GannetError('EIO', `cannot record the epoch lease past ${epoch}`, { cause: this.failure });
      }
      if (this.extending === null) this.extend(epoch);
      await this.extending;
    }
  }

  /** Waits for an extension in flight (so close can write the final ceiling after it). */
  async settle(): Promise<void> {
    if (this.extending !== null) await this.extending;
  }

  private extend(epoch: number): void {
    const target = epoch + epochLeaseCount;
    this.extending = this.persist(target).then(
      () => {
        this.ceilingValue = Math.max(this.ceilingValue, target);
        this.failure = null;
        this.extending = null;
      },
      (err: Error) => {
        this.failure = err;
        this.extending = null;
      },
    );
  }
}

/**
 * The group checkpoint protocol: `prepare` does whatever awaiting is needed up front, `check` throws if
 * the volume cannot checkpoint now, `seal` checkpoints synchronously and returns the new epoch. A strategy
 * implements it under this symbol to take part in atomic `checkpointGroup`s.
 */
export const groupCheckpoint: unique symbol = Symbol.for('gannet.groupCheckpoint');

export interface GroupCheckpointable {
  readonly [groupCheckpoint]: {
    prepare(): Promise<void>;
    check(): void;
    seal(): number;
  };
}

function isGroupCheckpointable(v: Volume): v is Volume & GroupCheckpointable {
  return (v as Partial<GroupCheckpointable>)[groupCheckpoint] !== undefined;
}

/**
 * One atomic checkpoint across the volumes of one VM: every volume is checked, then all are sealed with no
 * await in between, so no write lands between the seals. Each volume records its epoch in its own store
 * (see EpochLease). Volumes of a strategy without the group protocol are refused with ESTATE: a group
 * checkpoint that is not atomic would break the guarantee the caller asked for.
 */
export async function checkpointGroup(volumes: readonly Volume[]): Promise<number[]> {
  if (new Set(volumes).size !== volumes.length) {
    throw new GannetError('ESTATE', 'checkpointGroup: a volume is listed twice');
  }
  const members = volumes.map((v, i) => {
    if (!isGroupCheckpointable(v)) {
      throw new GannetError('ESTATE', `checkpointGroup: volume ${i} does not support atomic group checkpoints`);
    }
    return v[groupCheckpoint];
  });
  await Promise.all(members.map((m) => m.prepare()));
  for (const m of members) m.check();
  return members.map((m) => m.seal());
}
