/**
 * Starts the nbd-server-js CLI (from dist: build first) on an ephemeral loopback port or a Unix socket
 * and hands back its address and URI, parsed from the `nbd-server-js: serving URI` line it prints.
 */
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { startProcess, type StartedProcess } from './process.js';

export const repoRoot = fileURLToPath(new URL('../../', import.meta.url));
export const nbdCliBin = fileURLToPath(new URL('../../packages/nbd-server-js/bin/nbd-server-js.js', import.meta.url));
const nbdCliDist = fileURLToPath(new URL('../../packages/nbd-server-js/dist/cli.js', import.meta.url));

export type NbdAddress = { host: string; port: number } | { path: string };

export interface NbdCliOptions {
  /** Backing file; exactly one of `file` and `memory`. */
  readonly file?: string;
  /** Size of a memory disk, bytes or with a suffix the CLI accepts (e.g. '64M'). */
  readonly memory?: number | string;
  readonly name?: string;
  readonly readOnly?: boolean;
  /** Serve on this Unix socket path instead of TCP. */
  readonly socket?: string;
  /** Extra arguments before the device (node flags go in `nodeArgs`). */
  readonly args?: readonly string[];
  readonly nodeArgs?: readonly string[];
}

export interface NbdCli {
  readonly proc: StartedProcess;
  readonly pid: number;
  /** The URI exactly as the CLI printed it. */
  readonly uri: string;
  readonly address: NbdAddress;
  readonly exportName: string;
  /** URI of another export name on the same server. */
  uriFor(exportName: string): string;
  stop(): ReturnType<StartedProcess['stop']>;
}

const servingLine = /^nbd-server-js: serving (nbds?(?:\+unix)?:\/\/\S*)\s*$/;

export function cliArgs(options: NbdCliOptions): string[] {
  if ((options.file === undefined) === (options.memory === undefined)) {
    throw new Error('startNbdCli: give exactly one of file and memory');
  }
  const args: string[] = [...(options.args ?? [])];
  if (options.socket !== undefined) args.push('--socket', options.socket);
  else args.push('--host', '127.0.0.1', '--port', '0');
  if (options.name !== undefined) args.push('--name', options.name);
  if (options.readOnly) args.push('--read-only');
  if (options.memory !== undefined) args.push('--memory', String(options.memory));
  else args.push(options.file!);
  return args;
}

/** Parses what the CLI printed into an address; asserts the URI has the shape the contract gives. */
export function parseNbdUri(uri: string): { address: NbdAddress; exportName: string } {
  const u = new URL(uri);
  if (u.protocol === 'nbd:' || u.protocol === 'nbds:') {
    const port = Number(u.port || '10809');
    return { address: { host: u.hostname, port }, exportName: decodeURIComponent(u.pathname.slice(1)) };
  }
  if (u.protocol === 'nbd+unix:' || u.protocol === 'nbds+unix:') {
    const path = u.searchParams.get('socket');
    if (!path) throw new Error(`parseNbdUri: no socket= in ${uri}`);
    return { address: { path }, exportName: decodeURIComponent(u.pathname.slice(1)) };
  }
  throw new Error(`parseNbdUri: unexpected scheme in ${uri}`);
}

export function uriOf(address: NbdAddress, exportName: string): string {
  const name = encodeURIComponent(exportName);
  if ('path' in address) return `nbd+unix:///${name}?socket=${address.path}`;
  return `nbd://${address.host}:${address.port}/${name}`;
}

export async function startNbdCli(options: NbdCliOptions): Promise<NbdCli> {
  if (!existsSync(nbdCliDist)) {
    throw new Error(`${nbdCliDist} is missing: build first (npx -y pnpm@9 run build)`);
  }
  const proc = await startProcess(process.execPath, [...(options.nodeArgs ?? []), nbdCliBin, ...cliArgs(options)], {
    ready: servingLine,
    cwd: repoRoot,
  });
  const uri = proc.ready[1];
  const { address, exportName } = parseNbdUri(uri);
  if (options.socket !== undefined && !('path' in address && address.path === options.socket)) {
    throw new Error(`startNbdCli: asked for socket ${options.socket}, CLI printed ${uri}`);
  }
  if ('port' in address && address.port === 0) throw new Error(`startNbdCli: CLI printed port 0: ${uri}`);
  return {
    proc,
    pid: proc.pid,
    uri,
    address,
    exportName,
    uriFor: (name: string) => uriOf(address, name),
    stop: () => proc.stop(),
  };
}
