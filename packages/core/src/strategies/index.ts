export { openColoVolume, coloCopyChunkBytes } from './colo.js';
export { openPassthroughVolume } from './passthrough.js';
