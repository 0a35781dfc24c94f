import type { BlockDevice, Capabilities } from './device.js';
import { FilterDevice } from './filter.js';

/**
 * Makes any device read-only: reads, extents, cache and flush pass through; write, trim and zero are
 * refused with EPERM by the base class after the range check (out-of-range requests keep their
 * ENOSPC/EINVAL, as nbdkit orders them).
 */
export class ReadOnlyDevice extends FilterDevice {
  readonly #capabilities: Capabilities;

  constructor(next: BlockDevice) {
    super(next);
    this.#capabilities = Object.freeze({ ...next.capabilities, readOnly: true });
  }

  override get capabilities(): Capabilities {
    return this.#capabilities;
  }
}
