/**
 * Goal: NBD over TLS works with the clients VMs and operators use (libnbd's nbdinfo, QEMU's qemu-img and
 * qemu-io), against both the nbd-server-js CLI and the gannet daemon, with X.509 certificates and with
 * pre-shared keys; plain clients are refused when TLS is required, and a wrong key or an untrusted
 * certificate fails the handshake (issue 11, item 5).
 * Method: credentials made by certtool and psktool for this file (helpers/pki.ts). Servers are started
 * as processes (stopped by pid); clients run to completion and are judged by exit status and output:
 * qemu-io exits non-zero on a failed open or a pattern mismatch, nbdinfo on a failed connection.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { gannet, startDaemon, stopAll, type DaemonHandle } from './helpers/daemon.js';
import { startNbdCli } from './helpers/nbd-cli.js';
import { makePki, pskIdentity, type Pki } from './helpers/pki.js';
import { describeResult, makeTmpDir, removeTmpDirs, requireTool, runCommand, stopAllProcesses, type CommandResult } from './helpers/process.js';

let pki: Pki;

beforeAll(async () => {
  requireTool('nbdinfo');
  requireTool('qemu-io');
  requireTool('qemu-img');
  pki = await makePki();
});
afterEach(async () => {
  await stopAllProcesses();
  await stopAll();
});
afterAll(removeTmpDirs);

interface Target {
  readonly host: string;
  readonly port: number;
  readonly exportName: string;
}

type Credentials = { kind: 'x509'; dir: string } | { kind: 'psk'; file: string; dir: string };

const x509 = (dir: string): Credentials => ({ kind: 'x509', dir });
const psk = (file: string, dir: string): Credentials => ({ kind: 'psk', file, dir });

/** `nbdinfo` on the export, over TLS with `creds` (libnbd's nbds URI parameters) or in plaintext. */
function nbdinfo(t: Target, creds?: Credentials): Promise<CommandResult> {
  const path = encodeURIComponent(t.exportName);
  if (creds === undefined) return runCommand('nbdinfo', [`nbd://${t.host}:${t.port}/${path}`]);
  const query = creds.kind === 'x509' ? `tls-certificates=${creds.dir}` : `tls-psk-file=${creds.file}`;
  const user = creds.kind === 'psk' ? `${pskIdentity}@` : '';
  return runCommand('nbdinfo', [`nbds://${user}${t.host}:${t.port}/${path}?${query}`]);
}

/** QEMU's --object and --image-opts for the export; tls-creds-x509 reads DIR/ca-cert.pem (+ client-cert.pem). */
function qemuTarget(t: Target, creds?: Credentials): string[] {
  const image = `driver=nbd,host=${t.host},port=${t.port},export=${t.exportName}`;
  if (creds === undefined) return ['--image-opts', image];
  const object = creds.kind === 'x509'
    ? `tls-creds-x509,id=tls0,endpoint=client,dir=${creds.dir}`
    : `tls-creds-psk,id=tls0,endpoint=client,dir=${creds.dir},username=${pskIdentity}`;
  return ['--object', object, '--image-opts', `${image},tls-creds=tls0`];
}

function qemuIo(t: Target, creds: Credentials | undefined, commands: string[]): Promise<CommandResult> {
  return runCommand('qemu-io', [...qemuTarget(t, creds), ...commands.flatMap((c) => ['-c', c])]);
}

async function expectServed(t: Target, creds: Credentials, pattern: number): Promise<void> {
  const info = await nbdinfo(t, creds);
  expect(info.status, describeResult('nbdinfo', info)).toBe(0);
  expect(info.stdout).toMatch(/with TLS/);
  const p = `0x${pattern.toString(16)}`;
  const io = await qemuIo(t, creds, [`write -P ${p} 0 1M`, `read -P ${p} 0 1M`, 'flush']);
  expect(io.status, describeResult('qemu-io', io)).toBe(0);
  expect(io.stdout).not.toMatch(/Pattern verification failed|failed/);
  const img = await runCommand('qemu-img', ['info', ...qemuTarget(t, creds)]);
  expect(img.status, describeResult('qemu-img info', img)).toBe(0);
  expect(img.stdout).toMatch(/virtual size/);
}

async function expectRefused(t: Target, creds?: Credentials): Promise<void> {
  const info = await nbdinfo(t, creds);
  expect(info.status, describeResult('nbdinfo', info)).not.toBe(0);
  const io = await qemuIo(t, creds, ['read 0 4k']);
  expect(io.status, describeResult('qemu-io', io)).not.toBe(0);
  expect(io.stdout).not.toMatch(/^read \d+/m);
}

function cliTarget(cli: { address: unknown; exportName: string }): Target {
  const a = cli.address as { host: string; port: number };
  return { host: a.host, port: a.port, exportName: cli.exportName };
}

describe('nbd-server-js CLI with TLS required', () => {
  it('X.509: nbdinfo, qemu-io and qemu-img are served over TLS; plain clients and an untrusted CA are refused', async () => {
    const cli = await startNbdCli({ memory: '64M', name: 'disk', args: ['--tls', 'require', '--tls-certificates', pki.serverDir] });
    expect(cli.uri).toMatch(/^nbds:\/\//);
    const t = cliTarget(cli);
    await expectServed(t, x509(pki.anonymousDir), 0x5a);
    await expectRefused(t);
    await expectRefused(t, x509(pki.wrongCaDir));
  });

  it('X.509 with client certificates: a certificate from our CA gets in, none or a stranger one does not', async () => {
    const cli = await startNbdCli({ memory: '64M', name: 'disk', args: ['--tls', 'require', '--tls-certificates', pki.serverDir, '--tls-verify-peer'] });
    const t = cliTarget(cli);
    await expectServed(t, x509(pki.clientDir), 0x6b);
    await expectRefused(t, x509(pki.anonymousDir));
    await expectRefused(t, x509(pki.strangerDir));
  });

  it('PSK: the right key is served; a wrong key fails the handshake; plain clients are refused', async () => {
    const cli = await startNbdCli({ memory: '64M', name: 'disk', args: ['--tls', 'require', '--tls-psk', pki.pskFile] });
    const t = cliTarget(cli);
    await expectServed(t, psk(pki.pskFile, pki.pskDir), 0x7c);
    await expectRefused(t, psk(pki.wrongPskFile, pki.wrongPskDir));
    await expectRefused(t);
  });

  it("TLS 'on': plain and TLS clients are both served", async () => {
    const cli = await startNbdCli({ memory: '64M', name: 'disk', args: ['--tls', 'on', '--tls-psk', pki.pskFile] });
    expect(cli.uri).toMatch(/^nbd:\/\//);
    const t = cliTarget(cli);
    await expectServed(t, psk(pki.pskFile, pki.pskDir), 0x11);
    const plain = await qemuIo(t, undefined, ['read -P 0x11 0 1M']);
    expect(plain.status, describeResult('qemu-io', plain)).toBe(0);
  });
});

function daemonTarget(daemon: DaemonHandle, exportName: string): Target {
  return { host: daemon.nbd.host, port: daemon.nbd.port, exportName };
}

describe('gannet daemon with TLS', () => {
  it('--tls require with certificates: both exports over TLS only, nbds URIs printed, data kept across a checkpoint', async () => {
    const daemon = await startDaemon({ args: ['--tls', 'require', '--tls-certificates', pki.serverDir] });
    expect(daemon.stdoutLines.filter((line) => /export:/.test(line)).every((line) => /nbds:\/\//.test(line))).toBe(true);
    const primary = daemonTarget(daemon, 'vol0/primary');
    const secondary = daemonTarget(daemon, 'vol0/secondary');
    await expectServed(primary, x509(pki.anonymousDir), 0x21);
    await expectServed(secondary, x509(pki.anonymousDir), 0x22);
    await expectRefused(primary);
    await expectRefused(secondary);
    const checkpoint = await gannet(['checkpoint', '--control', `${daemon.control.host}:${daemon.control.port}`, '--data-dir', daemon.dataDir]);
    expect(checkpoint.status, checkpoint.stderr).toBe(0);
    const after = await qemuIo(secondary, x509(pki.anonymousDir), ['read -P 0x21 0 1M']);
    expect(after.status, describeResult('qemu-io', after)).toBe(0);
  });

  it('TLS from the config file, with PSK; a wrong key is refused', async () => {
    const dir = await makeTmpDir();
    const config = join(dir, 'gannet.yaml');
    await writeFile(config, `nbd:\n  tls:\n    mode: require\n    psk: ${pki.pskFile}\n`);
    const daemon = await startDaemon({ args: ['--config', config] });
    const t = daemonTarget(daemon, 'vol0/primary');
    await expectServed(t, psk(pki.pskFile, pki.pskDir), 0x33);
    await expectRefused(t, psk(pki.wrongPskFile, pki.wrongPskDir));
  });

  it('settings that cannot work stop the start with exit status 2 and name the flag or key', async () => {
    const cases: [string[], RegExp][] = [
      [['--tls', 'require'], /--tls: .*needs either certificates/],
      [['--tls-psk', pki.pskFile], /--tls-psk: needs TLS mode on or require/],
      [['--tls', 'on', '--tls-psk', pki.pskFile, '--tls-verify-peer'], /--tls-verify-peer: verifyPeer needs certificates/],
      [['--tls', 'require', '--tls-certificates', pki.anonymousDir], /nbd\.tls\.certificates: cannot read .*server-cert\.pem/],
      [['--tls', 'require', '--tls-psk', join(pki.serverDir, 'server-key.pem')], /nbd\.tls\.psk: .*line 1/],
      [['--nbd-memory-max', '16M'], /--nbd-memory-max: must be at least/],
      [['--nbd-connections-max', 'many'], /--nbd-connections-max: /],
    ];
    for (const [args, message] of cases) {
      const dataDir = await makeTmpDir();
      const r = await gannet(['serve', '--data-dir', dataDir, '--nbd', '127.0.0.1:0', '--control', '127.0.0.1:0', ...args]);
      expect(r.status, `${args.join(' ')}\n${r.stderr}`).toBe(2);
      expect(r.stderr, args.join(' ')).toMatch(message);
    }
  });
});
