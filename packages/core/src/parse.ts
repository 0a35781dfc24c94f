import { GannetError } from './errors.js';
import type { z } from 'zod';
import {
  primaryOptionsSchema,
  volumeOptionsSchema,
  type PrimaryOptions,
  type ResolvedPrimaryOptions,
  type ResolvedVolumeOptions,
  type VolumeOptions,
} from './options.js';

/** Validates options at the edge; the error names every offending field. */
export function parseVolumeOptions(input: VolumeOptions): ResolvedVolumeOptions {
  return parse(volumeOptionsSchema, input, 'volume options');
}

export function parsePrimaryOptions(input: PrimaryOptions): ResolvedPrimaryOptions {
  return parse(primaryOptionsSchema, input, 'primary volume options');
}

function parse<S extends z.ZodType>(schema: S, input: unknown, what: string): z.output<S> {
  const result = schema.safeParse(input);
  if (result.success) return result.data;
  const problems = result.error.issues.map((issue) => {
    const field = issue.path.length > 0 ? issue.path.join('.') : 'options';
    return `${field}: ${issue.message}`;
  });
  throw new GannetError('EOPTIONS', `invalid ${what}: ${problems.join('; ')}`, { cause: result.error });
}
