import { createHash, timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { FailoverTarget } from '@gannet/core';
import { z } from 'zod';
import type { EventHub } from './events.js';
import type { Metrics } from './metrics.js';

/**
 * The control API: JSON over HTTP (node:http and a table of routes), bearer-token auth on /v1, bodies
 * capped before parsing and checked by strict zod schemas. Every error is `{ error: { code, message } }`
 * (plus `field` for a bad body) with its HTTP status.
 */

export const groupVolumesMax = 1024;

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
  constructor(code: ErrorCode, message: string, field?: string) {
    super(message);
    this.name = 'ApiError';
    this.code = code;
    this.field = field;
  }
  get status(): number {
    return statusOf[this.code];
  }
}

export interface VolumeView {
  name: string;
  exports: { primary: string; secondary: string };
  uris: { primary: string[]; secondary: string[] };
  strategy: string;
  state: string;
  failoverTarget?: FailoverTarget;
  sizeBytes: number;
  blockBytes: number;
  epoch: number;
  durableEpoch: number;
  bufferedBytes: { primary: number; secondary: number; committed: number };
  spilledBytes: number;
  tornRanges: { offset: number; length: number }[];
}

/** What the control API drives; the daemon implements it. */
export interface ControlBackend {
  readonly token: string;
  readonly events: EventHub;
  readonly metrics: Metrics;
  readonly bodyBytesMax: number;
  volumes(): VolumeView[];
  volume(name: string): VolumeView;
  checkpoint(names?: string[]): Promise<{ name: string; epoch: number }[]>;
  failover(name: string, to: FailoverTarget): Promise<VolumeView>;
  onError(error: unknown, request: string): void;
}

const emptyBodySchema = z.object({}).strict();
const groupCheckpointBodySchema = z
  .object({ volumes: z.array(z.string().min(1)).min(1).max(groupVolumesMax).optional() })
  .strict();
const failoverBodySchema = z
  .object({ to: z.enum(['secondary', 'checkpoint', 'primary']).default('secondary') })
  .strict();

function digest(text: string): Buffer {
  return createHash('sha256').update(text).digest();
}

/** Compares digests so the comparison takes the same time whatever the length or content of the guess. */
export function tokenMatches(header: string | undefined, token: string): boolean {
  const match = /^Bearer\s+(\S+)\s*$/i.exec(header ?? '');
  const offered = match ? match[1] : '';
  return timingSafeEqual(digest(offered), digest(token)) && match !== null;
}

function sendJson(res: ServerResponse, status: number, value: unknown): void {
  const body = `${JSON.stringify(value)}\n`;
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

function sendError(res: ServerResponse, error: ApiError): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const body: { code: ErrorCode; message: string; field?: string } = { code: error.code, message: error.message };
  if (error.field !== undefined) body.field = error.field;
  if (error.code === 'unauthorized') res.setHeader('www-authenticate', 'Bearer realm="gannet"');
  if (error.code === 'payload_too_large') res.setHeader('connection', 'close');
  sendJson(res, error.status, { error: body });
}

/** Reads at most `bytesMax` bytes; the request is refused (and its connection closed) beyond that. */
function readBody(req: IncomingMessage, bytesMax: number): Promise<Buffer> {
  const declared = Number(req.headers['content-length'] ?? 0);
  if (declared > bytesMax) return Promise.reject(new ApiError('payload_too_large', `body larger than ${bytesMax} bytes`));
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let received = 0;
    req.on('data', (chunk: Buffer) => {
      received += chunk.length;
      if (received > bytesMax) {
        req.removeAllListeners('data');
        reject(new ApiError('payload_too_large', `body larger than ${bytesMax} bytes`));
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks, received)));
    req.on('error', reject);
  });
}

async function parseBody<T extends z.ZodType>(req: IncomingMessage, bytesMax: number, schema: T): Promise<z.output<T>> {
  const bytes = await readBody(req, bytesMax);
  let value: unknown = {};
  if (bytes.length > 0) {
    try {
      value = JSON.parse(bytes.toString('utf8'));
    } catch {
      throw new ApiError('bad_request', 'body is not valid JSON', 'body');
    }
  }
  const result = schema.safeParse(value);
  if (!result.success) {
    const issue = result.error.issues[0];
    const segments = issue.path.map(String);
    if (issue.code === 'unrecognized_keys') segments.push(issue.keys[0]);
    const field = segments.length === 0 ? 'body' : segments.join('.');
    throw new ApiError('bad_request', `${field}: ${issue.message}`, field);
  }
  return result.data;
}

interface Context {
  req: IncomingMessage;
  res: ServerResponse;
  url: URL;
  params: string[];
}

interface Route {
  method: string;
  pattern: RegExp;
  auth: boolean;
  handle(context: Context, backend: ControlBackend): Promise<void> | void;
}

const routes: Route[] = [
  {
    method: 'GET',
    pattern: /^\/healthz$/,
    auth: false,
    handle: ({ res }) => sendJson(res, 200, { status: 'ok' }),
  },
  {
    method: 'GET',
    pattern: /^\/metrics$/,
    auth: false,
    async handle({ res }, backend) {
      const text = await backend.metrics.text();
      res.writeHead(200, { 'content-type': backend.metrics.contentType, 'content-length': Buffer.byteLength(text) });
      res.end(text);
    },
  },
  {
    method: 'GET',
    pattern: /^\/v1\/volumes$/,
    auth: true,
    handle: ({ res }, backend) => sendJson(res, 200, { volumes: backend.volumes() }),
  },
  {
    method: 'GET',
    pattern: /^\/v1\/volumes\/([^/]+)$/,
    auth: true,
    handle: ({ res, params }, backend) => sendJson(res, 200, backend.volume(params[0])),
  },
  {
    method: 'POST',
    pattern: /^\/v1\/volumes\/([^/]+)\/checkpoint$/,
    auth: true,
    async handle({ req, res, params }, backend) {
      await parseBody(req, backend.bodyBytesMax, emptyBodySchema);
      const [result] = await backend.checkpoint([params[0]]);
      sendJson(res, 200, { epoch: result.epoch });
    },
  },
  {
    method: 'POST',
    pattern: /^\/v1\/checkpoint$/,
    auth: true,
    async handle({ req, res }, backend) {
      const body = await parseBody(req, backend.bodyBytesMax, groupCheckpointBodySchema);
      sendJson(res, 200, { volumes: await backend.checkpoint(body.volumes) });
    },
  },
  {
    method: 'POST',
    pattern: /^\/v1\/volumes\/([^/]+)\/failover$/,
    auth: true,
    async handle({ req, res, params }, backend) {
      const body = await parseBody(req, backend.bodyBytesMax, failoverBodySchema);
      sendJson(res, 200, await backend.failover(params[0], body.to));
    },
  },
  {
    method: 'GET',
    pattern: /^\/v1\/events$/,
    auth: true,
    handle({ res, url }, backend) {
      const volume = url.searchParams.get('volume') ?? undefined;
      if (volume !== undefined) backend.volume(volume);
      if (!backend.events.subscribe(res, volume)) throw new ApiError('unavailable', 'too many event subscribers');
    },
  },
];

async function dispatch(req: IncomingMessage, res: ServerResponse, backend: ControlBackend): Promise<void> {
  const url = new URL(req.url ?? '/', 'http://control');
  const matching = routes
    .map((route) => ({ route, match: route.pattern.exec(url.pathname) }))
    .filter((candidate) => candidate.match !== null);
  if (matching.length === 0) throw new ApiError('not_found', `no such endpoint: ${url.pathname}`);
  const found = matching.find((candidate) => candidate.route.method === req.method);
  if (!found) {
    res.setHeader('allow', matching.map((candidate) => candidate.route.method).join(', '));
    throw new ApiError('method_not_allowed', `${req.method} is not allowed on ${url.pathname}`);
  }
  if (found.route.auth && !tokenMatches(req.headers.authorization, backend.token)) {
    throw new ApiError('unauthorized', 'missing or wrong bearer token (see DATA_DIR/control.token)');
  }
  let params: string[];
  try {
    params = found.match!.slice(1).map((param) => decodeURIComponent(param));
  } catch {
    throw new ApiError('bad_request', `malformed path: ${url.pathname}`, 'path');
  }
  await found.route.handle({ req, res, url, params }, backend);
}

export function createControlServer(backend: ControlBackend): Server {
  return createServer((req, res) => {
    dispatch(req, res, backend).catch((error: unknown) => {
      // The engine refuses operations the volume's state does not allow with code ESTATE.
      if ((error as { code?: unknown })?.code === 'ESTATE') error = new ApiError('conflict', (error as Error).message);
      if (error instanceof ApiError) {
        sendError(res, error);
        // Drained, not destroyed: a reset would lose the 413 on clients still sending; nothing is kept.
        if (error.code === 'payload_too_large') req.resume();
        return;
      }
      backend.onError(error, `${req.method} ${req.url}`);
      sendError(res, new ApiError('internal', (error as Error)?.message ?? String(error)));
    });
  });
}
