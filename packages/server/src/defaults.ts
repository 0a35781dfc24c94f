/** What the CLI clients share with the daemon, kept apart from config.ts so they load without the engine. */

export const defaultDataDir = './data';
export const defaultNbdListen = '127.0.0.1:10809';
export const defaultControlListen = '127.0.0.1:10810';
export const tokenFileName = 'control.token';
/** Volumes in one atomic checkpoint: a consistency group of the config, or the names of one request. */
export const groupVolumesMax = 1024;

export const logLevels = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof logLevels)[number];

export interface ListenAddress {
  host: string;
  port: number;
}

/** Parses `HOST:PORT` or `[V6]:PORT`; port 0 asks the kernel for a free port. */
export function parseHostPort(text: string): ListenAddress | undefined {
  const match = /^(?:\[([^\]]+)\]|([^:\s]+)):(\d{1,5})$/.exec(text.trim());
  if (!match) return undefined;
  const port = Number(match[3]);
  if (port > 65535) return undefined;
  return { host: match[1] ?? match[2], port };
}

export function formatHostPort(address: ListenAddress): string {
  return address.host.includes(':') ? `[${address.host}]:${address.port}` : `${address.host}:${address.port}`;
}
