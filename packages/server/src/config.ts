/**
 * The daemon's configuration: one zod schema validates the config file (YAML or JSON) and the command-line
 * flags together, after the flags are folded into the file's object, so every error names the field the
 * user wrote (`volumes.vol0.blockBytes`, `--nbd`).
 */
import { readFile } from 'node:fs/promises';
import { extname } from 'node:path';
import { volumeOptionsSchema } from '@gannet/core';
import YAML from 'yaml';
import { z } from 'zod';
import { defaultControlListen, defaultDataDir, defaultNbdListen, groupVolumesMax, logLevels, parseHostPort } from './defaults.js';
import { GiB, KiB, MiB, parseSize } from '@gannet/block-device';

export * from './defaults.js';


export const defaultVolumeName = 'vol0';
export const defaultVolumeSizeBytes = 1 * GiB;
/** Control API request bodies are tiny JSON objects; anything larger is refused before parsing. */
export const defaultBodyBytesMax = 64 * KiB;
export const bodyBytesMaxLimit = 16 * MiB;
export const configFileBytesMax = 1 * MiB;
export const volumeNameLengthMax = 64;

/** Volume names become export names (`NAME/primary`) and directory names, so no '/' and no dot-first. */
export const volumeNamePattern = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/;

/** A byte count given as a number or as a size string. */
const sizeSchema = z.union([z.number(), z.string()]).transform((value, ctx) => {
  if (typeof value === 'number') return value;
  const bytes = parseSize(value);
  if (bytes === undefined) {
    ctx.addIssue({ code: 'custom', message: `not a size: "${value}" (use bytes or e.g. 64M, 1G)` });
    return z.NEVER;
  }
  return bytes;
});

const listenSchema = z.string().transform((value, ctx) => {
  const address = parseHostPort(value);
  if (!address) {
    ctx.addIssue({ code: 'custom', message: `expected HOST:PORT (port 0-65535), got "${value}"` });
    return z.NEVER;
  }
  return address;
});

const volumeFields = {
  sizeBytes: sizeSchema.optional(),
  strategy: z.enum(['gannet', 'colo', 'passthrough']).optional(),
  blockBytes: sizeSchema.optional(),
  memoryBytesMax: sizeSchema.optional(),
  pressureRatio: z.number().optional(),
  committedBytesMax: sizeSchema.optional(),
};

/**
 * Per-volume options. Fields left out keep the value recorded when the volume was created (size, block
 * size, strategy) or the engine's default; the engine's own schema checks the limits of what is set.
 * `POST /v1/volumes` takes the same fields.
 */
export const volumeConfigSchema = z
  .object(volumeFields)
  .strict()
  .superRefine((volume, ctx) => {
    const probe = volumeOptionsSchema.safeParse({
      path: '-',
      dataDir: '-',
      ...volume,
      sizeBytes: volume.sizeBytes ?? defaultVolumeSizeBytes,
    });
    if (probe.success) return;
    for (const issue of probe.error.issues) {
      ctx.addIssue({ code: 'custom', message: issue.message, path: issue.path.map((p) => p as string | number) });
    }
  });

export type VolumeConfig = z.output<typeof volumeConfigSchema>;

/** Settings of a volume that may differ from one start to the next (the rest is fixed at creation). */
export const volumeLimitFields = ['memoryBytesMax', 'pressureRatio', 'committedBytesMax'] as const;

export const volumeNameSchema = z
  .string()
  .max(volumeNameLengthMax)
  .regex(volumeNamePattern, 'volume names use letters, digits, "_", "." and "-", and start with a letter or digit');

/** Volumes of one VM, checkpointed together atomically (`gannet checkpoint GROUP`). */
const groupSchema = z
  .array(volumeNameSchema)
  .min(1)
  .max(groupVolumesMax)
  .superRefine((members, ctx) => {
    const seen = new Set<string>();
    members.forEach((member, index) => {
      if (seen.has(member)) ctx.addIssue({ code: 'custom', message: `volume "${member}" is listed twice`, path: [index] });
      seen.add(member);
    });
  });

export const daemonConfigSchema = z
  .object({
    dataDir: z.string().min(1).default(defaultDataDir),
    logLevel: z.enum(logLevels).default('info'),
    nbd: z
      .object({
        listen: listenSchema.prefault(defaultNbdListen),
        socket: z.string().min(1).optional(),
        requestBytesMax: sizeSchema.pipe(z.number().int().min(64 * KiB).max(256 * MiB)).optional(),
      })
      .strict()
      .prefault({}),
    control: z
      .object({
        listen: listenSchema.prefault(defaultControlListen),
        socket: z.string().min(1).optional(),
        bodyBytesMax: sizeSchema.pipe(z.number().int().min(1 * KiB).max(bodyBytesMaxLimit)).default(defaultBodyBytesMax),
      })
      .strict()
      .prefault({}),
    volumes: z.record(volumeNameSchema, volumeConfigSchema.prefault({})).default({}),
    groups: z.record(volumeNameSchema, groupSchema).default({}),
  })
  .strict()
  .superRefine((config, ctx) => {
    // `gannet checkpoint NAME` takes a volume or a group: one name cannot be both.
    for (const group of Object.keys(config.groups)) {
      if (group in config.volumes) ctx.addIssue({ code: 'custom', message: `"${group}" is also a volume's name`, path: ['groups', group] });
    }
  });

export type DaemonConfigInput = z.input<typeof daemonConfigSchema>;
export type DaemonConfig = z.output<typeof daemonConfigSchema>;

/** A configuration the user has to fix; the CLI prints the message and exits with status 2. */
export class ConfigError extends Error {
  readonly field: string;
  constructor(field: string, message: string) {
    super(`${field}: ${message}`);
    this.name = 'ConfigError';
    this.field = field;
  }
}

export interface ServeFlags {
  config?: string;
  dataDir?: string;
  nbd?: string;
  nbdSocket?: string;
  control?: string;
  controlSocket?: string;
  logLevel?: string;
  volume?: string[];
}

/** Which config field each flag sets, so errors about a flag's value name the flag. */
const flagFields: Record<string, string> = {
  dataDir: '--data-dir',
  logLevel: '--log-level',
  'nbd.listen': '--nbd',
  'nbd.socket': '--nbd-socket',
  'control.listen': '--control',
  'control.socket': '--control-socket',
};

export async function readConfigFile(file: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (error) {
    throw new ConfigError('--config', `cannot read ${file}: ${(error as Error).message}`);
  }
  if (text.length > configFileBytesMax) throw new ConfigError('--config', `${file} is larger than ${configFileBytesMax} bytes`);
  try {
    const value: unknown = extname(file).toLowerCase() === '.json' ? JSON.parse(text) : YAML.parse(text);
    return value ?? {};
  } catch (error) {
    throw new ConfigError('--config', `${file} is not valid ${extname(file) === '.json' ? 'JSON' : 'YAML'}: ${(error as Error).message}`);
  }
}

/** Folds the flags into the file's object (flags win), validates the whole, and names the first bad field. */
export async function loadConfig(flags: ServeFlags): Promise<DaemonConfig> {
  const raw = flags.config === undefined ? {} : await readConfigFile(flags.config);
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new ConfigError('--config', `${flags.config} must hold a mapping (object) at the top level`);
  }
  const merged = structuredClone(raw) as Record<string, any>;
  const fromFlags = new Map<string, string>();
  const set = (path: string, value: string | undefined) => {
    if (value === undefined) return;
    const [head, tail] = path.split('.');
    if (tail === undefined) merged[head] = value;
    else {
      if (typeof merged[head] !== 'object' || merged[head] === null) merged[head] = {};
      merged[head][tail] = value;
    }
    fromFlags.set(path, flagFields[path]);
  };
  set('dataDir', flags.dataDir);
  set('logLevel', flags.logLevel);
  set('nbd.listen', flags.nbd);
  set('nbd.socket', flags.nbdSocket);
  set('control.listen', flags.control);
  set('control.socket', flags.controlSocket);
  for (const spec of flags.volume ?? []) {
    const colon = spec.indexOf(':');
    const name = colon === -1 ? spec : spec.slice(0, colon);
    const size = colon === -1 ? undefined : spec.slice(colon + 1);
    if (name === '' || size === '') throw new ConfigError('--volume', `expected NAME[:SIZE], got "${spec}"`);
    if (typeof merged.volumes !== 'object' || merged.volumes === null) merged.volumes = {};
    const existing = merged.volumes[name];
    merged.volumes[name] = { ...(typeof existing === 'object' && existing !== null ? existing : {}) };
    if (size !== undefined) {
      const bytes = parseSize(size);
      if (bytes === undefined) throw new ConfigError('--volume', `not a size in "${spec}" (use bytes or e.g. 64M, 1G)`);
      merged.volumes[name].sizeBytes = bytes;
    }
  }
  const result = daemonConfigSchema.safeParse(merged);
  if (!result.success) {
    const issue = result.error.issues[0];
    const segments = issue.path.map(String);
    if (issue.code === 'unrecognized_keys') segments.push(issue.keys[0]);
    const path = segments.join('.');
    const message = issue.code === 'invalid_key' && issue.issues.length > 0 ? issue.issues[0].message : issue.message;
    throw new ConfigError(fromFlags.get(path) ?? (path === '' ? '(config)' : path), message);
  }
  return result.data;
}
