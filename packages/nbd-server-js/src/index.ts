export * from './device.js';
export * from './client.js';
export * from './protocol/builders.js';
export * from './protocol/constants.js';
export * from './server/server.js';
export * from './devices/memory.js';
export * from './devices/file.js';
export * from './devices/readonly.js';
