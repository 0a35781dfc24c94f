/**
 * One memory budget for every connection of a server: WRITE payloads from the moment their header is
 * read (the buffer is taken then, before the client has sent the data) until the device has the data,
 * and READ buffers from the device read until the socket has written the reply. A connection whose
 * next request does not fit stops reading its socket, so the client meets TCP backpressure instead of
 * the server allocating, and waits its turn.
 *
 * Taking memory by whole requests makes one rule necessary for fairness: clients that send large
 * requests and then stall (a 32 MiB WRITE sent but for its last bytes, READ replies left unread) can
 * fill any budget, and a well-behaved client would then wait until the stalled ones are dropped. So a
 * slice of the budget (`reserveBytes`) is kept for connections that hold little (at most
 * `reserveHolderBytesMax` with the new request): bulk holders can never take it, and a client doing
 * ordinary small I/O keeps going at a reduced queue depth however the rest is used. Within each class,
 * waiters are served in arrival order and newcomers do not overtake them.
 *
 * Grants are made on a waiter's behalf (the bytes are counted before it is told), so nobody can take
 * them between the wake-up and the retry.
 */
import { MiB } from '@gannet/block-device';
import { PayloadPool, type PayloadSource } from './payload-pool.js';

/** The share of the budget kept for connections holding little. */
export const reserveFraction = 1 / 8;
/** A connection holding at most this much (new request included) may use the reserve. */
export const reserveHolderBytesMax = 4 * MiB;

/** What one connection holds and waits for; owned by the budget's bookkeeping. */
export class MemoryAccount {
  /** Bytes of the budget this connection holds. */
  held = 0;
  /** Bytes granted while it waited, not yet claimed by the request that waited for them. */
  granted = 0;
  waiting: Waiter | null = null;
}

interface Waiter {
  readonly account: MemoryAccount;
  readonly bytes: number;
  /** Which queue it is in: a bulk waiter moves to the reserve queue when its own releases make it small. */
  reserve: boolean;
  readonly granted: () => void;
}

/** A FIFO with O(1) removal from the front and lazy removal of cancelled entries. */
class WaitQueue {
  private items: (Waiter | null)[] = [];
  private head = 0;
  private live = 0;

  get size(): number {
    return this.live;
  }

  push(w: Waiter): void {
    this.items.push(w);
    this.live += 1;
  }

  first(): Waiter | undefined {
    while (this.head < this.items.length && this.items[this.head] === null) this.head += 1;
    if (this.head < this.items.length) return this.items[this.head]!;
    if (this.head > 0) {
      this.items.length = 0;
      this.head = 0;
    }
    return undefined;
  }

  shift(): void {
    this.first();
    this.items[this.head] = null;
    this.head += 1;
    this.live -= 1;
  }

  remove(w: Waiter): void {
    const i = this.items.indexOf(w, this.head);
    if (i < 0) return;
    this.items[i] = null;
    this.live -= 1;
  }
}

export class MemoryBudget {
  readonly reserveBytes: number;
  private used = 0;
  private readonly bulkWaiters = new WaitQueue();
  private readonly reserveWaiters = new WaitQueue();

  constructor(readonly bytesMax: number) {
    if (!(Number.isSafeInteger(bytesMax) && bytesMax > 0)) throw new RangeError(`memory budget must be a positive integer: ${bytesMax}`);
    this.reserveBytes = Math.floor(bytesMax * reserveFraction);
  }

  /** The most one bulk request may take: what is left once the reserve is set aside. */
  get bulkBytesMax(): number {
    return this.bytesMax - this.reserveBytes;
  }

  /** Bytes held by every connection together. */
  get usedBytes(): number {
    return this.used;
  }

  /** Connections waiting for memory. */
  get waitingCount(): number {
    return this.bulkWaiters.size + this.reserveWaiters.size;
  }

  private small(account: MemoryAccount, bytes: number): boolean {
    return account.held + bytes <= reserveHolderBytesMax;
  }

  private fits(reserve: boolean, bytes: number): boolean {
    return this.used + bytes <= (reserve ? this.bytesMax : this.bulkBytesMax);
  }

  /** Takes `bytes` now if they fit and nobody of the same class waits ahead; false otherwise. */
  take(account: MemoryAccount, bytes: number): boolean {
    if (account.waiting !== null) throw new Error('MemoryBudget.take while the account waits');
    if (bytes === 0) return true;
    const reserve = this.small(account, bytes);
    const queue = reserve ? this.reserveWaiters : this.bulkWaiters;
    if (queue.size > 0 || !this.fits(reserve, bytes)) return false;
    this.used += bytes;
    account.held += bytes;
    return true;
  }

  /**
   * Queues the account for `bytes`; `granted` is called (from a microtask, never from inside this call)
   * once they are counted as the account's, in `account.granted`.
   */
  wait(account: MemoryAccount, bytes: number, granted: () => void): void {
    if (account.waiting !== null) throw new Error('MemoryBudget.wait while the account already waits');
    const w: Waiter = { account, bytes, reserve: this.small(account, bytes), granted };
    account.waiting = w;
    (w.reserve ? this.reserveWaiters : this.bulkWaiters).push(w);
    this.wake();
  }

  /** Returns bytes the account held; wakes waiters they now fit. */
  give(account: MemoryAccount, bytes: number): void {
    if (!(bytes <= account.held && bytes <= this.used)) throw new Error(`MemoryBudget.give(${bytes}) with ${account.held} held`);
    this.used -= bytes;
    account.held -= bytes;
    const w = account.waiting;
    if (w !== null && !w.reserve && this.small(account, w.bytes)) {
      this.bulkWaiters.remove(w);
      w.reserve = true;
      this.reserveWaiters.push(w);
    }
    this.wake();
  }

  /** The connection is gone: it stops waiting, and a grant it never claimed is returned. */
  cancel(account: MemoryAccount): void {
    const w = account.waiting;
    if (w !== null) {
      (w.reserve ? this.reserveWaiters : this.bulkWaiters).remove(w);
      account.waiting = null;
    }
    if (account.granted > 0) {
      const bytes = account.granted;
      account.granted = 0;
      this.give(account, bytes);
    }
  }

  private wake(): void {
    for (;;) {
      const r = this.reserveWaiters.first();
      if (r !== undefined && this.fits(true, r.bytes)) {
        this.reserveWaiters.shift();
        this.grant(r);
        continue;
      }
      const b = this.bulkWaiters.first();
      if (b !== undefined && this.fits(false, b.bytes)) {
        this.bulkWaiters.shift();
        this.grant(b);
        continue;
      }
      return;
    }
  }

  private grant(w: Waiter): void {
    this.used += w.bytes;
    w.account.held += w.bytes;
    w.account.granted += w.bytes;
    w.account.waiting = null;
    queueMicrotask(w.granted);
  }
}

/**
 * The memory one connection takes its payload buffers from: the server's pool, within the server's
 * budget. `tryAcquire` returns null when the budget has no room; the caller then calls `wait` and asks
 * again for the same length once woken, which claims the bytes granted meanwhile.
 */
export class BudgetedPayloads implements PayloadSource {
  readonly account = new MemoryAccount();

  constructor(
    private readonly pool: PayloadPool,
    private readonly budget: MemoryBudget,
  ) {}

  footprint(length: number): number {
    return this.pool.footprint(length);
  }

  tryAcquire(length: number): Buffer | null {
    const bytes = this.pool.footprint(length);
    const a = this.account;
    if (a.granted > 0) {
      // The grant was sized for this very request: the one that waited is the one retried.
      if (a.granted !== bytes) throw new Error(`granted ${a.granted} bytes, asked for ${bytes}`);
      a.granted = 0;
    } else if (!this.budget.take(a, bytes)) {
      return null;
    }
    return this.pool.acquire(length);
  }

  /** Waits for room for `length` bytes; `ready` runs once they are granted. */
  wait(length: number, ready: () => void): void {
    this.budget.wait(this.account, this.pool.footprint(length), ready);
  }

  release(buf: Buffer): void {
    this.pool.release(buf);
    this.budget.give(this.account, this.pool.footprint(buf.length));
  }

  /** The connection closed: stop waiting and return an unclaimed grant. */
  close(): void {
    this.budget.cancel(this.account);
  }
}
