import { createRequire } from 'node:module';
import { Command, CommanderError, Option } from 'commander';
import { defaultControlListen, defaultDataDir, formatHostPort, logLevels, parseHostPort } from './defaults.js';
import type { ServeFlags } from './config.js';
import { callControl, describeEndpoint, readToken, RefusedError, UnreachableError, UsageError, type ControlEndpoint } from './client.js';
import type { VolumeView } from './control.js';
import type { Daemon } from './daemon.js';
import { qemuLines } from './qemu.js';

/**
 * `gannet serve` runs the daemon; `gannet status|checkpoint|failover` talk to it over the control API.
 * Exit status: 0 success, 1 refused by the daemon (or the daemon unreachable, or a failed start),
 * 2 usage or configuration error. Human output goes to stdout, logs (pino, JSON) to stderr.
 */

export const exitOk = 0;
export const exitRefused = 1;
export const exitUsage = 2;
export const readyLine = 'gannet ready';

const version = (createRequire(import.meta.url)('../package.json') as { version: string }).version;

function fail(message: string, code: number): void {
  process.stderr.write(`gannet: ${message}\n`);
  process.exitCode = code;
}

const collect = (value: string, previous: string[] | undefined) => [...(previous ?? []), value];

function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${Number.isInteger(value) ? value : value.toFixed(1)} ${units[unit]}`;
}

function describeAddress(address: { host: string; port: number } | { path: string }): string {
  return 'path' in address ? `unix:${address.path}` : formatHostPort(address);
}

/** Everything printed on startup; tests parse the `nbd:` and `control:` lines and wait for `gannet ready`. */
export function startupLines(daemon: Daemon): string[] {
  const lines = [`gannet ${version}: ${daemon.volumeNames.length} volume(s) in ${daemon.config.dataDir}`];
  for (const address of daemon.nbdAddresses) lines.push(`nbd: ${describeAddress(address)}`);
  for (const address of daemon.controlAddresses) {
    lines.push(`control: ${describeEndpoint(address)} (bearer token in ${daemon.tokenFile})`);
  }
  for (const view of daemon.volumes()) {
    lines.push('');
    lines.push(
      `volume ${view.name}: ${formatBytes(view.sizeBytes)}, strategy ${view.strategy}, ${view.state}` +
        `${view.failoverTarget !== undefined ? ` (to ${view.failoverTarget})` : ''}, epoch ${view.epoch} (durable ${view.durableEpoch})`,
    );
    for (const uri of view.uris.primary) lines.push(`  primary export:   ${uri}`);
    for (const uri of view.uris.secondary) lines.push(`  secondary export: ${uri}`);
    for (const address of daemon.nbdAddresses) {
      const qemu = qemuLines(view.name, address);
      lines.push(
        `  primary QEMU (PVM) via ${describeAddress(address)}: quorum disk, then on its QMP monitor once the secondary is up` +
          ' (the last command starts replication; under COLO its migration does that instead):',
      );
      lines.push(`    ${qemu.primaryDrive}`);
      for (const command of qemu.primaryQmp) lines.push(`    ${command}`);
      lines.push(`  secondary QEMU (SVM) disk via ${describeAddress(address)}:`);
      lines.push(`    ${qemu.secondaryDrive}`);
    }
  }
  return lines;
}

async function serve(flags: ServeFlags): Promise<void> {
  const { ConfigError, loadConfig } = await import('./config.js');
  const { default: pino } = await import('pino');
  let config;
  try {
    config = await loadConfig(flags);
  } catch (error) {
    if (error instanceof ConfigError) return fail(`invalid configuration: ${error.message}`, exitUsage);
    throw error;
  }
  const logger = pino(
    { level: config.logLevel, base: { pid: process.pid }, timestamp: pino.stdTimeFunctions.isoTime },
    pino.destination({ fd: 2, sync: true }),
  );
  const { Daemon } = await import('./daemon.js');
  let daemon: Daemon;
  try {
    daemon = await Daemon.start(config, logger);
  } catch (error) {
    // The engine's EOPTIONS/EMISMATCH: options it refuses, or files on disk that contradict them.
    const code = (error as { code?: unknown }).code;
    if (error instanceof ConfigError || code === 'EOPTIONS' || code === 'EMISMATCH') {
      fail(`invalid configuration: ${(error as Error).message}`, exitUsage);
      process.exit(exitUsage);
    }
    logger.fatal({ err: error }, 'start failed');
    fail(`start failed: ${(error as Error).message}`, exitRefused);
    process.exit(exitRefused);
  }
  let stopping = false;
  const stop = (exitCode: number) => {
    stopping = true;
    daemon.close().then(
      () => {
        logger.info('stopped');
        process.exit(exitCode);
      },
      (error: unknown) => {
        logger.fatal({ err: error }, 'shutdown failed');
        process.exit(exitRefused);
      },
    );
  };
  const onSignal = (signal: NodeJS.Signals) => {
    if (stopping) {
      logger.warn({ signal }, 'second signal: exiting at once');
      process.exit(exitRefused);
    }
    logger.info({ signal }, 'stopping: draining requests, finishing committed flushes');
    stop(exitOk);
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  // A daemon nobody can checkpoint or fail over is stopped cleanly, with an error status for its supervisor.
  void daemon.failed.then((error) => {
    if (stopping) return;
    logger.fatal({ err: error }, 'the control API is down: stopping');
    stop(exitRefused);
  });
  process.stdout.write(`${[...startupLines(daemon), readyLine].join('\n')}\n`);
  logger.info(
    { nbd: daemon.nbdAddresses, control: daemon.controlAddresses, volumes: daemon.volumeNames },
    readyLine,
  );
}

interface ClientFlags {
  control: string;
  controlSocket?: string;
  dataDir: string;
}

function endpointOf(flags: ClientFlags): ControlEndpoint {
  if (flags.controlSocket !== undefined) return { path: flags.controlSocket };
  const address = parseHostPort(flags.control);
  if (!address) throw new UsageError(`--control: expected HOST:PORT, got "${flags.control}"`);
  return address;
}

/** Runs one client command, mapping its failure to an exit status. */
async function client(flags: ClientFlags, run: (call: (method: 'GET' | 'POST', path: string, body?: unknown) => Promise<unknown>) => Promise<void>) {
  try {
    const endpoint = endpointOf(flags);
    const token = await readToken(flags.dataDir);
    await run((method, path, body) => callControl(endpoint, token, method, path, body));
  } catch (error) {
    if (error instanceof UsageError) return fail(error.message, exitUsage);
    if (error instanceof RefusedError) return fail(`refused (${error.status} ${error.code}): ${error.message}`, exitRefused);
    if (error instanceof UnreachableError) return fail(error.message, exitRefused);
    return fail((error as Error).message, exitRefused);
  }
}

function statusTable(views: VolumeView[]): string {
  const header = ['VOLUME', 'STRATEGY', 'STATE', 'EPOCH', 'DURABLE', 'PRIMARY', 'SECONDARY', 'COMMITTED', 'SPILLED', 'TORN'];
  const rows = views.map((view) => [
    view.name,
    view.strategy,
    view.state + (view.failoverTarget !== undefined ? `(${view.failoverTarget})` : ''),
    String(view.epoch),
    String(view.durableEpoch),
    formatBytes(view.bufferedBytes.primary),
    formatBytes(view.bufferedBytes.secondary),
    formatBytes(view.bufferedBytes.committed),
    formatBytes(view.spilledBytes),
    String(view.tornRanges.length),
  ]);
  const widths = header.map((title, column) => Math.max(title.length, ...rows.map((row) => row[column].length)));
  return [header, ...rows].map((row) => row.map((cell, column) => cell.padEnd(widths[column])).join('  ').trimEnd()).join('\n');
}

function addClientOptions(command: Command): Command {
  return command
    .option('--control <HOST:PORT>', 'control API address of the daemon', defaultControlListen)
    .option('--control-socket <PATH>', 'control API Unix socket of the daemon (instead of --control)')
    .option('--data-dir <DIR>', "the daemon's data directory, where control.token is", defaultDataDir);
}

export function buildProgram(): Command {
  const program = new Command('gannet')
    .description('Replicated block storage for VM fault tolerance (GANNET), served over NBD')
    .version(version)
    .exitOverride()
    .showHelpAfterError('(see --help)');

  program
    .command('serve')
    .description('run the daemon: NBD exports NAME/primary and NAME/secondary per volume, and the control API')
    .option('--config <FILE>', 'YAML or JSON config file (flags override it)')
    .option('--data-dir <DIR>', `volumes, metadata and control.token (default: ${defaultDataDir})`)
    .option('--nbd <HOST:PORT>', 'NBD listen address, port 0 for a free port (default: 127.0.0.1:10809)')
    .option('--nbd-socket <PATH>', 'also serve NBD on this Unix socket')
    .option('--control <HOST:PORT>', `control API listen address (default: ${defaultControlListen})`)
    .option('--control-socket <PATH>', 'also serve the control API on this Unix socket')
    .addOption(new Option('--log-level <LEVEL>', 'log level (default: info)').choices(logLevels))
    .option('--volume <NAME[:SIZE]>', 'serve this volume, created sparse if new (repeatable; default: vol0:1G)', collect)
    .option('--nbd-memory-max <SIZE>', 'memory for NBD payloads and unsent replies, all connections together (default: 256M)')
    .option('--nbd-stall-timeout-ms <MS>', 'drop a client that holds NBD memory without moving it for this long (default: 30000)')
    .option('--nbd-connections-max <N>', 'NBD connections open at once; more are refused (default: 1024)')
    .option('--nbd-export-connections-max <N>', 'NBD connections per export (default: 128)')
    .option('--nbd-handshake-timeout-ms <MS>', 'drop an NBD client that has not finished its handshake after this long (default: 10000)')
    .option('--control-connections-max <N>', 'control API connections open at once, per listener (default: 128)')
    .addOption(new Option('--tls <MODE>', 'NBD over TLS: on lets clients use it, require refuses clients without it (default: off)').choices(['off', 'on', 'require']))
    .option('--tls-certificates <DIR>', 'X.509 credentials: DIR/server-cert.pem, DIR/server-key.pem, DIR/ca-cert.pem')
    .option('--tls-verify-peer', 'require client certificates signed by DIR/ca-cert.pem')
    .option('--tls-psk <FILE>', 'pre-shared keys instead of certificates, identity:hexkey per line (psktool)')
    .action((flags: ServeFlags) => serve(flags));

  addClientOptions(
    program
      .command('status')
      .description('show volumes: state, epochs, buffered bytes')
      .argument('[NAME]', 'one volume')
      .option('--json', 'print the API response as JSON'),
  ).action((name: string | undefined, flags: ClientFlags & { json?: boolean }) =>
    client(flags, async (call) => {
      const views = name === undefined
        ? ((await call('GET', '/v1/volumes')) as { volumes: VolumeView[] }).volumes
        : [(await call('GET', `/v1/volumes/${encodeURIComponent(name)}`)) as VolumeView];
      if (flags.json) process.stdout.write(`${JSON.stringify(name === undefined ? { volumes: views } : views[0], null, 2)}\n`);
      else process.stdout.write(`${statusTable(views)}\n`);
    }),
  );

  addClientOptions(
    program
      .command('checkpoint')
      .description('checkpoint volumes atomically as one group (all volumes when none are named)')
      .argument('[NAME...]', 'volumes to checkpoint together'),
  ).action((names: string[], flags: ClientFlags) =>
    client(flags, async (call) => {
      const body = names.length === 0 ? {} : { volumes: names };
      const result = (await call('POST', '/v1/checkpoint', body)) as { volumes: { name: string; epoch: number }[] };
      for (const { name, epoch } of result.volumes) process.stdout.write(`${name}: epoch ${epoch}\n`);
    }),
  );

  addClientOptions(
    program
      .command('failover')
      .description('fail a volume over: keep the secondary (COLO), roll back to the checkpoint (Remus), or keep the primary (rRVM)')
      .argument('<NAME>', 'volume')
      .addOption(new Option('--to <TARGET>', 'which side becomes the disk').choices(['secondary', 'checkpoint', 'primary']).default('secondary')),
  ).action((name: string, flags: ClientFlags & { to: string }) =>
    client(flags, async (call) => {
      const view = (await call('POST', `/v1/volumes/${encodeURIComponent(name)}/failover`, { to: flags.to })) as VolumeView;
      process.stdout.write(`${view.name}: failed over to ${flags.to}; ${view.exports.secondary} is now the disk (state ${view.state}, epoch ${view.epoch})\n`);
    }),
  );

  return program;
}

export async function main(argv: string[]): Promise<void> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv, { from: 'user' });
  } catch (error) {
    if (error instanceof CommanderError) {
      const ok = error.code === 'commander.helpDisplayed' || error.code === 'commander.version';
      process.exitCode = ok ? exitOk : exitUsage;
      return;
    }
    process.stderr.write(`gannet: ${(error as Error).stack ?? String(error)}\n`);
    process.exitCode = exitRefused;
  }
}
