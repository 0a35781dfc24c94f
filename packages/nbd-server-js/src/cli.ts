/**
 * `nbd-server-js`: serve one file (or a memory disk) over NBD, like `nbdkit file` or `qemu-nbd`.
 * Prints `nbd-server-js: serving URI` once listening (tests parse it), closes gracefully on SIGINT or
 * SIGTERM (exit 0), exits 2 on usage errors and 1 on runtime failures.
 */
import { parseArgs } from 'node:util';
import { FileDevice, MemoryDevice, ReadOnlyDevice, parseSize as parseSizeBytes, type BlockDevice } from '@gannet/block-device';
import { DEFAULT_PORT } from './protocol/constants.js';
import { NbdServer, nbdUri, type Logger } from './server/server.js';
import { loadPskFile, loadServerX509, tlsModes, type TlsMode, type TlsServerCredentials } from './tls.js';

export const usage = `Usage: nbd-server-js FILE [options]
       nbd-server-js --memory SIZE [options]

Serve FILE (or a memory disk of SIZE bytes) over the NBD protocol.

Options:
  --host H         address to listen on (default 127.0.0.1)
  --port N         TCP port (default ${DEFAULT_PORT}; 0 picks a free port)
  --socket PATH    listen on a Unix socket instead of TCP
  --name NAME      export name (the empty name selects it too)
  --read-only      refuse writes
  --memory SIZE    serve a memory disk instead of a file; SIZE like 4096, 512M, 1G
  --tls MODE       off (default), on (clients may use TLS) or require (no export without TLS)
  --tls-certificates DIR
                   X.509 credentials: DIR/server-cert.pem, DIR/server-key.pem, DIR/ca-cert.pem
  --tls-verify-peer
                   ask clients for a certificate signed by DIR/ca-cert.pem; refuse those without
  --tls-psk FILE   pre-shared keys instead, one identity:hexkey per line (as psktool writes them)
  --help           show this help
`;

/** How long shutdown waits for in-flight requests before dropping connections. */
const shutdownGraceMs = 10_000;

class UsageError extends Error {}

/** The memory disk's size: the project's size grammar (4096, 512M, 1G, 1GiB, 2T), at least one byte. */
function memorySize(text: string): number {
  const bytes = parseSizeBytes(text);
  if (bytes === undefined || bytes <= 0) throw new UsageError(`invalid size ${JSON.stringify(text)} (examples: 4096, 512M, 1G)`);
  return bytes;
}

interface CliOptions {
  readonly file?: string;
  readonly memoryBytes?: number;
  readonly host: string;
  readonly port: number;
  readonly socket?: string;
  readonly name?: string;
  readonly readOnly: boolean;
  readonly tls: TlsMode;
  readonly tlsCertificates?: string;
  readonly tlsVerifyPeer: boolean;
  readonly tlsPsk?: string;
}

function parse(argv: string[]): CliOptions | 'help' {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      strict: true,
      options: {
        host: { type: 'string' },
        port: { type: 'string' },
        socket: { type: 'string' },
        name: { type: 'string' },
        'read-only': { type: 'boolean', default: false },
        memory: { type: 'string' },
        tls: { type: 'string' },
        'tls-certificates': { type: 'string' },
        'tls-verify-peer': { type: 'boolean', default: false },
        'tls-psk': { type: 'string' },
        help: { type: 'boolean', default: false },
      },
    });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const { values, positionals } = parsed;
  if (values.help) return 'help';
  if (positionals.length > 1) throw new UsageError(`expected one FILE, got ${positionals.length}`);
  const file = positionals[0];
  if ((file === undefined) === (values.memory === undefined)) throw new UsageError('give either FILE or --memory SIZE');
  if (values.socket !== undefined && (values.port !== undefined || values.host !== undefined)) {
    throw new UsageError('--socket cannot be combined with --host or --port');
  }
  const tls = (values.tls ?? 'off') as TlsMode;
  if (!tlsModes.includes(tls)) throw new UsageError(`--tls must be one of ${tlsModes.join(', ')}, got ${JSON.stringify(values.tls)}`);
  const certificates = values['tls-certificates'];
  const psk = values['tls-psk'];
  if (tls === 'off' && (certificates !== undefined || psk !== undefined || values['tls-verify-peer'])) {
    throw new UsageError('--tls-certificates, --tls-psk and --tls-verify-peer need --tls on or --tls require');
  }
  if (tls !== 'off' && (certificates === undefined) === (psk === undefined)) {
    throw new UsageError(`--tls ${tls} needs either --tls-certificates DIR or --tls-psk FILE`);
  }
  if (values['tls-verify-peer'] && certificates === undefined) throw new UsageError('--tls-verify-peer needs --tls-certificates');
  let port = DEFAULT_PORT;
  if (values.port !== undefined) {
    if (!/^\d+$/.test(values.port) || Number(values.port) > 65535) throw new UsageError(`invalid port ${JSON.stringify(values.port)}`);
    port = Number(values.port);
  }
  return {
    file,
    memoryBytes: values.memory === undefined ? undefined : memorySize(values.memory),
    host: values.host ?? '127.0.0.1',
    port,
    socket: values.socket,
    name: values.name,
    readOnly: values['read-only'],
    tls,
    tlsCertificates: certificates,
    tlsVerifyPeer: values['tls-verify-peer'],
    tlsPsk: psk,
  };
}

async function tlsCredentials(o: CliOptions): Promise<TlsServerCredentials> {
  if (o.tlsCertificates !== undefined) return { x509: await loadServerX509(o.tlsCertificates, { verifyPeer: o.tlsVerifyPeer }) };
  return { psk: await loadPskFile(o.tlsPsk!) };
}

const logger: Logger = (level, msg, fields) => {
  if (level === 'debug') return;
  process.stderr.write(`nbd-server-js: ${level}: ${msg}${fields ? ` ${JSON.stringify(fields)}` : ''}\n`);
};

async function openDevice(o: CliOptions): Promise<BlockDevice> {
  if (o.memoryBytes !== undefined) {
    const memory = new MemoryDevice(o.memoryBytes);
    return o.readOnly ? new ReadOnlyDevice(memory) : memory;
  }
  return FileDevice.open(o.file!, { readOnly: o.readOnly });
}

/** Runs the CLI; resolves once it is serving (the process then lives until a signal). */
export async function main(argv: string[]): Promise<void> {
  let options: CliOptions | 'help';
  try {
    options = parse(argv);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`nbd-server-js: ${err.message}\n\n${usage}`);
    process.exitCode = 2;
    return;
  }
  if (options === 'help') {
    process.stdout.write(usage);
    return;
  }
  try {
    await serve(options);
  } catch (err) {
    process.stderr.write(`nbd-server-js: ${(err as Error).message}\n`);
    process.exit(1);
  }
}

async function serve(o: CliOptions): Promise<void> {
  const tls = o.tls === 'off' ? undefined : { mode: o.tls, credentials: await tlsCredentials(o) };
  const device = await openDevice(o);
  const server = new NbdServer({ logger, ...(tls !== undefined && { tls }) });
  const name = o.name ?? '';
  server.addExport(name, device, { readOnly: o.readOnly });
  if (name !== '') server.setDefaultExport(name);
  let address;
  try {
    address = await server.listen(o.socket !== undefined ? { path: o.socket } : { host: o.host, port: o.port });
  } catch (err) {
    await device.close();
    throw err;
  }
  let stopping = false;
  const stop = (signal: NodeJS.Signals) => {
    if (stopping) {
      process.stderr.write(`nbd-server-js: ${signal} again, exiting now\n`);
      process.exit(1);
    }
    stopping = true;
    void server
      .close({ graceMs: shutdownGraceMs })
      .then(() => device.close())
      .then(
        () => process.exit(0),
        (err: unknown) => {
          process.stderr.write(`nbd-server-js: shutdown failed: ${(err as Error).message}\n`);
          process.exit(1);
        },
      );
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
  process.stdout.write(`nbd-server-js: serving ${nbdUri(address, name, { tls: o.tls === 'require' })}\n`);
}
