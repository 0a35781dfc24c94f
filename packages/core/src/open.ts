import type { VolumeOptions } from './options.js';
import { parseVolumeOptions } from './parse.js';
import type { Volume } from './types.js';
import { openColoVolume, openPassthroughVolume } from './strategies/index.js';
import { ReplicatedVolume, type OpenContext } from './volume.js';

/** Opens a volume of the strategy the options name (default gannet). */
export async function openVolume(options: VolumeOptions, context: OpenContext = {}): Promise<Volume> {
  const strategy = parseVolumeOptions(options).strategy;
  switch (strategy) {
    case 'gannet':
      return ReplicatedVolume.open(options, context);
    case 'colo':
      return openColoVolume(options);
    case 'passthrough':
      return openPassthroughVolume(options);
  }
}
