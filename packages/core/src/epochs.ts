import { assert } from './assert.js';
import type { BlockBuffers, Layer } from './buffer.js';
import { GannetError } from './errors.js';
import type { Volume } from './types.js';

/**
 * Epochs and the seal: the stack of layers a volume reads through, and the checkpoint that moves it on.
 *
 *   primary view   = P over C over B   (PVM writes, forwarded; applied to B at the next checkpoint)
 *   secondary view = S over C over B   (SVM writes; dropped at the next checkpoint)
 *
 * P and S are the buffers of the current epoch, C the committed (sealed) P buffers not yet on disk, oldest
 * first, B the backing file. `seal` is the whole foreground of a checkpoint and is O(1) in the bytes
 * buffered: P joins C, S is dropped, new P and S start the next epoch. Nothing is copied or written; the
 * flusher moves C to B in the background and drops each layer once it is durable.
 *
 * Failover ends the epochs: the kept side (S, P, or neither) is sealed into C like a checkpoint seals P,
 * the other side is dropped, and both views read W over C over B, W taking the writes made after it.
 * A FLUSH then seals W (`sealWrites`) so the flusher makes it durable.
 */
export class Epochs {
  /** The current epoch: the number the last checkpoint returned (0 before the first). */
  epoch: number;
  /** Every committed epoch up to this one is in the backing file, fdatasynced. */
  durableEpoch: number;
  P: Layer;
  S: Layer;
  /** After failover: the one write buffer both views read through (P and S are gone). */
  W: Layer | null = null;
  /** Sealed buffers not yet dropped, oldest first. */
  readonly committed: Layer[] = [];

  constructor(
    private readonly buffers: BlockBuffers,
    readonly lease: EpochLease,
    epoch: number,
    durableEpoch: number,
    private readonly drop: (layer: Layer) => void,
  ) {
    this.epoch = epoch;
    this.durableEpoch = durableEpoch;
    this.P = buffers.newLayer('primary', epoch);
    this.S = buffers.newLayer('secondary', epoch);
  }

  top(role: 'primary' | 'secondary'): Layer {
    return this.W ?? (role === 'primary' ? this.P : this.S);
  }

  /** Seals P into C, drops S, starts the next epoch and returns its number: no per-block work. */
  seal(): number {
    assert(this.lease.covers(this.epoch + 1), 'the new epoch is covered by the durable epoch lease');
    const sealed = this.P;
    assert(this.committed.at(-1) !== sealed && this.S !== sealed, 'committed sets are disjoint from the live buffers');
    this.epoch += 1;
    this.buffers.seal(sealed, this.epoch);
    this.committed.push(sealed);
    this.drop(this.S);
    this.P = this.buffers.newLayer('primary', this.epoch);
    this.S = this.buffers.newLayer('secondary', this.epoch);
    this.lease.advanced(this.epoch);
    return this.epoch;
  }

  /**
   * Failover's foreground, O(1) like a checkpoint: `keep` (P, S or neither) is sealed into C as the next
   * epoch, the rest of P and S is dropped, and W starts. Returns the epoch that ends with the kept state.
   */
  failover(keep: 'primary' | 'secondary' | null): number {
    assert(this.W === null, 'a volume fails over once');
    assert(this.lease.covers(this.epoch + 1), 'the failover epoch is covered by the durable epoch lease');
    const kept = keep === null ? null : keep === 'primary' ? this.P : this.S;
    this.epoch += 1;
    if (kept !== null) {
      this.buffers.seal(kept, this.epoch);
      this.committed.push(kept);
    }
    for (const layer of [this.P, this.S]) if (layer !== kept) this.drop(layer);
    this.W = this.buffers.newLayer('secondary', this.epoch);
    return this.epoch;
  }

  /** A reopened failed-over volume: the given committed layers (a failover journal) under a new W. */
  failedOver(committed: readonly Layer[]): void {
    assert(this.W === null && this.committed.length === 0, 'a reopened volume starts with no buffers');
    this.committed.push(...committed);
    for (const layer of [this.P, this.S]) this.drop(layer);
    this.W = this.buffers.newLayer('secondary', this.epoch);
  }

  /** After failover, a FLUSH: W joins C as the next epoch (the flusher makes it durable), a new W starts. */
  sealWrites(): number {
    assert(this.W !== null && this.lease.covers(this.epoch + 1), 'writes are sealed after failover, under the lease');
    this.epoch += 1;
    this.buffers.seal(this.W, this.epoch);
    this.committed.push(this.W);
    this.W = this.buffers.newLayer('secondary', this.epoch);
    this.lease.advanced(this.epoch);
    return this.epoch;
  }

  /** The flush of the oldest `layers` is durable: they leave C, and the durable epoch moves up. */
  flushed(layers: readonly Layer[]): void {
    const durable = layers.at(-1)!.sealedEpoch;
    assert(durable > this.durableEpoch && durable <= this.epoch, 'the durable epoch only grows, up to the epoch');
    assert(this.committed.slice(0, layers.length).every((l, i) => l === layers[i]), 'flushed layers are the oldest');
    this.committed.splice(0, layers.length);
    this.durableEpoch = durable;
    for (const layer of layers) this.drop(layer);
  }

  /** Every layer, dropped: the volume has closed. */
  dropAll(): void {
    for (const layer of [...this.committed, this.P, this.S, ...(this.W === null ? [] : [this.W])]) if (!layer.dropped) this.drop(layer);
    this.committed.length = 0;
  }

  /** The topmost layer holding block `b` in the view topped by `top` (null: C over B), and its entry. */
  lookup(top: Layer | null, b: number): [Layer, number] | [null, 0] {
    if (top !== null) {
      const e = top.entry(b);
      if (e !== undefined) return [top, e];
    }
    for (let i = this.committed.length - 1; i >= 0; i--) {
      const layer = this.committed[i];
      const e = layer.entry(b);
      if (e !== undefined) return [layer, e];
    }
    return [null, 0];
  }

  *live(): Iterable<Layer> {
    if (this.W !== null) {
      yield this.W;
    } else {
      yield this.P;
      yield this.S;
    }
    yield* this.committed;
  }

  /** Bytes of committed data in memory (the flusher releases them as it writes them). */
  committedMemBytes(): number {
    let blocks = 0;
    for (const layer of this.committed) blocks += layer.memBlocks;
    return blocks * this.buffers.blockBytes;
  }

  /** Bytes of committed data not yet in the backing file, in memory or spilled. */
  committedBytes(): number {
    let blocks = 0;
    for (const layer of this.committed) blocks += layer.memBlocks + layer.spilledBlocks;
    return blocks * this.buffers.blockBytes;
  }
}

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
