/**
 * TLS credentials made for a test with GnuTLS's certtool and psktool (package gnutls-bin), laid out as
 * qemu, nbdkit, libnbd and gannet read them:
 * - `server/`: ca-cert.pem, server-cert.pem, server-key.pem (the server's directory);
 * - `client/`: ca-cert.pem, client-cert.pem, client-key.pem (a client with a certificate);
 * - `anonymous/`: ca-cert.pem only (a client without a certificate);
 * - `stranger/`: a client with a certificate from a CA the server does not trust;
 * - `wrongCa/`: a client that trusts another CA than the one that signed the server;
 * - `keys.psk` (identity alice) and `wrong.psk` (alice with another key), each also alone in a
 *   directory as `keys.psk`, which is the name qemu's tls-creds-psk looks for.
 * Keys are ECDSA P-256: instant to make, and every TLS stack here speaks it. The server certificate
 * names 127.0.0.1 and localhost, which is what clients check on loopback.
 */
import { copyFile, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { makeTmpDir, requireTool, runOk } from './process.js';

export const pskIdentity = 'alice';

export interface Pki {
  readonly root: string;
  readonly serverDir: string;
  readonly clientDir: string;
  readonly anonymousDir: string;
  readonly strangerDir: string;
  readonly wrongCaDir: string;
  readonly pskFile: string;
  readonly wrongPskFile: string;
  /** Directories holding only `keys.psk`, for qemu's tls-creds-psk `dir=`. */
  readonly pskDir: string;
  readonly wrongPskDir: string;
}

const days = 2;

async function template(dir: string, name: string, lines: string[]): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, `${[...lines, `expiration_days = ${days}`].join('\n')}\n`);
  return path;
}

async function key(certtool: string, path: string): Promise<void> {
  await runOk(certtool, ['--generate-privkey', '--key-type=ecdsa', '--curve=secp256r1', '--no-text', '--outfile', path]);
}

async function authority(certtool: string, work: string, name: string): Promise<{ cert: string; key: string }> {
  const caKey = join(work, `${name}-key.pem`);
  const caCert = join(work, `${name}-cert.pem`);
  await key(certtool, caKey);
  const info = await template(work, `${name}.info`, [`cn = gannet test ${name}`, 'ca', 'cert_signing_key']);
  await runOk(certtool, ['--generate-self-signed', '--no-text', '--load-privkey', caKey, '--template', info, '--outfile', caCert]);
  return { cert: caCert, key: caKey };
}

async function signed(certtool: string, ca: { cert: string; key: string }, keyPath: string, certPath: string, info: string): Promise<void> {
  await key(certtool, keyPath);
  await runOk(certtool, [
    '--generate-certificate', '--no-text',
    '--load-ca-certificate', ca.cert, '--load-ca-privkey', ca.key,
    '--load-privkey', keyPath, '--template', info, '--outfile', certPath,
  ]);
}

export async function makePki(): Promise<Pki> {
  const certtool = requireTool('certtool');
  const psktool = requireTool('psktool');
  const root = await makeTmpDir('gannet-pki-');
  const work = join(root, 'work');
  const dirs = ['server', 'client', 'anonymous', 'stranger', 'wrong-ca', 'psk', 'wrong-psk'].map((d) => join(root, d));
  const [serverDir, clientDir, anonymousDir, strangerDir, wrongCaDir, pskDir, wrongPskDir] = dirs;
  await Promise.all([work, ...dirs].map((d) => mkdir(d)));

  const ca = await authority(certtool, work, 'ca');
  const serverInfo = await template(work, 'server.info', [
    'cn = localhost', 'dns_name = localhost', 'ip_address = 127.0.0.1', 'tls_www_server', 'signing_key',
  ]);
  await signed(certtool, ca, join(serverDir, 'server-key.pem'), join(serverDir, 'server-cert.pem'), serverInfo);
  const clientInfo = await template(work, 'client.info', ['cn = gannet test client', 'tls_www_client', 'signing_key']);
  await signed(certtool, ca, join(clientDir, 'client-key.pem'), join(clientDir, 'client-cert.pem'), clientInfo);
  for (const dir of [serverDir, clientDir, anonymousDir, strangerDir]) await copyFile(ca.cert, join(dir, 'ca-cert.pem'));

  const other = await authority(certtool, work, 'other');
  await signed(certtool, other, join(strangerDir, 'client-key.pem'), join(strangerDir, 'client-cert.pem'), clientInfo);
  await copyFile(other.cert, join(wrongCaDir, 'ca-cert.pem'));

  const pskFile = join(root, 'keys.psk');
  const wrongPskFile = join(root, 'wrong.psk');
  await runOk(psktool, ['-u', pskIdentity, '-p', pskFile]);
  await runOk(psktool, ['-u', pskIdentity, '-p', wrongPskFile]);
  await copyFile(pskFile, join(pskDir, 'keys.psk'));
  await copyFile(wrongPskFile, join(wrongPskDir, 'keys.psk'));
  return { root, serverDir, clientDir, anonymousDir, strangerDir, wrongCaDir, pskFile, wrongPskFile, pskDir, wrongPskDir };
}
