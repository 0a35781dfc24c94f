/**
 * Goal: SwappableDevice keeps the BlockDevice contract, and a swap moves requests from one device to
 * another without failing any: requests in flight finish on the old device, requests arriving during
 * the swap wait and land on the new one, a swap that fails (or whose new device does not fit the
 * clients' negotiation) leaves the old device serving. Method: the conformance suite over a
 * MemoryDevice, then FaultDevice holds to freeze requests at known points, with data read back from
 * each underlying device to see where every write landed.
 */
import { describe, expect, it } from 'vitest';
import { runBlockDeviceSuite } from '../src/conformance.js';
import { BlockDeviceError } from '../src/errors.js';
import { FaultDevice } from '../src/faults.js';
import { FilterDevice } from '../src/filter.js';
import { MemoryDevice } from '../src/memory.js';
import { ReadOnlyDevice } from '../src/readonly.js';
import { SwappableDevice } from '../src/swappable.js';

const size = 1024 * 1024;

runBlockDeviceSuite({ name: 'SwappableDevice over MemoryDevice', factory: async (bytes) => ({ device: new SwappableDevice(new MemoryDevice(bytes)) }) });

async function bytesOf(device: { read(buf: Uint8Array, offset: number): Promise<void> }, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  await device.read(buf, offset);
  return buf;
}

describe('SwappableDevice', () => {
  it('finishes requests in flight on the old device, holds new ones during the swap, and sends them to the new device', async () => {
    const oldDisk = new MemoryDevice(size);
    const held = new FaultDevice(oldDisk);
    const newDisk = new MemoryDevice(size);
    const device = new SwappableDevice(held);
    const hold = held.hold('write');
    const early = device.write(Buffer.alloc(4096, 1), 0);
    await hold.arrived(1);
    let replaced = false;
    const swapping = device.swap(async (old) => {
      expect(old).toBe(held);
      replaced = true;
      // What the old device holds is what the new one starts from, as a promotion's new device does.
      await newDisk.write(await bytesOf(oldDisk, 0, 4096), 0);
      return newDisk;
    });
    const during = device.write(Buffer.alloc(4096, 2), 4096);
    await Promise.resolve();
    expect(device.swapping).toBe(true);
    expect(replaced).toBe(false);
    hold.release();
    await Promise.all([early, swapping, during]);
    expect(replaced).toBe(true);
    expect(device.target).toBe(newDisk);
    expect(device.swapCount).toBe(1);
    expect((await bytesOf(oldDisk, 4096, 4096)).every((b) => b === 0)).toBe(true);
    expect((await bytesOf(newDisk, 0, 8192)).equals(Buffer.concat([Buffer.alloc(4096, 1), Buffer.alloc(4096, 2)]))).toBe(true);
    expect((await bytesOf(device, 0, 8192)).equals(await bytesOf(newDisk, 0, 8192))).toBe(true);
  });

  it('refuses a new device of another size or one that drops FUA or turns read-only, and serves on from the old one', async () => {
    const oldDisk = new MemoryDevice(size);
    const device = new SwappableDevice(oldDisk);
    for (const next of [new MemoryDevice(size * 2), new ReadOnlyDevice(new MemoryDevice(size)), new NoFua(new MemoryDevice(size))]) {
      const err = await device.swap(async () => next).then(() => null, (e: unknown) => e);
      expect(err).toBeInstanceOf(BlockDeviceError);
      expect((err as BlockDeviceError).code).toBe('EINVAL');
    }
    await device.write(Buffer.alloc(512, 7), 0);
    expect(device.target).toBe(oldDisk);
    expect((await bytesOf(oldDisk, 0, 512)).every((b) => b === 7)).toBe(true);
  });

  it('goes back to the old device when replace fails, with the held requests', async () => {
    const oldDisk = new MemoryDevice(size);
    const device = new SwappableDevice(oldDisk);
    let fail!: (err: Error) => void;
    const swapping = device.swap(() => new Promise<never>((_resolve, reject) => (fail = reject)));
    await Promise.resolve();
    const during = device.write(Buffer.alloc(512, 9), 512);
    fail(new Error('the new device could not be opened'));
    await expect(swapping).rejects.toThrow('could not be opened');
    await during;
    expect((await bytesOf(oldDisk, 512, 512)).every((b) => b === 9)).toBe(true);
  });

  it('gives up after drainTimeoutMs when a request on the old device never finishes', async () => {
    const held = new FaultDevice(new MemoryDevice(size));
    const device = new SwappableDevice(held);
    const hold = held.hold('read');
    const stuck = device.read(Buffer.alloc(512), 0);
    await hold.arrived(1);
    const err = await device.swap(async () => new MemoryDevice(size), { drainTimeoutMs: 50 }).then(() => null, (e: unknown) => e);
    expect((err as BlockDeviceError).code).toBe('EIO');
    expect(device.target).toBe(held);
    hold.release();
    await stuck;
  });
});

class NoFua extends FilterDevice {
  override get capabilities() {
    return { ...this.next.capabilities, fua: false };
  }
}
