import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { Command, CommanderError, Option } from 'commander';
import { defaultControlListen, defaultDataDir, formatHostPort, logLevels, parseHostPort } from './defaults.js';
import type { ServeFlags } from './config.js';
import { callControl, describeEndpoint, readToken, RefusedError, UnreachableError, UsageError, type ControlEndpoint } from './client.js';
import type { AnyVolumeView, CheckpointResult, PrimaryVolumeView, RecoverResult, ReloadResult, RemoveResult, VolumeView } from './control.js';
import type { Daemon } from './daemon.js';
import { qemuLines } from './qemu.js';

/**
 * `gannet serve` runs the daemon; `gannet status|checkpoint|failover|promote|demote|resolve|volume|reload`
 * talk to it over the control API.
 * Exit status: 0 success, 1 refused by the daemon (or the daemon unreachable, or a failed start),
 * 2 usage or configuration error. Human output goes to stdout, logs (pino, JSON) to stderr.
 */

export const exitOk = 0;
export const exitRefused = 1;
export const exitUsage = 2;
export const readyLine = 'gannet ready';

const version = (createRequire(import.meta.url)('../package.json') as { version: string }).version;

/** The OCF resource agent shipped in the package, beside dist/. */
export const ocfAgentPath = fileURLToPath(new URL('../ocf/volume', import.meta.url));

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
    if (view.error !== undefined && view.state === 'error') {
      lines.push(`volume ${view.name}: error ${view.error.code}, not served: ${view.error.message}`);
      continue;
    }
    if (view.role === 'primary') {
      lines.push(
        `volume ${view.name}: ${formatBytes(view.sizeBytes ?? 0)}, role primary, ${view.state}, ack mode ${view.ackMode}, ` +
          `peer ${view.link?.peer} (link ${view.link?.state}), ${formatBytes(view.dirtyBytes ?? 0)} dirty`,
      );
      for (const uri of view.uris.disk) lines.push(`  export (the PVM's disk): ${uri}`);
      for (const uri of view.uris.secondary ?? []) lines.push(`  export (the same disk, as the secondary it was promoted from): ${uri}`);
      continue;
    }
    lines.push(
      `volume ${view.name}: ${formatBytes(view.sizeBytes ?? 0)}, strategy ${view.strategy}, ${view.state}` +
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
  const reloadConfig = flags.config === undefined ? undefined : () => loadConfig(flags);
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
    daemon = await Daemon.start(config, logger, { reloadConfig });
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
  // The daemon logs what the reload did; a file it refuses changes nothing.
  process.on('SIGHUP', () => {
    if (stopping) return;
    logger.info({ signal: 'SIGHUP' }, 'rereading the config file');
    daemon.reload().catch((error: unknown) => logger.error({ err: error }, 'reload refused'));
  });
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

/** The `volume create` flag of each config field, so a refusal names what the user typed. */
const createFlags: Record<string, string> = {
  sizeBytes: '--size',
  strategy: '--strategy',
  blockBytes: '--block-size',
  memoryBytesMax: '--memory-max',
  pressureRatio: '--pressure-ratio',
  committedBytesMax: '--committed-max',
};

function withFlagNames(error: unknown, flags: Record<string, string>): unknown {
  if (!(error instanceof RefusedError) || error.field === undefined || flags[error.field] === undefined) return error;
  const flag = flags[error.field];
  const message = error.message.startsWith(`${error.field}:`) ? `${flag}${error.message.slice(error.field.length)}` : `${flag}: ${error.message}`;
  return new RefusedError(error.status, error.code, message, error.field);
}

interface ClientFlags {
  control: string;
  controlSocket?: string;
  dataDir: string;
  tokenFile?: string;
}

function endpointOf(flags: ClientFlags): ControlEndpoint {
  if (flags.controlSocket !== undefined) return { path: flags.controlSocket };
  const address = parseHostPort(flags.control);
  if (!address) throw new UsageError(`--control: expected HOST:PORT, got "${flags.control}"`);
  return address;
}

/** Runs one client command, mapping its failure to an exit status. */
type Call = (method: 'GET' | 'POST' | 'DELETE', path: string, body?: unknown) => Promise<unknown>;

async function client(flags: ClientFlags, run: (call: Call) => Promise<void>) {
  try {
    const endpoint = endpointOf(flags);
    const token = await readToken(flags.dataDir, flags.tokenFile);
    await run((method, path, body) => callControl(endpoint, token, method, path, body));
  } catch (error) {
    if (error instanceof UsageError) return fail(error.message, exitUsage);
    if (error instanceof RefusedError) return fail(`refused (${error.status} ${error.code}): ${error.message}`, exitRefused);
    if (error instanceof UnreachableError) return fail(error.message, exitRefused);
    return fail((error as Error).message, exitRefused);
  }
}

const dash = '-';

function stateText(view: AnyVolumeView): string {
  if (view.state === 'error') return `error(${view.error?.code ?? '?'})`;
  if (view.role === 'primary' || view.failoverTarget === undefined) return view.state;
  const phase = view.failover !== undefined && view.failover.phase !== 'done' ? `, ${view.failover.phase}` : '';
  return `${view.state}(${view.failoverTarget}${phase})`;
}

function primaryStatusTable(views: PrimaryVolumeView[]): string {
  const header = ['VOLUME', 'STATE', 'LINK', 'ACK', 'INFLIGHT', 'DIRTY', 'UNSENT', 'RESYNC', 'PEER-EPOCH', 'PEER-DURABLE', 'CLIENTS'];
  const bytes = (n: number | undefined) => (n === undefined ? dash : formatBytes(n));
  const number = (n: number | null | undefined) => (n === undefined || n === null ? dash : String(n));
  const resync = (view: PrimaryVolumeView) =>
    view.resync === undefined
      ? dash
      : `${formatBytes(view.resync.bytesDone)}/${formatBytes(view.resync.bytesTotal)} at ${formatBytes(view.resync.bytesPerSecond)}/s`;
  const rows = views.map((view) => [
    view.name,
    stateText(view),
    view.link?.state ?? dash,
    view.ackMode ?? dash,
    bytes(view.inflightBytes),
    bytes(view.dirtyBytes),
    bytes(view.unsentBytes),
    resync(view),
    number(view.peerEpoch),
    number(view.peerDurableEpoch),
    number(view.clients),
  ]);
  const widths = header.map((title, column) => Math.max(title.length, ...rows.map((row) => row[column].length)));
  const table = [header, ...rows].map((row) => row.map((cell, column) => cell.padEnd(widths[column])).join('  ').trimEnd());
  for (const view of views) {
    if (view.error !== undefined) table.push(`${view.name}: error ${view.error.code} since ${view.error.since}: ${view.error.message}`);
    if (view.link?.error !== undefined && view.link.state !== 'up') table.push(`${view.name}: link to ${view.link.peer} ${view.link.state} since ${view.link.since}: ${view.link.error}`);
  }
  return table.join('\n');
}

/** A table of the secondary volumes, then one of the primary volumes (their columns differ). */
function statusTable(all: AnyVolumeView[]): string {
  const primaries = all.filter((view): view is PrimaryVolumeView => view.role === 'primary');
  const secondaries = all.filter((view): view is VolumeView => view.role !== 'primary');
  const tables: string[] = [];
  if (secondaries.length > 0 || primaries.length === 0) tables.push(secondaryStatusTable(secondaries));
  if (primaries.length > 0) tables.push(primaryStatusTable(primaries));
  return tables.join('\n\n');
}

function secondaryStatusTable(views: VolumeView[]): string {
  const header = ['VOLUME', 'STRATEGY', 'STATE', 'EPOCH', 'DURABLE', 'PRIMARY', 'SECONDARY', 'COMMITTED', 'SPILLED', 'TORN', 'CLIENTS'];
  const bytes = (n: number | undefined) => (n === undefined ? dash : formatBytes(n));
  const number = (n: number | undefined) => (n === undefined ? dash : String(n));
  const rows = views.map((view) => [
    view.name,
    view.strategy,
    stateText(view),
    number(view.epoch),
    number(view.durableEpoch),
    bytes(view.bufferedBytes?.primary),
    bytes(view.bufferedBytes?.secondary),
    bytes(view.bufferedBytes?.committed),
    bytes(view.spilledBytes),
    number(view.tornRanges?.length),
    number(view.clients),
  ]);
  const widths = header.map((title, column) => Math.max(title.length, ...rows.map((row) => row[column].length)));
  const table = [header, ...rows].map((row) => row.map((cell, column) => cell.padEnd(widths[column])).join('  ').trimEnd());
  // What an operator must read in full: errors, a failover under way or lost.
  for (const view of views) {
    if (view.error !== undefined) table.push(`${view.name}: error ${view.error.code} since ${view.error.since}: ${view.error.message}`);
    if (view.lostFailover !== undefined) {
      table.push(`${view.name}: a failover to ${view.lostFailover.target} requested at ${view.lostFailover.requestedAt} was lost (the volume is at its checkpoint)`);
    }
  }
  return table.join('\n');
}

function addClientOptions(command: Command): Command {
  return command
    .option('--control <HOST:PORT>', 'control API address of the daemon', defaultControlListen)
    .option('--control-socket <PATH>', 'control API Unix socket of the daemon (instead of --control)')
    .option('--data-dir <DIR>', "the daemon's data directory, where control.token is", defaultDataDir)
    .option('--token-file <FILE>', "the daemon's control token, instead of DATA_DIR/control.token");
}

/**
 * The primary role's per-volume settings are config-file keys (volumes.NAME.KEY); their defaults are
 * core's, written out so that `serve --help` shows what runs when they are left out. config.ts loads
 * the engine, which the client commands do without, so only `serve` passes them in.
 */
function primaryHelp(primaryDefaults: PrimaryDefaults): string {
  return [
    '',
    'Role primary: per-volume settings in the config file (volumes.NAME.KEY), with their defaults:',
    `  ackMode                  ${primaryDefaults.ackMode.padEnd(8)} peer: a write is acknowledged once local and in the peer's buffer; local: once local`,
    `  forwardBytesMax          ${formatBytes(primaryDefaults.forwardBytesMax).padEnd(8)} ack mode local: bytes forwarded, not yet acknowledged, before writes wait`,
    `  peerTimeoutMs            ${String(primaryDefaults.peerTimeoutMs).padEnd(8)} a peer silent this long is hung: the link drops, the volume goes degraded`,
    `  peerReconnectMs          ${String(primaryDefaults.peerReconnectMs).padEnd(8)} first wait before reconnecting, doubling up to peerReconnectMsMax`,
    `  peerReconnectMsMax       ${String(primaryDefaults.peerReconnectMsMax).padEnd(8)}`,
    `  resyncBytesPerSecondMax  ${formatBytes(primaryDefaults.resyncBytesPerSecondMax).padEnd(8)} resync rate limit (the VM's own writes are not counted)`,
    `  resyncCheckpointBytes    ${formatBytes(primaryDefaults.resyncCheckpointBytes).padEnd(8)} a resync checkpoints the peer after this much`,
    `  activityExtentsMax       ${String(primaryDefaults.activityExtentsMax).padEnd(8)} 4 MiB extents a resync after a crash of the primary resends at most`,
    'See fixtures/config/gannet-primary.yaml.',
  ].join('\n');
}

type PrimaryDefaults = typeof import('./config.js').primaryDefaults;

export function buildProgram(primaryDefaults?: PrimaryDefaults): Command {
  const program = new Command('gannet')
    .description('Replicated block storage for VM fault tolerance (GANNET), served over NBD')
    .version(version)
    .exitOverride()
    .showHelpAfterError('(see --help)');

  program
    .command('serve')
    .description(
      'run the daemon: per volume, NBD exports NAME/primary and NAME/secondary (a secondary volume), or NAME replicated to the ' +
        'secondary daemon given by --peer (a primary volume; --role is the role of the volumes it creates); and the control API',
    )
    .option('--config <FILE>', 'YAML or JSON config file (flags override it)')
    .addOption(new Option('--role <ROLE>', 'secondary: the GANNET buffer; primary: the PVM host, forwarding to --peer (default: secondary)').choices(['secondary', 'primary']))
    .option('--peer <HOST:PORT>', "the peer (secondary) daemon's control API, for primary volumes (required with --role primary; with role secondary, for volumes promoted later)")
    .option('--peer-token-file <FILE>', "a copy of the peer's DATA_DIR/control.token (required with --peer; reread at each promote)")
    .option('--peer-tls-certificates <DIR>', "a peer requiring NBD TLS: DIR/ca-cert.pem (+ client-cert.pem, client-key.pem)")
    .option('--peer-tls-psk <FILE>', 'a peer requiring NBD TLS: pre-shared keys (psktool), its first identity')
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
    .addHelpText('after', primaryDefaults === undefined ? '' : primaryHelp(primaryDefaults))
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
        ? ((await call('GET', '/v1/volumes')) as { volumes: AnyVolumeView[] }).volumes
        : [(await call('GET', `/v1/volumes/${encodeURIComponent(name)}`)) as AnyVolumeView];
      if (flags.json) process.stdout.write(`${JSON.stringify(name === undefined ? { volumes: views } : views[0], null, 2)}\n`);
      else process.stdout.write(`${statusTable(views)}\n`);
    }),
  );

  addClientOptions(
    program
      .command('checkpoint')
      .description('checkpoint volumes atomically as one group: the named volumes and groups, or every replicating volume when none is named')
      .argument('[NAME...]', 'volumes or consistency groups to checkpoint together'),
  ).action((names: string[], flags: ClientFlags) =>
    client(flags, async (call) => {
      const body = names.length === 0 ? {} : { volumes: names };
      const result = (await call('POST', '/v1/checkpoint', body)) as CheckpointResult;
      for (const { name, epoch } of result.volumes) process.stdout.write(`${name}: epoch ${epoch}\n`);
      for (const { name, reason } of result.skipped ?? []) process.stdout.write(`${name}: skipped: ${reason}\n`);
    }),
  );

  addClientOptions(
    program
      .command('failover')
      .description('fail a volume over: keep the secondary (COLO), roll back to the checkpoint (Remus), or keep the primary (rRVM)')
      .argument('<NAME>', 'volume')
      .addOption(new Option('--to <TARGET>', 'which side becomes the disk').choices(['secondary', 'checkpoint', 'primary']).default('secondary'))
      .option('--force', 'fail over although an interrupted flush left torn ranges (the disk then mixes epochs there)', false),
  ).action((name: string, flags: ClientFlags & { to: string; force: boolean }) =>
    client(flags, async (call) => {
      const view = (await call('POST', `/v1/volumes/${encodeURIComponent(name)}/failover`, { to: flags.to, force: flags.force })) as VolumeView;
      process.stdout.write(`${view.name}: failed over to ${flags.to}; ${view.exports.secondary} is now the disk (state ${view.state}, epoch ${view.epoch})\n`);
    }),
  );

  addClientOptions(
    program
      .command('promote')
      .description(
        'make a secondary volume the primary: fail it over to the secondary view if not yet, then serve it in the primary role ' +
          '(its VM stays connected to NAME/secondary; NAME is served too) and resync the peer; a primary volume is left as it is',
      )
      .argument('<NAME>', 'volume')
      .option('--peer <HOST:PORT>', "the new secondary daemon's control API (default: the daemon's --peer); its token is read from the daemon's --peer-token-file")
      .option('--force', 'fail over although the disk is half-synced or has torn ranges', false),
  ).action((name: string, flags: ClientFlags & { peer?: string; force: boolean }) =>
    client(flags, async (call) => {
      const body = { force: flags.force, ...(flags.peer !== undefined && { peer: flags.peer }) };
      const view = (await call('POST', `/v1/volumes/${encodeURIComponent(name)}/promote`, body)) as AnyVolumeView;
      process.stdout.write(`${view.name}: role ${view.role}, ${view.state}${view.role === 'primary' && view.link !== undefined ? `, peer ${view.link.peer}` : ''}\n`);
    }),
  );

  addClientOptions(
    program
      .command('demote')
      .description('make a primary volume a secondary one, waiting for a primary to attach (refused while NBD clients use it, unless --force); a secondary volume is left as it is')
      .argument('<NAME>', 'volume')
      .option('--force', 'disconnect the NBD clients of the volume', false),
  ).action((name: string, flags: ClientFlags & { force: boolean }) =>
    client(flags, async (call) => {
      const view = (await call('POST', `/v1/volumes/${encodeURIComponent(name)}/demote`, { force: flags.force })) as AnyVolumeView;
      process.stdout.write(`${view.name}: role ${view.role}, ${view.state}\n`);
    }),
  );

  addClientOptions(
    program
      .command('resolve')
      .description("end a split brain: this side's changes since the split are dropped (its NBD clients are disconnected) and the peer's disk wins")
      .argument('<NAME>', 'volume')
      .option('--discard-local', "drop this side's changes (required: the only resolution)", false),
  ).action((name: string, flags: ClientFlags & { discardLocal: boolean }) =>
    client(flags, async (call) => {
      if (!flags.discardLocal) throw new UsageError('resolve: --discard-local is required (this side\'s changes since the split are dropped)');
      const view = (await call('POST', `/v1/volumes/${encodeURIComponent(name)}/resolve`, { discardLocal: true })) as AnyVolumeView;
      process.stdout.write(`${view.name}: role ${view.role}, ${view.state}\n`);
    }),
  );

  const volume = program.command('volume').description('create, delete or recover a volume while the daemon runs');
  addClientOptions(
    volume
      .command('create')
      .description('create a volume (created sparse) and serve its exports at once')
      .argument('<NAME>', 'volume name')
      .requiredOption('--size <SIZE>', 'size, e.g. 20G')
      .addOption(new Option('--strategy <STRATEGY>', 'gannet, or a benchmark baseline').choices(['gannet', 'colo', 'passthrough']))
      .option('--block-size <SIZE>', 'block size, a power of two from 512 to 1M (default 4K)')
      .option('--memory-max <SIZE>', 'buffered bytes kept in memory before cold blocks spill to disk')
      .option('--pressure-ratio <RATIO>', "fraction of --memory-max at which a 'pressure' event asks for an early checkpoint")
      .option('--committed-max <SIZE>', 'committed bytes not yet flushed before writes wait'),
  ).action(
    (
      name: string,
      flags: ClientFlags & { size: string; strategy?: string; blockSize?: string; memoryMax?: string; pressureRatio?: string; committedMax?: string },
    ) =>
      client(flags, async (call) => {
        const ratio = flags.pressureRatio === undefined ? undefined : Number(flags.pressureRatio);
        const body = {
          name,
          sizeBytes: flags.size,
          ...(flags.strategy !== undefined && { strategy: flags.strategy }),
          ...(flags.blockSize !== undefined && { blockBytes: flags.blockSize }),
          ...(flags.memoryMax !== undefined && { memoryBytesMax: flags.memoryMax }),
          // Sent as given when it is not a number, so the daemon names the field.
          ...(flags.pressureRatio !== undefined && { pressureRatio: Number.isFinite(ratio) ? ratio : flags.pressureRatio }),
          ...(flags.committedMax !== undefined && { committedBytesMax: flags.committedMax }),
        };
        const view = (await call('POST', '/v1/volumes', body).catch((error: unknown) => {
          throw withFlagNames(error, createFlags);
        })) as VolumeView;
        process.stdout.write(`${view.name}: created, ${formatBytes(view.sizeBytes ?? 0)}, strategy ${view.strategy}\n`);
        for (const uri of [...view.uris.primary, ...view.uris.secondary]) process.stdout.write(`  ${uri}\n`);
      }),
  );

  addClientOptions(
    volume
      .command('delete')
      .description("stop serving a volume and move its directory to DATA_DIR/deleted (refused while a client is connected or committed data is not yet flushed, unless --force)")
      .argument('<NAME>', 'volume name')
      .option('--force', 'close the connected clients and drop what is not yet flushed', false)
      .option('--purge', 'delete the directory instead of keeping it', false),
  ).action((name: string, flags: ClientFlags & { force: boolean; purge: boolean }) =>
    client(flags, async (call) => {
      const query = new URLSearchParams({ force: String(flags.force), purge: String(flags.purge) });
      const result = (await call('DELETE', `/v1/volumes/${encodeURIComponent(name)}?${query}`)) as RemoveResult;
      const where = result.purged ? 'purged' : result.movedTo !== undefined ? `moved to ${result.movedTo}` : 'had no directory';
      process.stdout.write(`${result.name}: deleted, ${where}\n`);
      if (result.closeError !== undefined) process.stdout.write(`${result.name}: closing it failed: ${result.closeError}\n`);
    }),
  );

  addClientOptions(
    volume
      .command('recover')
      .description('rebuild the lost or damaged metadata of a volume in error (EMETA) from its state file, then serve it (see README: when it is safe)')
      .argument('<NAME>', 'volume name'),
  ).action((name: string, flags: ClientFlags) =>
    client(flags, async (call) => {
      const result = (await call('POST', `/v1/volumes/${encodeURIComponent(name)}/recover`)) as RecoverResult;
      const { lifecycle, movedTo, fullResync } = result.recovered;
      process.stdout.write(`${name}: recovered as ${lifecycle}, now ${stateText(result.volume)}\n`);
      if (movedTo !== null) process.stdout.write(`${name}: the damaged metadata store was moved to ${movedTo}\n`);
      if (fullResync) process.stdout.write(`${name}: the whole disk needs a resync from the primary (it is torn until then)\n`);
    }),
  );

  addClientOptions(
    program.command('reload').description('make the daemon reread its config file (as SIGHUP does) and print what changed'),
  ).action((flags: ClientFlags) =>
    client(flags, async (call) => {
      const result = (await call('POST', '/v1/reload')) as ReloadResult;
      const line = (label: string, items: string[]) => process.stdout.write(`${label}: ${items.length === 0 ? 'none' : items.join(', ')}\n`);
      line('added', result.added);
      line('failed', result.failed.map(({ name, code, message }) => `${name} (${code}: ${message})`));
      line('not in the config file (kept)', result.notInConfig);
      line('applied', result.applied);
      line('needs a restart', result.restartNeeded);
    }),
  );

  program
    .command('ocf-path')
    .description("print the path of the Pacemaker resource agent ocf:gannet:volume (install it as /usr/lib/ocf/resource.d/gannet/volume)")
    .action(() => {
      process.stdout.write(`${ocfAgentPath}\n`);
    });

  return program;
}

export async function main(argv: string[]): Promise<void> {
  const program = buildProgram(argv[0] === 'serve' ? (await import('./config.js')).primaryDefaults : undefined);
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
