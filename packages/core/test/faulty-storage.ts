import { FaultDevice } from '@gannet/block-device';
import { fileStorage, type OpenContext } from '@gannet/core';

/**
 * A volume's storage with its backing file wrapped in a FaultDevice, so a test can make the file's
 * writes, flushes or reads fail or wait, as nbdkit's error filter does, with no hook in the engine.
 */
export function faultyStorage(): { context: OpenContext; backing(): FaultDevice } {
  let device: FaultDevice | null = null;
  return {
    context: {
      storage: {
        ...fileStorage,
        async openBacking(path, sizeBytes, options) {
          device = new FaultDevice(await fileStorage.openBacking(path, sizeBytes, options));
          return device;
        },
      },
    },
    backing() {
      if (device === null) throw new Error('faultyStorage: the volume has not opened its backing file yet');
      return device;
    },
  };
}

/** Every way the engine changes the file (data, holes, zeroes) fails with `error`, or works again (null). */
export function failWrites(device: FaultDevice, error: Error | null): void {
  for (const verb of ['write', 'zero', 'trim'] as const) device.fail(verb, error);
}
