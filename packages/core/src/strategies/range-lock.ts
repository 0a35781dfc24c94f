/**
 * A FIFO reader/writer lock over ranges of cluster numbers. COLO's copy-before-write reads the backing
 * file, writes the hidden file and then the backing file: a secondary read or a second primary write
 * of the same cluster in between would see a half-done copy, so writers of a range exclude everything
 * else on it. Grants are in arrival order among conflicting requests, so a whole-volume exclusive
 * request (checkpoint, failover, close) waits for earlier requests and holds back later ones: that
 * wait is the checkpoint's foreground pause.
 *
 * The number of waiters is bounded by the requests in flight, which the NBD server bounds.
 */

export type Release = () => void;

interface Claim {
  readonly first: number;
  /** Exclusive end; Infinity for the whole volume. */
  readonly end: number;
  readonly exclusive: boolean;
}

interface Waiter extends Claim {
  readonly grant: (release: Release) => void;
}

function conflicts(a: Claim, b: Claim): boolean {
  return (a.exclusive || b.exclusive) && a.first < b.end && b.first < a.end;
}

export class RangeLock {
  private readonly held = new Set<Claim>();
  private readonly waiting: Waiter[] = [];

  get heldCount(): number {
    return this.held.size;
  }

  get waitingCount(): number {
    return this.waiting.length;
  }

  acquire(first: number, end: number, exclusive: boolean): Promise<Release> {
    if (!(first >= 0 && end > first)) throw new Error(`RangeLock: bad range [${first}, ${end})`);
    const claim: Claim = { first, end, exclusive };
    if (this.grantable(claim, this.waiting.length)) return Promise.resolve(this.take(claim));
    return new Promise<Release>((grant) => this.waiting.push({ ...claim, grant }));
  }

  /** Free of conflicts with every held claim and with the first `ahead` waiters. */
  private grantable(claim: Claim, ahead: number): boolean {
    for (const other of this.held) if (conflicts(claim, other)) return false;
    for (let i = 0; i < ahead; i++) if (conflicts(claim, this.waiting[i])) return false;
    return true;
  }

  private take(claim: Claim): Release {
    this.held.add(claim);
    let released = false;
    return () => {
      if (released) throw new Error('RangeLock: released twice');
      released = true;
      this.held.delete(claim);
      this.wake();
    };
  }

  private wake(): void {
    for (let i = 0; i < this.waiting.length; ) {
      const waiter = this.waiting[i];
      if (this.grantable(waiter, i)) {
        this.waiting.splice(i, 1);
        waiter.grant(this.take(waiter));
      } else {
        i++;
      }
    }
  }
}
