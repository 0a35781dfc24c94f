import type { ZeroRequest } from './abstract.js';
import type { BlockDevice, Extent, WriteRun } from './device.js';
import { FilterDevice } from './filter.js';

/** The verbs a fault can be attached to. */
export type FaultVerb = 'read' | 'write' | 'flush' | 'trim' | 'zero' | 'cache' | 'extents';

/** Requests held at a verb until `release()`. */
export interface Hold {
  /** Resolves once `count` requests are waiting (counted from the hold's start). */
  arrived(count: number): Promise<void>;
  /** Lets every waiting and later request through, and ends the hold. */
  release(): void;
}

interface HoldState {
  waiting: number;
  readonly released: Promise<void>;
  readonly arrivals: (() => void)[];
}

/**
 * Faults for tests, as nbdkit's error and delay filters: a decorator around any device that makes one
 * verb fail (`fail`), wait a while (`delay`) or wait until released (`hold`), while every other verb
 * passes through untouched. Product classes carry no test seams; tests wrap the device instead (the
 * engine takes its backing file from a storage seam, see @gannet/core's Storage).
 */
export class FaultDevice extends FilterDevice {
  readonly #errors = new Map<FaultVerb, () => Error>();
  readonly #delays = new Map<FaultVerb, number>();
  readonly #holds = new Map<FaultVerb, HoldState>();

  constructor(next: BlockDevice) {
    super(next);
  }

  /** Every later request of `verb` rejects with what `error` makes (null ends the fault). */
  fail(verb: FaultVerb, error: Error | (() => Error) | null): void {
    if (error === null) this.#errors.delete(verb);
    else this.#errors.set(verb, typeof error === 'function' ? error : () => error);
  }

  /** Every later request of `verb` waits `ms` before it runs (0 ends the delay). */
  delay(verb: FaultVerb, ms: number): void {
    if (ms <= 0) this.#delays.delete(verb);
    else this.#delays.set(verb, ms);
  }

  /** Requests of `verb` wait from now until the returned hold is released. */
  hold(verb: FaultVerb): Hold {
    let release!: () => void;
    const state: HoldState = { waiting: 0, released: new Promise<void>((resolve) => (release = resolve)), arrivals: [] };
    this.#holds.set(verb, state);
    return {
      arrived: (count) =>
        new Promise<void>((resolve) => {
          const check = () => (state.waiting >= count ? resolve() : state.arrivals.push(check));
          check();
        }),
      release: () => {
        if (this.#holds.get(verb) === state) this.#holds.delete(verb);
        release();
      },
    };
  }

  async #enter(verb: FaultVerb): Promise<void> {
    const hold = this.#holds.get(verb);
    if (hold !== undefined) {
      hold.waiting++;
      for (const arrival of hold.arrivals.splice(0)) arrival();
      await hold.released;
    }
    const ms = this.#delays.get(verb);
    if (ms !== undefined) await new Promise<void>((resolve) => setTimeout(resolve, ms));
    const error = this.#errors.get(verb);
    if (error !== undefined) throw error();
  }

  protected override async _read(buf: Uint8Array, offset: number): Promise<void> {
    await this.#enter('read');
    return super._read(buf, offset);
  }

  protected override async _write(data: Uint8Array, offset: number, fua: boolean): Promise<void> {
    await this.#enter('write');
    return super._write(data, offset, fua);
  }

  protected override async _writev(buffers: readonly Uint8Array[], offset: number, fua: boolean): Promise<void> {
    await this.#enter('write');
    return super._writev(buffers, offset, fua);
  }

  protected override async _writeBatch(runs: readonly WriteRun[]): Promise<void> {
    await this.#enter('write');
    return super._writeBatch(runs);
  }

  protected override async _flush(): Promise<void> {
    await this.#enter('flush');
    return super._flush();
  }

  protected override async _trim(offset: number, length: number, fua: boolean): Promise<void> {
    await this.#enter('trim');
    return super._trim(offset, length, fua);
  }

  protected override async _zero(offset: number, length: number, request: ZeroRequest): Promise<void> {
    await this.#enter('zero');
    return super._zero(offset, length, request);
  }

  protected override async _cache(offset: number, length: number): Promise<void> {
    await this.#enter('cache');
    return super._cache(offset, length);
  }

  protected override async _extents(offset: number, length: number): Promise<Extent[]> {
    await this.#enter('extents');
    return super._extents(offset, length);
  }
}
