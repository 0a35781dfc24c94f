export * from './types.js';
export * from './options.js';
