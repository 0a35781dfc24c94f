/**
 * Control operations are ordered per volume, not across the daemon: each one runs after the operations
 * already requested on the volumes it touches, and operations on other volumes never wait for it, so a
 * checkpoint of one VM's disk does not wait behind a failover (or a delete, or a recovery) of another
 * VM's disk on slow storage. An operation on several volumes (a group checkpoint) waits for all of them
 * and holds each until it is done, so the group's checkpoint is ordered with every operation on any of
 * its members. The keys are volume names; daemon-wide operations use a key no volume can have.
 */
export class OperationOrder {
  /** Per key: settles once the last operation requested on it has settled. */
  private readonly tails = new Map<string, Promise<void>>();

  run<T>(keys: readonly string[], operation: () => Promise<T>): Promise<T> {
    const unique = [...new Set(keys)];
    const before: Promise<void>[] = [];
    for (const key of unique) {
      const tail = this.tails.get(key);
      if (tail !== undefined) before.push(tail);
    }
    const result = Promise.all(before).then(operation);
    const settled = result.then(
      () => undefined,
      () => undefined,
    );
    for (const key of unique) this.tails.set(key, settled);
    void settled.then(() => {
      for (const key of unique) if (this.tails.get(key) === settled) this.tails.delete(key);
    });
    return result;
  }

  /** Settles once every operation requested so far has settled. */
  async idle(): Promise<void> {
    while (this.tails.size > 0) await Promise.all([...this.tails.values()]);
  }
}
