/**
 * Ordering of requests in flight, for the primary role (primary.ts): overlapping requests reach a disk
 * in the order they arrived, and a barrier waits for everything started before it.
 */

const resolved: Promise<void> = Promise.resolve();

/** A place in line on the chunks a request covers: wait for `before`, then `leave` when done. */
export interface Turn {
  readonly before: Promise<void> | null;
  leave(): void;
}

/**
 * One FIFO line per chunk of the disk (`chunkBytes`): a request takes its place on every chunk it covers
 * when it enters, synchronously, and waits only for the requests ahead of it on those chunks. Requests on
 * other chunks pass freely, and a request with nobody ahead (nearly all of them) waits for nothing.
 * Entering several lines at the same moment keeps one order on all of them, so they cannot deadlock.
 */
export class Order {
  private readonly tails = new Map<number, Promise<void>>();

  constructor(private readonly chunkBytes: number) {}

  enter(offset: number, length: number): Turn {
    const first = Math.floor(offset / this.chunkBytes);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / this.chunkBytes);
    let release!: () => void;
    const done = new Promise<void>((resolve) => {
      release = resolve;
    });
    let before: Promise<void> | null = null;
    let ahead: Promise<void>[] | null = null;
    for (let c = first; c <= last; c++) {
      const tail = this.tails.get(c);
      if (tail !== undefined) {
        if (before === null) before = tail;
        else (ahead ??= [before]).push(tail);
      }
      this.tails.set(c, done);
    }
    const tails = this.tails;
    return {
      before: ahead !== null ? Promise.all(ahead).then(() => undefined) : before,
      leave() {
        release();
        for (let c = first; c <= last; c++) if (tails.get(c) === done) tails.delete(c);
      },
    };
  }
}

/**
 * Counts requests in flight by generation: `barrier()` resolves once every request that entered before it
 * has left, whatever entered after (a FLUSH waits for the forwards before it, a checkpoint for the
 * writes it covers).
 */
export class Tally {
  private generation = 0;
  /** Generation -> requests in flight; keys are in ascending order (a generation only gets its first entry while current). */
  private readonly counts = new Map<number, number>();
  private waiters: { generation: number; resolve: () => void }[] = [];

  get inFlight(): number {
    let n = 0;
    for (const c of this.counts.values()) n += c;
    return n;
  }

  enter(): number {
    const g = this.generation;
    this.counts.set(g, (this.counts.get(g) ?? 0) + 1);
    return g;
  }

  leave(generation: number): void {
    const n = this.counts.get(generation)! - 1;
    if (n > 0) {
      this.counts.set(generation, n);
      return;
    }
    this.counts.delete(generation);
    if (this.waiters.length === 0) return;
    const oldest = this.oldest();
    const ready = this.waiters.filter((w) => w.generation < oldest);
    if (ready.length === 0) return;
    this.waiters = this.waiters.filter((w) => w.generation >= oldest);
    for (const w of ready) w.resolve();
  }

  barrier(): Promise<void> {
    const g = this.generation++;
    if (this.oldest() > g) return resolved;
    return new Promise<void>((resolve) => this.waiters.push({ generation: g, resolve }));
  }

  private oldest(): number {
    for (const g of this.counts.keys()) return g;
    return Number.POSITIVE_INFINITY;
  }
}
