/**
 * The daemon's configuration: one zod schema validates the config file (YAML or JSON) and the command-line
 * flags together, after the flags are folded into the file's object, so every error names the field the
 * user wrote (`volumes.vol0.blockBytes`, `--nbd`).
 */
import { readFile } from 'node:fs/promises';
import { extname } from 'node:path';
import { primaryOptionsSchema, volumeOptionsSchema } from '@gannet/core';
import {
  connectionsMaxDefault,
  exportConnectionsMaxDefault,
  handshakeTimeoutMsDefault,
  memoryBytesMaxDefault,
  memoryBytesMinFor,
  requestBytesMaxDefault,
  stallTimeoutMsDefault,
  tlsModes,
  type TlsMode,
} from 'nbd-server-js';
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
/**
 * Control API connections open at once; more are closed on accept. Event stream subscribers (at most
 * 64, events.ts) hold one each, so the cap leaves room for calls beside them.
 */
export const controlConnectionsMaxDefault = 128;
export const controlConnectionsMaxMin = 80;
/** Far above any host's memory: a larger NBD budget is a unit mistake. */
export const nbdMemoryBytesMaxLimit = 64 * GiB;
export const timeoutMsMax = 3_600_000;

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

/** A whole number given as a number or as decimal digits (command-line flags arrive as strings). */
const integerSchema = z.union([z.number(), z.string().regex(/^\d+$/, 'expected a whole number').transform(Number)]).pipe(z.number().int());

/** A yes/no setting; a flag without a value arrives as `true`. */
const booleanSchema = z.union([z.boolean(), z.enum(['true', 'false']).transform((value) => value === 'true')]);

const tlsSchema = z
  .object({
    mode: z.enum(tlsModes as [TlsMode, ...TlsMode[]]).default('off'),
    certificates: z.string().min(1).optional(),
    psk: z.string().min(1).optional(),
    verifyPeer: booleanSchema.default(false),
  })
  .strict()
  .superRefine((tls, ctx) => {
    const given = [tls.certificates, tls.psk].filter((value) => value !== undefined).length;
    if (tls.mode === 'off' && (given > 0 || tls.verifyPeer)) {
      const set = tls.certificates !== undefined ? 'certificates' : tls.psk !== undefined ? 'psk' : 'verifyPeer';
      ctx.addIssue({ code: 'custom', path: [set], message: 'needs TLS mode on or require' });
    } else if (tls.mode !== 'off' && given !== 1) {
      ctx.addIssue({ code: 'custom', path: ['mode'], message: `mode ${tls.mode} needs either certificates (a directory) or psk (a file), not both` });
    } else if (tls.verifyPeer && tls.certificates === undefined) {
      ctx.addIssue({ code: 'custom', path: ['verifyPeer'], message: 'verifyPeer needs certificates' });
    }
  });

export type TlsConfig = z.output<typeof tlsSchema>;

const listenSchema = z.string().transform((value, ctx) => {
  const address = parseHostPort(value);
  if (!address) {
    ctx.addIssue({ code: 'custom', message: `expected HOST:PORT (port 0-65535), got "${value}"` });
    return z.NEVER;
  }
  return address;
});

export const roles = ['secondary', 'primary'] as const;
export type Role = (typeof roles)[number];

/** Settings of a volume in the secondary role (the GANNET buffer) only. */
export const secondaryVolumeFields = ['strategy', 'blockBytes', 'memoryBytesMax', 'pressureRatio', 'committedBytesMax'] as const;
/** Settings of a volume in the primary role only: how it replicates to its peer (core's primaryOptionsSchema). */
export const primaryVolumeFields = [
  'ackMode',
  'forwardBytesMax',
  'peerTimeoutMs',
  'peerReconnectMs',
  'peerReconnectMsMax',
  'resyncBytesPerSecondMax',
  'resyncCheckpointBytes',
  'activityExtentsMax',
] as const;

/** What core uses for a primary volume's settings left out of the config (for --help and the sample config). */
export const primaryDefaults = primaryOptionsSchema.parse({ path: '-', dataDir: '-', sizeBytes: 1 });

const volumeFields = {
  sizeBytes: sizeSchema.optional(),
  strategy: z.enum(['gannet', 'colo', 'passthrough']).optional(),
  blockBytes: sizeSchema.optional(),
  memoryBytesMax: sizeSchema.optional(),
  pressureRatio: z.number().optional(),
  committedBytesMax: sizeSchema.optional(),
  ackMode: z.enum(['peer', 'local']).optional(),
  forwardBytesMax: sizeSchema.optional(),
  peerTimeoutMs: integerSchema.optional(),
  peerReconnectMs: integerSchema.optional(),
  peerReconnectMsMax: integerSchema.optional(),
  resyncBytesPerSecondMax: sizeSchema.optional(),
  resyncCheckpointBytes: sizeSchema.optional(),
  activityExtentsMax: integerSchema.optional(),
};

function pick(volume: Record<string, unknown>, fields: readonly string[]): Record<string, unknown> {
  return Object.fromEntries(fields.filter((field) => volume[field] !== undefined).map((field) => [field, volume[field]]));
}

/**
 * Per-volume options. Fields left out keep the value recorded when the volume was created (size, block
 * size, strategy) or the engine's default; the engine's own schemas check the limits of what is set (the
 * secondary role's fields by volumeOptionsSchema, the primary role's by primaryOptionsSchema; the daemon's
 * schema refuses the fields of the other role). `POST /v1/volumes` takes the same fields.
 */
export const volumeConfigSchema = z
  .object(volumeFields)
  .strict()
  .superRefine((volume, ctx) => {
    const sizeBytes = volume.sizeBytes ?? defaultVolumeSizeBytes;
    const probes = [
      volumeOptionsSchema.safeParse({ path: '-', dataDir: '-', ...pick(volume, secondaryVolumeFields), sizeBytes }),
      primaryOptionsSchema.safeParse({ path: '-', dataDir: '-', ...pick(volume, primaryVolumeFields), sizeBytes }),
    ];
    for (const probe of probes) {
      if (probe.success) continue;
      for (const issue of probe.error.issues) {
        ctx.addIssue({ code: 'custom', message: issue.message, path: issue.path.map((p) => p as string | number) });
      }
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

/**
 * How a primary speaks TLS to a secondary whose NBD requires it: X.509 (`certificates`: a client
 * directory, ca-cert.pem and, if the secondary verifies clients, client-cert.pem and client-key.pem, as
 * QEMU's tls-creds-x509 endpoint=client reads it) or a psktool file (`psk`; its first identity unless
 * `pskIdentity` names another).
 */
const peerTlsSchema = z
  .object({
    certificates: z.string().min(1).optional(),
    psk: z.string().min(1).optional(),
    pskIdentity: z.string().min(1).optional(),
  })
  .strict()
  .superRefine((tls, ctx) => {
    if ((tls.certificates === undefined) === (tls.psk === undefined)) {
      ctx.addIssue({ code: 'custom', path: ['certificates'], message: 'give either certificates (a directory) or psk (a file), not both' });
    } else if (tls.pskIdentity !== undefined && tls.psk === undefined) {
      ctx.addIssue({ code: 'custom', path: ['pskIdentity'], message: 'needs psk' });
    }
  });

/** The secondary daemon a primary replicates to: its control API, and a file holding its control token. */
const peerSchema = z
  .object({
    control: z.string({ error: 'required: the secondary daemon\'s control API, HOST:PORT (--peer)' }).pipe(listenSchema),
    tokenFile: z.string({ error: 'required: a copy of the secondary\'s DATA_DIR/control.token (--peer-token-file)' }).min(1),
    tls: peerTlsSchema.optional(),
  })
  .strict();

export type PeerConfig = z.output<typeof peerSchema>;

export const daemonConfigSchema = z
  .object({
    role: z.enum(roles).default('secondary'),
    peer: peerSchema.optional(),
    dataDir: z.string().min(1).default(defaultDataDir),
    logLevel: z.enum(logLevels).default('info'),
    nbd: z
      .object({
        listen: listenSchema.prefault(defaultNbdListen),
        socket: z.string().min(1).optional(),
        requestBytesMax: sizeSchema.pipe(z.number().int().min(64 * KiB).max(256 * MiB)).optional(),
        memoryBytesMax: sizeSchema.pipe(z.number().int().min(1 * MiB).max(nbdMemoryBytesMaxLimit)).default(memoryBytesMaxDefault),
        stallTimeoutMs: integerSchema.pipe(z.number().min(100).max(timeoutMsMax)).default(stallTimeoutMsDefault),
        connectionsMax: integerSchema.pipe(z.number().min(1).max(1_000_000)).default(connectionsMaxDefault),
        exportConnectionsMax: integerSchema.pipe(z.number().min(1).max(1_000_000)).default(exportConnectionsMaxDefault),
        handshakeTimeoutMs: integerSchema.pipe(z.number().min(100).max(timeoutMsMax)).default(handshakeTimeoutMsDefault),
        tls: tlsSchema.prefault({}),
      })
      .strict()
      .superRefine((nbd, ctx) => {
        const least = memoryBytesMinFor(nbd.requestBytesMax ?? requestBytesMaxDefault);
        if (nbd.memoryBytesMax < least) {
          ctx.addIssue({ code: 'custom', path: ['memoryBytesMax'], message: `must be at least ${least} bytes to fit the largest request (requestBytesMax)` });
        }
      })
      .prefault({}),
    control: z
      .object({
        listen: listenSchema.prefault(defaultControlListen),
        socket: z.string().min(1).optional(),
        bodyBytesMax: sizeSchema.pipe(z.number().int().min(1 * KiB).max(bodyBytesMaxLimit)).default(defaultBodyBytesMax),
        connectionsMax: integerSchema.pipe(z.number().min(controlConnectionsMaxMin).max(100_000)).default(controlConnectionsMaxDefault),
      })
      .strict()
      .prefault({}),
    volumes: z.record(volumeNameSchema, volumeConfigSchema.prefault({})).default({}),
    groups: z.record(volumeNameSchema, groupSchema).default({}),
  })
  .strict()
  .superRefine((config, ctx) => {
    if (config.role === 'primary' && config.peer === undefined) {
      ctx.addIssue({ code: 'custom', path: ['peer'], message: 'required with role primary: the secondary daemon\'s control address and token file (--peer HOST:PORT --peer-token-file FILE)' });
    }
    // With role secondary a peer is optional: the one a volume promoted to primary replicates to.
    // A volume's settings of both roles are taken: each applies while the volume has that role.
    // Atomic group checkpoints are the secondary's (checkpointGroup); a primary checkpoints each volume's peer.
    if (config.role === 'primary' && Object.keys(config.groups).length > 0) {
      ctx.addIssue({ code: 'custom', path: ['groups'], message: 'not a setting of role primary: checkpoint a group atomically on the secondary' });
    }
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
  role?: string;
  peer?: string;
  peerTokenFile?: string;
  peerTlsCertificates?: string;
  peerTlsPsk?: string;
  dataDir?: string;
  nbd?: string;
  nbdSocket?: string;
  control?: string;
  controlSocket?: string;
  logLevel?: string;
  volume?: string[];
  nbdMemoryMax?: string;
  nbdStallTimeoutMs?: string;
  nbdConnectionsMax?: string;
  nbdExportConnectionsMax?: string;
  nbdHandshakeTimeoutMs?: string;
  controlConnectionsMax?: string;
  tls?: string;
  tlsCertificates?: string;
  tlsPsk?: string;
  tlsVerifyPeer?: boolean;
}

/** Which config field each flag sets, so errors about a flag's value name the flag. */
const flagFields: Record<string, string> = {
  role: '--role',
  'peer.control': '--peer',
  'peer.tokenFile': '--peer-token-file',
  'peer.tls.certificates': '--peer-tls-certificates',
  'peer.tls.psk': '--peer-tls-psk',
  dataDir: '--data-dir',
  logLevel: '--log-level',
  'nbd.listen': '--nbd',
  'nbd.socket': '--nbd-socket',
  'nbd.memoryBytesMax': '--nbd-memory-max',
  'nbd.stallTimeoutMs': '--nbd-stall-timeout-ms',
  'nbd.connectionsMax': '--nbd-connections-max',
  'nbd.exportConnectionsMax': '--nbd-export-connections-max',
  'nbd.handshakeTimeoutMs': '--nbd-handshake-timeout-ms',
  'nbd.tls.mode': '--tls',
  'nbd.tls.certificates': '--tls-certificates',
  'nbd.tls.psk': '--tls-psk',
  'nbd.tls.verifyPeer': '--tls-verify-peer',
  'control.listen': '--control',
  'control.socket': '--control-socket',
  'control.connectionsMax': '--control-connections-max',
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
  const set = (path: string, value: string | boolean | undefined) => {
    if (value === undefined) return;
    const keys = path.split('.');
    const last = keys.pop()!;
    let parent = merged;
    for (const key of keys) {
      if (typeof parent[key] !== 'object' || parent[key] === null) parent[key] = {};
      parent = parent[key];
    }
    parent[last] = value;
    fromFlags.set(path, flagFields[path]);
  };
  set('role', flags.role);
  set('peer.control', flags.peer);
  set('peer.tokenFile', flags.peerTokenFile);
  set('peer.tls.certificates', flags.peerTlsCertificates);
  set('peer.tls.psk', flags.peerTlsPsk);
  set('dataDir', flags.dataDir);
  set('logLevel', flags.logLevel);
  set('nbd.listen', flags.nbd);
  set('nbd.socket', flags.nbdSocket);
  set('nbd.memoryBytesMax', flags.nbdMemoryMax);
  set('nbd.stallTimeoutMs', flags.nbdStallTimeoutMs);
  set('nbd.connectionsMax', flags.nbdConnectionsMax);
  set('nbd.exportConnectionsMax', flags.nbdExportConnectionsMax);
  set('nbd.handshakeTimeoutMs', flags.nbdHandshakeTimeoutMs);
  set('nbd.tls.mode', flags.tls);
  set('nbd.tls.certificates', flags.tlsCertificates);
  set('nbd.tls.psk', flags.tlsPsk);
  set('nbd.tls.verifyPeer', flags.tlsVerifyPeer);
  set('control.listen', flags.control);
  set('control.socket', flags.controlSocket);
  set('control.connectionsMax', flags.controlConnectionsMax);
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
