import { GannetError } from './errors.js';
import { volumeOptionsSchema, type ResolvedVolumeOptions, type VolumeOptions } from './options.js';

/** Validates options at the edge; the error names every offending field. */
export function parseVolumeOptions(input: VolumeOptions): ResolvedVolumeOptions {
  const result = volumeOptionsSchema.safeParse(input);
  if (result.success) return result.data;
  const problems = result.error.issues.map((issue) => {
    const field = issue.path.length > 0 ? issue.path.join('.') : 'options';
    return `${field}: ${issue.message}`;
  });
  throw new GannetError('EOPTIONS', `invalid volume options: ${problems.join('; ')}`, { cause: result.error });
}
