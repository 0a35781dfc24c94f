export * from './device.js';
export * from './errors.js';
export * from './units.js';
export { AbstractBlockDevice, type ZeroRequest } from './abstract.js';
export { FilterDevice } from './filter.js';
export { ReadOnlyDevice } from './readonly.js';
export { FaultDevice, type FaultVerb, type Hold } from './faults.js';
export { MemoryDevice, memoryChunkBytes, type MemoryDeviceOptions } from './memory.js';
export * from './file-device.js';
