/**
 * TLS credentials for NBD, laid out as qemu-nbd and nbdkit read them, so one set of files serves all
 * three: an X.509 directory (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`; clients take
 * `ca-cert.pem` and, for client certificates, `client-cert.pem` and `client-key.pem`) or a PSK file as
 * psktool writes it (`identity:hexkey` per line).
 *
 * Node's TLS is OpenSSL; qemu and libnbd use GnuTLS. Both sides allow TLS 1.2 and 1.3 only (the NBD
 * spec requires 1.2 and advises against older versions). PSK needs its cipher suites named: OpenSSL
 * leaves them out by default.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import tls from 'node:tls';

export type TlsMode = 'off' | 'on' | 'require';
export const tlsModes: readonly TlsMode[] = ['off', 'on', 'require'];

export const caCertFile = 'ca-cert.pem';
export const serverCertFile = 'server-cert.pem';
export const serverKeyFile = 'server-key.pem';
export const clientCertFile = 'client-cert.pem';
export const clientKeyFile = 'client-key.pem';

export const tlsMinVersion = 'TLSv1.2';
/**
 * PSK suites for TLS 1.2 (forward-secret ones first) and the TLS 1.3 suites, which OpenSSL uses with a
 * PSK only when their hash is SHA-256 (the hash an identity callback's key is assumed to have).
 */
export const pskCiphers = [
  'ECDHE-PSK-CHACHA20-POLY1305',
  'DHE-PSK-AES256-GCM-SHA384',
  'DHE-PSK-AES128-GCM-SHA256',
  'PSK-AES256-GCM-SHA384',
  'PSK-AES128-GCM-SHA256',
  'TLS_AES_128_GCM_SHA256',
  'TLS_CHACHA20_POLY1305_SHA256',
].join(':');
/** psktool's identities are user names; the spec caps TLS PSK identities at 2^16 - 1 bytes. */
export const pskIdentityBytesMax = 1024;
/** A PSK file is a few lines; refuse to read anything that is obviously not one. */
export const pskFileBytesMax = 1024 * 1024;

/** Server-side credentials: X.509, PSK, or both (a client then uses whichever it has). */
export interface TlsServerCredentials {
  readonly x509?: {
    readonly key: Buffer;
    readonly cert: Buffer;
    /** CA certificates that client certificates must chain to; required by `verifyPeer`. */
    readonly ca?: Buffer;
    /** Ask every client for a certificate and refuse the handshake without a valid one. */
    readonly verifyPeer: boolean;
  };
  /** Identity -> key. */
  readonly psk?: ReadonlyMap<string, Buffer>;
}

/** Client-side credentials: X.509 (the CA that signs the server, optionally a client certificate) or PSK. */
export interface TlsClientCredentials {
  readonly x509?: {
    readonly ca: Buffer;
    readonly cert?: Buffer;
    readonly key?: Buffer;
    /** Name checked against the server certificate; the connection's host by default. */
    readonly servername?: string;
  };
  readonly psk?: { readonly identity: string; readonly key: Buffer };
}

/** A credentials file or directory that cannot be used; the message names the file. */
export class TlsCredentialsError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'TlsCredentialsError';
  }
}

async function readCredential(path: string): Promise<Buffer> {
  try {
    return await readFile(path);
  } catch (err) {
    throw new TlsCredentialsError(`cannot read ${path}: ${(err as Error).message}`, { cause: err });
  }
}

async function readOptional(path: string): Promise<Buffer | undefined> {
  try {
    return await readFile(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new TlsCredentialsError(`cannot read ${path}: ${(err as Error).message}`, { cause: err });
  }
}

/** Reads a server's X.509 directory; `ca-cert.pem` is needed only to verify client certificates. */
export async function loadServerX509(dir: string, options: { verifyPeer?: boolean } = {}): Promise<NonNullable<TlsServerCredentials['x509']>> {
  const verifyPeer = options.verifyPeer ?? false;
  const [cert, key, ca] = await Promise.all([
    readCredential(join(dir, serverCertFile)),
    readCredential(join(dir, serverKeyFile)),
    verifyPeer ? readCredential(join(dir, caCertFile)) : readOptional(join(dir, caCertFile)),
  ]);
  const credentials = { cert, key, verifyPeer, ...(ca !== undefined && { ca }) };
  // Parsing now turns a bad file into an error at start-up rather than at the first client.
  try {
    tls.createSecureContext({ cert, key, ca, minVersion: tlsMinVersion });
  } catch (err) {
    throw new TlsCredentialsError(`${dir}: unusable certificate or key: ${(err as Error).message}`, { cause: err });
  }
  return credentials;
}

/** Reads a client's X.509 directory: `ca-cert.pem`, and `client-cert.pem` + `client-key.pem` if present. */
export async function loadClientX509(dir: string): Promise<NonNullable<TlsClientCredentials['x509']>> {
  const [ca, cert, key] = await Promise.all([
    readCredential(join(dir, caCertFile)),
    readOptional(join(dir, clientCertFile)),
    readOptional(join(dir, clientKeyFile)),
  ]);
  if ((cert === undefined) !== (key === undefined)) {
    throw new TlsCredentialsError(`${dir}: ${clientCertFile} and ${clientKeyFile} go together`);
  }
  return { ca, ...(cert !== undefined && { cert, key }) };
}

/** Parses psktool's format: one `identity:hexkey` per line; blank lines are ignored. */
export function parsePskFile(text: string, source = 'PSK file'): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  text.split('\n').forEach((raw, index) => {
    const line = raw.replace(/\r$/, '');
    if (line.trim() === '') return;
    const where = `${source} line ${index + 1}`;
    const colon = line.lastIndexOf(':');
    if (colon <= 0) throw new TlsCredentialsError(`${where}: expected identity:hexkey`);
    const identity = line.slice(0, colon);
    const hex = line.slice(colon + 1);
    if (Buffer.byteLength(identity) > pskIdentityBytesMax) throw new TlsCredentialsError(`${where}: identity longer than ${pskIdentityBytesMax} bytes`);
    if (!/^(?:[0-9a-fA-F]{2})+$/.test(hex)) throw new TlsCredentialsError(`${where}: the key is not an even number of hex digits`);
    if (keys.has(identity)) throw new TlsCredentialsError(`${where}: identity ${JSON.stringify(identity)} appears twice`);
    keys.set(identity, Buffer.from(hex, 'hex'));
  });
  if (keys.size === 0) throw new TlsCredentialsError(`${source}: no keys`);
  return keys;
}

export async function loadPskFile(path: string): Promise<Map<string, Buffer>> {
  const data = await readCredential(path);
  if (data.length > pskFileBytesMax) throw new TlsCredentialsError(`${path}: larger than ${pskFileBytesMax} bytes`);
  return parsePskFile(data.toString('utf8'), path);
}

/** What a server-side TLSSocket is built with, made once per server. */
export interface ServerTlsSetup {
  readonly secureContext: tls.SecureContext;
  readonly requestCert: boolean;
  readonly pskCallback?: (socket: tls.TLSSocket, identity: string) => Buffer | null;
}

export function serverTlsSetup(credentials: TlsServerCredentials): ServerTlsSetup {
  const { x509, psk } = credentials;
  if (x509 === undefined && psk === undefined) throw new TlsCredentialsError('TLS needs X.509 credentials or PSK keys');
  if (x509?.verifyPeer && x509.ca === undefined) throw new TlsCredentialsError(`verifying client certificates needs ${caCertFile}`);
  const secureContext = tls.createSecureContext({
    minVersion: tlsMinVersion,
    ...(x509 !== undefined && { key: x509.key, cert: x509.cert, ca: x509.ca }),
    // With certificates, OpenSSL's default suites stay and the PSK ones are added.
    ...(psk !== undefined && { ciphers: x509 !== undefined ? `${tls.DEFAULT_CIPHERS}:${pskCiphers}` : pskCiphers }),
  });
  return {
    secureContext,
    requestCert: x509?.verifyPeer ?? false,
    // An unknown identity gets null: the handshake fails with unknown_psk_identity.
    ...(psk !== undefined && { pskCallback: (_socket: tls.TLSSocket, identity: string) => psk.get(identity) ?? null }),
  };
}
