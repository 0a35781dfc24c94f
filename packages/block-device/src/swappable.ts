import { AbstractBlockDevice, type ZeroRequest } from './abstract.js';
import type { BlockDevice, Capabilities, Extent, WriteRun } from './device.js';
import { BlockDeviceError } from './errors.js';

/** How long a swap waits, by default, for the requests in flight on the old device before it gives up. */
export const swapDrainTimeoutMsDefault = 30_000;

export interface SwapOptions {
  /** The requests in flight on the old device must finish within this; else the swap is abandoned. */
  readonly drainTimeoutMs?: number;
}

/**
 * A device whose target can be replaced while clients stay connected: an NBD export of it keeps its
 * connections across a swap. `swap` holds every new request, waits for those in flight on the current
 * target, runs the caller's `replace` (which may close the old target and open the new one), then
 * releases the held requests onto the new target. If `replace` fails, or the old target's requests do
 * not finish in time, the held requests go on to the old target.
 *
 * Clients negotiated the old target's size and flags, so the new target must have the same size, the
 * same read-only flag, and keep FLUSH and FUA if the old one had them; a mismatch fails the swap.
 * What a client may lose on a swap is only advisory (fast zero, trim, cache, extents): requests for
 * those get the declared answers of a device without them.
 *
 * The targets belong to the caller: closing this device waits for its requests and closes nothing else.
 */
export class SwappableDevice extends AbstractBlockDevice {
  #current: BlockDevice;
  #inflight = 0;
  #drained: (() => void) | null = null;
  /** Settles when the swap under way ends; new requests wait on it. */
  #gate: Promise<void> | null = null;
  #swaps = 0;

  constructor(target: BlockDevice) {
    super(target.size, target.blockSizes);
    this.#current = target;
  }

  get capabilities(): Capabilities {
    return this.#current.capabilities;
  }

  /** The device requests go to now. */
  get target(): BlockDevice {
    return this.#current;
  }

  /** Whether a swap is holding requests now. */
  get swapping(): boolean {
    return this.#gate !== null;
  }

  /** Swaps that completed. */
  get swapCount(): number {
    return this.#swaps;
  }

  /**
   * Holds new requests, waits for those in flight on the current target, then points at the device
   * `replace` resolves with. One swap at a time: a second one waits for the first to end.
   */
  async swap(replace: (old: BlockDevice) => Promise<BlockDevice>, options: SwapOptions = {}): Promise<void> {
    const drainTimeoutMs = options.drainTimeoutMs ?? swapDrainTimeoutMsDefault;
    for (let gate = this.#gate; gate !== null; gate = this.#gate) await gate;
    if (!this.isOpen) throw new BlockDeviceError('ESHUTDOWN', 'swap: the device is closed');
    let open!: () => void;
    this.#gate = new Promise<void>((resolve) => (open = resolve));
    try {
      await this.#drain(drainTimeoutMs);
      const old = this.#current;
      const next = await replace(old);
      const problem = mismatch(old, next);
      if (problem !== null) throw new BlockDeviceError('EINVAL', `swap: ${problem}`);
      this.#current = next;
      this.#swaps++;
    } finally {
      this.#gate = null;
      open();
    }
  }

  #drain(timeoutMs: number): Promise<void> {
    if (this.#inflight === 0) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#drained = null;
        reject(new BlockDeviceError('EIO', `swap: ${this.#inflight} request(s) still in flight on the old device after ${timeoutMs} ms`));
      }, timeoutMs);
      this.#drained = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  /** Runs one request on the target of the moment, after any swap under way. */
  #pass<T>(verb: (device: BlockDevice) => Promise<T>): Promise<T> {
    // Without a swap under way (nearly always) a request costs one promise more than the target's.
    if (this.#gate !== null) return this.#gate.then(() => this.#pass(verb));
    this.#inflight++;
    let answer: Promise<T>;
    try {
      answer = verb(this.#current);
    } catch (error) {
      answer = Promise.reject(error);
    }
    return answer.finally(this.#end);
  }

  readonly #end = (): void => {
    this.#inflight--;
    if (this.#inflight === 0 && this.#drained !== null) {
      const drained = this.#drained;
      this.#drained = null;
      drained();
    }
  };

  protected _read(buf: Uint8Array, offset: number): Promise<void> {
    return this.#pass((device) => device.read(buf, offset));
  }

  protected _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    return this.#pass((device) => device.write(data, offset, fua ? { fua } : undefined));
  }

  protected override _writev(buffers: readonly Uint8Array[], offset: number, fua: boolean): Promise<void> {
    return this.#pass((device) => device.writev(buffers, offset, fua ? { fua } : undefined));
  }

  protected override _writeBatch(runs: readonly WriteRun[]): Promise<void> {
    return this.#pass((device) => device.writeBatch(runs));
  }

  protected override _flush(): Promise<void> {
    return this.#pass((device) => device.flush());
  }

  protected override _trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.#pass((device) => device.trim(offset, length, fua ? { fua } : undefined));
  }

  protected override _zero(offset: number, length: number, request: ZeroRequest): Promise<void> {
    return this.#pass((device) => device.writeZeroes(offset, length, request));
  }

  protected override _cache(offset: number, length: number): Promise<void> {
    return this.#pass((device) => device.cache(offset, length));
  }

  protected override _extents(offset: number, length: number): Promise<Extent[]> {
    return this.#pass((device) => device.extents(offset, length));
  }
}

/** Why clients that negotiated with `old` could not be served by `next`, or null. */
function mismatch(old: BlockDevice, next: BlockDevice): string | null {
  if (next.size !== old.size) return `the new device is ${next.size} bytes, the old one ${old.size}`;
  const before = old.capabilities;
  const after = next.capabilities;
  if (after.readOnly !== before.readOnly) return `the new device is ${after.readOnly ? '' : 'not '}read-only, the old one was${before.readOnly ? '' : ' not'}`;
  for (const flag of ['flush', 'fua'] as const) {
    if (before[flag] && !after[flag]) return `the new device lacks ${flag.toUpperCase()}, which clients of the old one may rely on`;
  }
  return null;
}
