import { createHash, timingSafeEqual } from 'node:crypto';
import type { Socket } from 'node:net';
import { digestBytes, digestChunkBytes, digestChunksPerCallMax, generationSchema, type FailoverStatus, type FailoverTarget, type Generation, type PrimaryStats, type SplitBrain } from '@gannet/core';
import fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { z } from 'zod';
import { groupVolumesMax, parseHostPort } from './defaults.js';
import type { EventHub } from './events.js';

/**
 * The control API: JSON over HTTP (fastify), bearer-token auth on /v1, bodies capped before parsing and
 * checked by strict zod schemas. Every error is `{ error: { code, message } }` (plus `field` for a bad
 * body or path) with its HTTP status, whichever layer refused the request.
 */

/** Node's own defaults, which fastify would otherwise replace (72 s keep-alive, no request timeout). */
export const controlKeepAliveTimeoutMs = 5_000;
export const controlRequestTimeoutMs = 300_000;

export type ErrorCode =
  | 'bad_request'
  | 'unauthorized'
  | 'not_found'
  | 'method_not_allowed'
  | 'conflict'
  | 'payload_too_large'
  | 'unavailable'
  | 'internal';

const statusOf: Record<ErrorCode, number> = {
  bad_request: 400,
  unauthorized: 401,
  not_found: 404,
  method_not_allowed: 405,
  conflict: 409,
  payload_too_large: 413,
  unavailable: 503,
  internal: 500,
};

export class ApiError extends Error {
  readonly code: ErrorCode;
  readonly field?: string;
  /** For `unavailable`: the engine's or the system's code (ENOSPC, EIO, EMETA, EHALTED, ...). */
  readonly reason?: string;
  constructor(code: ErrorCode, message: string, field?: string, reason?: string) {
    super(message);
    this.name = 'ApiError';
    this.code = code;
    this.field = field;
    this.reason = reason;
  }
  get status(): number {
    return statusOf[this.code];
  }
}

export interface VolumeErrorView {
  code: string;
  message: string;
  since: string;
}

/**
 * A volume as the API shows it. A volume in state `error` could not be opened: it carries `error`, its
 * exports are not served (`uris` are empty), and what only an open volume knows (epochs, buffers) is
 * absent; `sizeBytes` and `blockBytes` are there when its volume.json could be read.
 */
export interface VolumeView {
  name: string;
  role: 'secondary';
  exports: { primary: string; secondary: string };
  uris: { primary: string[]; secondary: string[] };
  strategy: string;
  state: string;
  /** The volume's uuid (gannet): a primary tells a different disk from the one it synced by it. */
  volumeId?: string;
  /** Changes each time the volume is opened (gannet): a primary tells a restarted peer by it. */
  instance?: string;
  error?: VolumeErrorView;
  failoverTarget?: FailoverTarget;
  failover?: FailoverStatus;
  lostFailover?: { target: FailoverTarget; requestedAt: string; lostAt: string };
  sizeBytes?: number;
  blockBytes?: number;
  epoch?: number;
  durableEpoch?: number;
  bufferedBytes?: { primary: number; secondary: number; committed: number };
  spilledBytes?: number;
  tornRanges?: { offset: number; length: number }[];
  /** A primary's resync is under way (gannet): the disk is part old, part new, and failover is refused. */
  inconsistent?: boolean;
  inconsistentSince?: string;
  /** The volume's lineage (gannet): null while it has none (a fresh or discarded disk). */
  generation?: Generation | null;
  /** The last primary that attached had written since they split: its attach was refused (ESPLITBRAIN). */
  splitBrain?: SplitBrain;
  /** NBD connections on the volume's exports. */
  clients?: number;
}

/**
 * A volume of a primary daemon: one export, NAME, the PVM's disk, whose every change goes to the peer.
 * `peerEpoch` is the epoch the peer began at the last checkpoint; once `peerDurableEpoch` reaches it, the
 * peer's backing file holds the disk as of that checkpoint. In state `error` only `error` (and
 * `sizeBytes` when volume.json is readable) is there.
 */
export interface PrimaryVolumeView {
  name: string;
  role: 'primary';
  /** `secondary`: a volume promoted from the secondary role is also served as NAME/secondary. */
  exports: { disk: string; secondary?: string };
  uris: { disk: string[]; secondary?: string[] };
  /** When it was promoted from the secondary role. */
  promotedAt?: string;
  state: string;
  error?: VolumeErrorView;
  sizeBytes?: number;
  ackMode?: PrimaryStats['ackMode'];
  link?: PrimaryStats['link'];
  inflightBytes?: number;
  dirtyBytes?: number;
  unsentBytes?: number;
  resync?: NonNullable<PrimaryStats['resync']>;
  lastResync?: NonNullable<PrimaryStats['lastResync']>;
  /** The volume's lineage, and both histories while it is in split brain with its peer. */
  generation?: Generation;
  splitBrain?: NonNullable<PrimaryStats['splitBrain']>;
  resyncBytesTotal?: number;
  resyncDataBytesTotal?: number;
  peerEpoch?: number | null;
  peerDurableEpoch?: number | null;
  clients?: number;
}

export type AnyVolumeView = VolumeView | PrimaryVolumeView;

/**
 * Who attaches, so that a late attach of a session the same primary already gave up on (a request the
 * peer reads only after a hang) cannot fence a newer one: `link` names the primary's link for its
 * lifetime, `attempt` grows with each of its attaches.
 */
export interface PeerAttachRequest {
  link: string;
  attempt: number;
}

/** An NBD listen address of the daemon; a wildcard host (0.0.0.0, ::) means every address of the host. */
export type NbdAddressView = { host: string; port: number } | { path: string };

/**
 * What a primary attaching to a volume learns (POST /v1/volumes/:name/peer): the volume's state, and
 * where to send its writes. Every earlier NBD connection to NAME/primary is closed before this is read.
 */
export interface PeerAttachView {
  volumeId: string;
  /** Changes each time the daemon opens the volume: a new one has lost what it buffered. */
  instance: string;
  sizeBytes: number;
  state: string;
  epoch: number;
  durableEpoch: number;
  tornRanges: { offset: number; length: number }[];
  inconsistent: boolean;
  /** The volume's generation; null: none (it takes a full digest sync). */
  generation: Generation | null;
  /** `tls`: the daemon serves NBD only over TLS. */
  nbd: { export: string; addresses: NbdAddressView[]; tls: boolean };
}

/** `POST /v1/volumes/:name/promote`: the peer to replicate to (else the daemon's), and a failover forced over a half-synced disk. */
export interface PromoteRequest {
  peer?: string;
  force: boolean;
}

/** `POST /v1/volumes/:name/demote`: `force` disconnects the NBD clients of the volume instead of refusing. */
export interface DemoteRequest {
  force: boolean;
}

/** `POST /v1/volumes/:name/resolve`: the local side's changes since the split are dropped. */
export interface ResolveRequest {
  discardLocal: true;
}

/**
 * `POST /v1/volumes/:name/digests`: digests of the volume's primary view, one per chunk (digestChunkBytes,
 * digestBytes each), concatenated and base64-encoded, for a primary's full sync that sends only what
 * differs. `instance` lets the primary tell a restarted volume from the one it feeds.
 */
export interface DigestsView {
  instance: string;
  chunkBytes: typeof digestChunkBytes;
  digestBytes: typeof digestBytes;
  digests: string;
}

export interface CheckpointResult {
  /** `durableEpoch`: the volume's durable epoch when the checkpoint was taken. */
  volumes: { name: string; epoch: number; durableEpoch: number; instance?: string }[];
  /** When no names were given: the volumes left out of the group, and why (failed over, error). */
  skipped?: { name: string; reason: string }[];
}

export interface RemoveResult {
  name: string;
  /** Where the volume's directory went; absent when it was purged (or never had one). */
  movedTo?: string;
  purged: boolean;
  /** Closing the volume failed (with force): what was not flushed. */
  closeError?: string;
}

export interface RecoverResult {
  volume: AnyVolumeView;
  recovered: { lifecycle: 'replicating' | 'failed-over'; movedTo: string | null; fullResync: boolean };
}

export interface ReloadResult {
  /** Volumes the file names that were added now. */
  added: string[];
  /** Volumes the file names that could not be added (they show in state `error`). */
  failed: { name: string; code: string; message: string }[];
  /** Volumes served but not named by the file: kept (a reload never removes a volume). */
  notInConfig: string[];
  /** Changed settings taken only at the next start (or, for a volume, its next open). */
  restartNeeded: string[];
  /** Changed settings in effect now. */
  applied: string[];
}

export interface GroupView {
  name: string;
  volumes: string[];
}

/**
 * What the control API drives. It runs on the control thread; every volume operation is a call to the
 * main thread, which owns the volumes (control-lane.ts).
 */
export interface ControlBackend {
  readonly token: string;
  readonly events: EventHub;
  readonly bodyBytesMax: number;
  volumes(): Promise<AnyVolumeView[]>;
  volume(name: string): Promise<AnyVolumeView>;
  /** The body as sent: the main thread checks it with the config file's schema. */
  create(body: unknown): Promise<AnyVolumeView>;
  remove(name: string, options: { force: boolean; purge: boolean }): Promise<RemoveResult>;
  recover(name: string): Promise<RecoverResult>;
  checkpoint(names?: string[]): Promise<CheckpointResult>;
  failover(name: string, to: FailoverTarget, force: boolean): Promise<AnyVolumeView>;
  attachPeer(name: string, from?: PeerAttachRequest, generation?: Generation | null): Promise<PeerAttachView>;
  setInconsistent(name: string, inconsistent: boolean, generation?: Generation): Promise<VolumeView>;
  digests(name: string, offset: number, length: number): Promise<DigestsView>;
  promote(name: string, request: PromoteRequest): Promise<AnyVolumeView>;
  demote(name: string, request: DemoteRequest): Promise<AnyVolumeView>;
  resolve(name: string, request: ResolveRequest): Promise<AnyVolumeView>;
  groups(): Promise<GroupView[]>;
  reload(): Promise<ReloadResult>;
  metrics(): Promise<{ contentType: string; text: string }>;
  onError(error: unknown, request: string): void;
}

const emptyBodySchema = z.object({}).strict();
const groupCheckpointBodySchema = z
  .object({ volumes: z.array(z.string().min(1)).min(1).max(groupVolumesMax).optional() })
  .strict();
const failoverBodySchema = z
  .object({ to: z.enum(['secondary', 'checkpoint', 'primary']).default('secondary'), force: z.boolean().default(false) })
  .strict();
const attachBodySchema = z
  .object({
    link: z.string().min(1).max(128).optional(),
    attempt: z.number().int().positive().max(Number.MAX_SAFE_INTEGER).optional(),
    generation: generationSchema.nullable().optional(),
  })
  .strict()
  .refine((body) => (body.link === undefined) === (body.attempt === undefined), { message: 'link and attempt go together', path: ['attempt'] });
const inconsistentBodySchema = z
  .object({ inconsistent: z.boolean(), generation: generationSchema.optional() })
  .strict()
  .refine((body) => body.generation === undefined || !body.inconsistent, { message: 'a generation is adopted only when the mark is cleared', path: ['generation'] });
/** One digests call covers at most digestChunksPerCallMax chunks; the volume checks the alignment. */
const digestsBodySchema = z
  .object({
    offset: z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER),
    length: z.number().int().positive().max(digestChunksPerCallMax * digestChunkBytes),
  })
  .strict();
const promoteBodySchema = z
  .object({
    peer: z
      .string()
      .refine((value) => parseHostPort(value) !== undefined && parseHostPort(value)!.port > 0, 'expected HOST:PORT, the new secondary daemon\'s control API')
      .optional(),
    force: z.boolean().default(false),
  })
  .strict();
const demoteBodySchema = z.object({ force: z.boolean().default(false) }).strict();
const resolveBodySchema = z
  .object({ discardLocal: z.literal(true, { error: 'required: true (this side\'s changes since the split are dropped)' }) })
  .strict();
const flag = z.enum(['true', 'false']).transform((value) => value === 'true');
const deleteQuerySchema = z.object({ force: flag.default(false), purge: flag.default(false) }).strict();
/** Not strict: a client may add parameters of its own (a cache-buster, say). */
const eventsQuerySchema = z.object({ volume: z.string().optional() });

function digest(text: string): Buffer {
  return createHash('sha256').update(text).digest();
}

/** Compares digests so the comparison takes the same time whatever the length or content of the guess. */
export function tokenMatches(header: string | undefined, token: string): boolean {
  const match = /^Bearer\s+(\S+)\s*$/i.exec(header ?? '');
  const offered = match ? match[1] : '';
  return timingSafeEqual(digest(offered), digest(token)) && match !== null;
}

/** The path of a request target as it came off the wire, undecoded. */
const pathOf = (rawUrl: string) => rawUrl.split(/[?#]/, 1)[0];

/**
 * The router decodes percent-escapes in path parameters, so `%2e%2e` or `%2f` inside a volume name would
 * otherwise reach a handler as `..` or `a/b`, and a proxy or client that normalises paths would send the
 * request somewhere else than the operator wrote. Such paths are refused, never resolved.
 */
function unsafePathError(rawUrl: string): ApiError | undefined {
  const path = pathOf(rawUrl);
  if (/%(2f|5c)/i.test(path)) return new ApiError('bad_request', `path has an encoded slash: ${path}`, 'path');
  const dotSegment = path.split('/').some((segment) => {
    const decoded = segment.replace(/%2e/gi, '.');
    return decoded === '.' || decoded === '..';
  });
  if (dotSegment) return new ApiError('bad_request', `path has a dot segment: ${path}`, 'path');
  return undefined;
}

/** Checks `value`; a failure is a 400 naming the first bad field. */
export function validate<T extends z.ZodType>(schema: T, value: unknown): z.output<T> {
  const result = schema.safeParse(value);
  if (result.success) return result.data;
  const issue = result.error.issues[0];
  const segments = issue.path.map(String);
  if (issue.code === 'unrecognized_keys') segments.push(issue.keys[0]);
  const field = segments.length === 0 ? 'body' : segments.join('.');
  throw new ApiError('bad_request', `${field}: ${issue.message}`, field);
}

/**
 * Codes of failures that are no fault of the request and may heal (space freed, metadata recovered, the
 * volume reopened, a primary's peer back): answered 503 with the code as `reason`.
 */
const unavailableCodes = new Set(['EPEER', 'ENOSPC', 'EDQUOT', 'EFBIG', 'EIO', 'EMETA', 'EHALTED', 'EPERM', 'EACCES', 'EROFS', 'ENOMEM', 'ESHUTDOWN']);

/** The API's own errors and the engine's refusals; anything else is an internal error. */
export function apiErrorOf(error: unknown): ApiError | undefined {
  if (error instanceof ApiError) return error;
  if (typeof error !== 'object' || error === null) return undefined;
  const { code, message = String(code) } = error as { code?: unknown; message?: string };
  if (typeof code !== 'string') return undefined;
  // ESTATE: the volume's state forbids it; ETORN: failover over torn ranges without force; EFENCED: the
  // primary's peer failed over.
  if (code === 'ESTATE' || code === 'ETORN' || code === 'EMISMATCH' || code === 'EFENCED') return new ApiError('conflict', message);
  // ESPLITBRAIN: a primary that wrote since it split from this volume attached; the reason tells it so.
  if (code === 'ESPLITBRAIN') return new ApiError('conflict', message, undefined, code);
  if (code === 'EOPTIONS') return new ApiError('bad_request', message);
  if (unavailableCodes.has(code)) return new ApiError('unavailable', message, undefined, code);
  // The metadata store (LevelDB) failed under the engine.
  if (code.startsWith('LEVEL_')) return new ApiError('unavailable', message, undefined, 'EMETA');
  return undefined;
}

/** Errors fastify raises while reading a body. */
function bodyErrorOf(error: unknown, bodyBytesMax: number): ApiError | undefined {
  if (typeof error !== 'object' || error === null) return undefined;
  const { code, message } = error as { code?: unknown; message?: string };
  if (code === 'FST_ERR_CTP_BODY_TOO_LARGE') return new ApiError('payload_too_large', `body larger than ${bodyBytesMax} bytes`);
  // Reading the body: fewer bytes than Content-Length, a Content-Type that does not parse.
  if (typeof code === 'string' && code.startsWith('FST_ERR_CTP_')) return new ApiError('bad_request', `body: ${message}`, 'body');
  return undefined;
}

/** What the router refuses before any hook runs: a percent-escape that does not decode, an overlong name. */
function routerError(error: { code?: unknown; message: string }, rawUrl: string): ApiError {
  const path = pathOf(rawUrl);
  if (error.code === 'FST_ERR_BAD_URL') return new ApiError('bad_request', `malformed path: ${path}`, 'path');
  // Longer than any volume name can be.
  if (error.code === 'FST_ERR_MAX_PARAM_LENGTH') return new ApiError('not_found', `no such endpoint: ${path}`);
  return new ApiError('internal', error.message);
}

function sendError(reply: FastifyReply, error: ApiError): FastifyReply {
  const body: { code: ErrorCode; message: string; field?: string; reason?: string } = { code: error.code, message: error.message };
  if (error.field !== undefined) body.field = error.field;
  if (error.reason !== undefined) body.reason = error.reason;
  if (error.code === 'unauthorized') reply.header('www-authenticate', 'Bearer realm="gannet"');
  if (error.code === 'payload_too_large') reply.header('connection', 'close');
  return reply.code(error.status).send({ error: body });
}

/** HTTP that does not parse never reaches a route; it gets the same error shape before the socket closes. */
function onClientError(error: NodeJS.ErrnoException, socket: Socket): void {
  if (error.code !== 'ECONNRESET' && socket.writable) {
    const body = `${JSON.stringify({ error: { code: 'bad_request', message: `malformed HTTP request (${error.code ?? error.message})` } })}\n`;
    socket.write(
      `HTTP/1.1 400 Bad Request\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: ${Buffer.byteLength(body)}\r\n` +
        `connection: close\r\n\r\n${body}`,
    );
  }
  socket.destroy();
}

interface Route {
  method: 'GET' | 'POST' | 'PUT' | 'DELETE';
  url: string;
  auth: boolean;
  handle(request: FastifyRequest, reply: FastifyReply, backend: ControlBackend): Promise<unknown>;
}

const nameOf = (request: FastifyRequest) => (request.params as { name: string }).name;
/** A POST without a body (no Content-Type, no length) never reaches the parser. */
const bodyOf = (request: FastifyRequest) => request.body ?? {};

const routes: Route[] = [
  { method: 'GET', url: '/healthz', auth: false, handle: async () => ({ status: 'ok' }) },
  {
    method: 'GET',
    url: '/metrics',
    auth: false,
    async handle(_request, reply, backend) {
      const { contentType, text } = await backend.metrics();
      reply.type(contentType);
      return text;
    },
  },
  { method: 'GET', url: '/v1/volumes', auth: true, handle: async (_request, _reply, backend) => ({ volumes: await backend.volumes() }) },
  {
    method: 'POST',
    url: '/v1/volumes',
    auth: true,
    async handle(request, reply, backend) {
      const view = await backend.create(bodyOf(request));
      reply.code(201);
      return view;
    },
  },
  { method: 'GET', url: '/v1/volumes/:name', auth: true, handle: async (request, _reply, backend) => backend.volume(nameOf(request)) },
  {
    method: 'DELETE',
    url: '/v1/volumes/:name',
    auth: true,
    async handle(request, _reply, backend) {
      validate(emptyBodySchema, bodyOf(request));
      return backend.remove(nameOf(request), validate(deleteQuerySchema, request.query));
    },
  },
  {
    method: 'POST',
    url: '/v1/volumes/:name/recover',
    auth: true,
    async handle(request, _reply, backend) {
      validate(emptyBodySchema, bodyOf(request));
      return backend.recover(nameOf(request));
    },
  },
  {
    method: 'POST',
    url: '/v1/volumes/:name/checkpoint',
    auth: true,
    async handle(request, _reply, backend) {
      validate(emptyBodySchema, bodyOf(request));
      const { volumes } = await backend.checkpoint([nameOf(request)]);
      const [{ epoch, durableEpoch, instance }] = volumes;
      return { epoch, durableEpoch, ...(instance !== undefined && { instance }) };
    },
  },
  {
    method: 'POST',
    url: '/v1/volumes/:name/peer',
    auth: true,
    async handle(request, _reply, backend) {
      const body = validate(attachBodySchema, bodyOf(request));
      const from = body.link !== undefined && body.attempt !== undefined ? { link: body.link, attempt: body.attempt } : undefined;
      return backend.attachPeer(nameOf(request), from, body.generation);
    },
  },
  {
    method: 'PUT',
    url: '/v1/volumes/:name/inconsistent',
    auth: true,
    async handle(request, _reply, backend) {
      const body = validate(inconsistentBodySchema, bodyOf(request));
      return backend.setInconsistent(nameOf(request), body.inconsistent, body.generation);
    },
  },
  {
    method: 'POST',
    url: '/v1/volumes/:name/digests',
    auth: true,
    async handle(request, _reply, backend) {
      const body = validate(digestsBodySchema, bodyOf(request));
      return backend.digests(nameOf(request), body.offset, body.length);
    },
  },
  {
    method: 'POST',
    url: '/v1/checkpoint',
    auth: true,
    async handle(request, _reply, backend) {
      const body = validate(groupCheckpointBodySchema, bodyOf(request));
      return backend.checkpoint(body.volumes);
    },
  },
  {
    method: 'POST',
    url: '/v1/volumes/:name/failover',
    auth: true,
    async handle(request, _reply, backend) {
      const body = validate(failoverBodySchema, bodyOf(request));
      return backend.failover(nameOf(request), body.to, body.force);
    },
  },
  {
    method: 'POST',
    url: '/v1/volumes/:name/promote',
    auth: true,
    async handle(request, _reply, backend) {
      const body = validate(promoteBodySchema, bodyOf(request));
      return backend.promote(nameOf(request), { force: body.force, ...(body.peer !== undefined && { peer: body.peer }) });
    },
  },
  {
    method: 'POST',
    url: '/v1/volumes/:name/demote',
    auth: true,
    async handle(request, _reply, backend) {
      return backend.demote(nameOf(request), validate(demoteBodySchema, bodyOf(request)));
    },
  },
  {
    method: 'POST',
    url: '/v1/volumes/:name/resolve',
    auth: true,
    async handle(request, _reply, backend) {
      return backend.resolve(nameOf(request), validate(resolveBodySchema, bodyOf(request)));
    },
  },
  { method: 'GET', url: '/v1/groups', auth: true, handle: async (_request, _reply, backend) => ({ groups: await backend.groups() }) },
  {
    method: 'POST',
    url: '/v1/reload',
    auth: true,
    async handle(request, _reply, backend) {
      validate(emptyBodySchema, bodyOf(request));
      return backend.reload();
    },
  },
  {
    method: 'GET',
    url: '/v1/events',
    auth: true,
    async handle(request, reply, backend) {
      const { volume } = validate(eventsQuerySchema, request.query);
      if (volume !== undefined) await backend.volume(volume);
      // The check waited for the main thread; a client that left meanwhile would never be unsubscribed.
      if (reply.raw.destroyed) {
        reply.hijack();
        return;
      }
      if (!backend.events.subscribe(reply.raw, volume)) throw new ApiError('unavailable', 'too many event subscribers');
      // The hub writes the stream from here on; fastify must not answer this request.
      reply.hijack();
    },
  },
];

/**
 * One server per listen address; the control thread listens and closes it. Checks run in the order a client can
 * act on: path shape, endpoint (404), method (405), token (401), then the body is read (413, 400).
 */
export function createControlServer(backend: ControlBackend): FastifyInstance {
  const app = fastify({
    logger: false,
    bodyLimit: backend.bodyBytesMax,
    keepAliveTimeout: controlKeepAliveTimeoutMs,
    requestTimeout: controlRequestTimeoutMs,
    exposeHeadRoutes: false,
    // Requests on open connections during shutdown still get answers in the API's shape (the daemon
    // refuses volume changes with 503 unavailable); fastify's own 503 body is not.
    return503OnClosing: false,
    clientErrorHandler: onClientError,
    frameworkErrors: (error, request, reply) => {
      const rawUrl = request.raw.url ?? '/';
      return sendError(reply, unsafePathError(rawUrl) ?? routerError(error, rawUrl));
    },
  });

  app.removeAllContentTypeParsers();
  // Whatever the Content-Type (curl -d sends a form type), a body is JSON. JSON.parse keeps a
  // `__proto__` key as an own property, which the strict schemas then refuse by name.
  app.addContentTypeParser('*', { parseAs: 'string' }, (_request, body, done) => {
    if (body === '') {
      done(null, {});
      return;
    }
    try {
      done(null, JSON.parse(body as string));
    } catch {
      done(new ApiError('bad_request', 'body is not valid JSON', 'body'));
    }
  });
  app.setReplySerializer((payload) => `${JSON.stringify(payload)}\n`);

  app.setErrorHandler((error, request, reply) => {
    const known = apiErrorOf(error) ?? bodyErrorOf(error, backend.bodyBytesMax);
    if (known === undefined) backend.onError(error, `${request.method} ${request.url}`);
    // Drained, not destroyed: a reset would lose the 413 on clients still sending; nothing is kept.
    if (known?.code === 'payload_too_large') request.raw.resume();
    return sendError(reply, known ?? new ApiError('internal', (error as Error)?.message ?? String(error)));
  });

  // Unknown endpoints are answered here, before fastify would read a body for its not-found handler.
  app.addHook('onRequest', async (request) => {
    const unsafe = unsafePathError(request.raw.url ?? '/');
    if (unsafe) throw unsafe;
    if (request.is404) throw new ApiError('not_found', `no such endpoint: ${pathOf(request.url)}`);
  });

  const requireToken = async (request: FastifyRequest) => {
    if (!tokenMatches(request.headers.authorization, backend.token)) {
      throw new ApiError('unauthorized', 'missing or wrong bearer token (see DATA_DIR/control.token)');
    }
  };
  for (const route of routes) {
    app.route({
      method: route.method,
      url: route.url,
      onRequest: route.auth ? [requireToken] : [],
      handler: (request, reply) => route.handle(request, reply, backend),
    });
  }

  for (const url of new Set(routes.map((route) => route.url))) {
    const allowed = routes.filter((route) => route.url === url).map((route) => route.method);
    // Refused in onRequest, before the body is read; the handler is the same function because fastify
    // requires one.
    const refuse = async (request: FastifyRequest, reply: FastifyReply) => {
      reply.header('allow', allowed.join(', '));
      throw new ApiError('method_not_allowed', `${request.method} is not allowed on ${pathOf(request.url)}`);
    };
    app.route({
      method: app.supportedMethods.filter((method) => !allowed.includes(method as Route['method'])),
      url,
      onRequest: refuse,
      handler: refuse,
    });
  }
  return app;
}
