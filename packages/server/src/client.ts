import { readFile } from 'node:fs/promises';
import { request, type Agent } from 'node:http';
import { join } from 'node:path';
import { formatHostPort, tokenFileName, type ListenAddress } from './defaults.js';
import { MiB } from '@gannet/block-device';

/** The CLI's side of the control API: one request, a bounded response, errors the CLI can classify. */

export const responseBytesMax = 16 * MiB;
export const requestTimeoutMs = 120_000;

export type ControlEndpoint = ListenAddress | { path: string };

export function describeEndpoint(endpoint: ControlEndpoint): string {
  return 'path' in endpoint ? `unix:${endpoint.path}` : `http://${formatHostPort(endpoint)}`;
}

/** The daemon answered with an error; the CLI exits 1 with its message. */
export class RefusedError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    /** The request field the daemon refused, when it named one. */
    readonly field?: string,
    /** The engine's code behind the refusal, when the daemon named one (EPEER, ESPLITBRAIN, ...). */
    readonly reason?: string,
  ) {
    super(message);
    this.name = 'RefusedError';
  }
}

/** The daemon could not be reached at all. */
export class UnreachableError extends Error {
  constructor(endpoint: ControlEndpoint, cause: Error) {
    super(`cannot reach the gannet daemon at ${describeEndpoint(endpoint)} (${cause.message}); is \`gannet serve\` running there?`);
    this.name = 'UnreachableError';
  }
}

/** A CLI usage problem; exit status 2. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

/** The token in `tokenFile`, or in the data directory's control.token. */
export async function readToken(dataDir: string, tokenFile?: string): Promise<string> {
  const file = tokenFile ?? join(dataDir, tokenFileName);
  try {
    return (await readFile(file, 'utf8')).trim();
  } catch (error) {
    const hint = tokenFile === undefined ? "pass the daemon's --data-dir" : 'pass the right --token-file';
    throw new UsageError(`cannot read the control token at ${file} (${(error as Error).message}); ${hint}`);
  }
}

export interface CallOptions {
  /** Connections to reuse (the process's global agent by default). */
  readonly agent?: Agent;
  /** Ends the request at once: its socket is destroyed and the call rejects with the signal's reason. */
  readonly signal?: AbortSignal;
  /** The socket may be idle this long before the call fails (requestTimeoutMs by default). */
  readonly timeoutMs?: number;
}

export function callControl(
  endpoint: ControlEndpoint,
  token: string,
  method: 'GET' | 'POST' | 'PUT' | 'DELETE',
  path: string,
  body?: unknown,
  options: CallOptions = {},
): Promise<unknown> {
  const payload = body === undefined ? undefined : JSON.stringify(body);
  const timeoutMs = options.timeoutMs ?? requestTimeoutMs;
  if (options.signal?.aborted) return Promise.reject(options.signal.reason);
  return new Promise((resolve, reject) => {
    const req = request(
      {
        ...('path' in endpoint ? { socketPath: endpoint.path } : { host: endpoint.host, port: endpoint.port }),
        method,
        path,
        timeout: timeoutMs,
        ...(options.agent !== undefined && { agent: options.agent }),
        ...(options.signal !== undefined && { signal: options.signal }),
        headers: {
          authorization: `Bearer ${token}`,
          accept: 'application/json',
          ...(payload !== undefined && { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) }),
        },
      },
      (res) => {
        const chunks: Buffer[] = [];
        let received = 0;
        res.on('data', (chunk: Buffer) => {
          received += chunk.length;
          if (received > responseBytesMax) {
            res.destroy(new Error(`response larger than ${responseBytesMax} bytes`));
            return;
          }
          chunks.push(chunk);
        });
        res.on('error', reject);
        res.on('end', () => {
          const text = Buffer.concat(chunks, received).toString('utf8');
          let value: unknown;
          try {
            value = JSON.parse(text);
          } catch {
            reject(new Error(`${describeEndpoint(endpoint)} answered ${res.statusCode} with a body that is not JSON`));
            return;
          }
          const status = res.statusCode ?? 0;
          if (status >= 200 && status < 300) {
            resolve(value);
            return;
          }
          const error = (value as { error?: { code?: string; message?: string; field?: string; reason?: string } }).error;
          reject(new RefusedError(status, error?.code ?? 'unknown', error?.message ?? `HTTP ${status}`, error?.field, error?.reason));
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    req.on('error', (error: NodeJS.ErrnoException) => {
      if (options.signal?.aborted) {
        reject(options.signal.reason);
        return;
      }
      const unreachable = ['ECONNREFUSED', 'ENOENT', 'EHOSTUNREACH', 'ENETUNREACH', 'ECONNRESET', 'ETIMEDOUT', 'EAI_AGAIN', 'ENOTFOUND'];
      reject(error.code !== undefined && unreachable.includes(error.code) ? new UnreachableError(endpoint, error) : error);
    });
    req.end(payload);
  });
}
