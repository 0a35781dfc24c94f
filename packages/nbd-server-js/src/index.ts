export * from '@gannet/block-device';
export * from './client.js';
export * from './protocol/builders.js';
export * from './protocol/constants.js';
export * from './server/server.js';
export * from './tls.js';
