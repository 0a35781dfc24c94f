import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { z } from 'zod';
import { KiB, MiB } from '@gannet/block-device';

/**
 * Workload profiles are data (fixtures/profiles/*.json), validated here, so a new workload is a new file
 * and the fio job files in fixtures/fio can mirror each one.
 */


export const requestBytesMaxLimit = 4 * MiB;
export const queueDepthMax = 64;
export const profileFileBytesMax = 64 * KiB;

export const profileSchema = z
  .object({
    /** Also the file name and the fio job name. */
    name: z.string().regex(/^[a-z0-9][a-z0-9-]*$/, 'lowercase letters, digits and "-"'),
    description: z.string().min(1),
    /** sequential: fixed-size requests one after the other; random: aligned random offsets; append: sequential, sizes drawn in [requestBytesMin, requestBytes]. */
    pattern: z.enum(['sequential', 'random', 'append']),
    requestBytes: z.number().int().min(512).max(requestBytesMaxLimit).multipleOf(512),
    requestBytesMin: z.number().int().min(512).max(requestBytesMaxLimit).multipleOf(512).optional(),
    readPercent: z.number().min(0).max(100),
    /** A flush after every N writes (the in-flight requests drain first, as with fsync); 0: never. */
    flushEveryWrites: z.number().int().min(0),
    queueDepth: z.number().int().min(1).max(queueDepthMax),
    /** The working set: offsets stay in [0, regionBytes), clamped to the volume size. */
    regionBytes: z.number().int().min(1 * MiB),
  })
  .strict()
  .superRefine((p, ctx) => {
    if (p.pattern === 'append' && p.requestBytesMin === undefined) {
      ctx.addIssue({ code: 'custom', path: ['requestBytesMin'], message: 'append needs requestBytesMin' });
    }
    if (p.requestBytesMin !== undefined && p.requestBytesMin > p.requestBytes) {
      ctx.addIssue({ code: 'custom', path: ['requestBytesMin'], message: 'must be <= requestBytes' });
    }
    if (p.pattern !== 'random' && p.readPercent !== 0) {
      ctx.addIssue({ code: 'custom', path: ['readPercent'], message: 'sequential and append profiles are write-only' });
    }
  });

export type Profile = z.output<typeof profileSchema>;

/** fixtures/profiles of this checkout (the same relative path from src/ and from dist/). */
export const defaultProfilesDir = fileURLToPath(new URL('../../../fixtures/profiles/', import.meta.url));

export function parseProfile(text: string, source: string): Profile {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new Error(`${source}: not valid JSON: ${(error as Error).message}`);
  }
  const result = profileSchema.safeParse(value);
  if (!result.success) {
    const issue = result.error.issues[0];
    throw new Error(`${source}: ${issue.path.join('.') || '(profile)'}: ${issue.message}`);
  }
  return result.data;
}

/** Every profile of a directory, sorted by name; the file name must match the profile's name. */
export async function loadProfiles(dir: string = defaultProfilesDir): Promise<Profile[]> {
  const files = (await readdir(dir)).filter((f) => f.endsWith('.json')).sort();
  if (files.length === 0) throw new Error(`${dir}: no profile (*.json)`);
  const profiles: Profile[] = [];
  for (const file of files) {
    const path = join(dir, file);
    const text = await readFile(path, 'utf8');
    if (text.length > profileFileBytesMax) throw new Error(`${path}: larger than ${profileFileBytesMax} bytes`);
    const profile = parseProfile(text, path);
    if (`${profile.name}.json` !== file) throw new Error(`${path}: profile name "${profile.name}" does not match the file name`);
    profiles.push(profile);
  }
  return profiles;
}

/** The named profiles, in the order given; unknown names are an error that lists the known ones. */
export function selectProfiles(all: readonly Profile[], names: readonly string[] | undefined): Profile[] {
  if (names === undefined || names.length === 0) return [...all];
  return names.map((name) => {
    const found = all.find((p) => p.name === name);
    if (!found) throw new Error(`unknown profile "${name}" (known: ${all.map((p) => p.name).join(', ')})`);
    return found;
  });
}
