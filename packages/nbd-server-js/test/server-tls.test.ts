/**
 * Goal: NBD over TLS as doc/proto.md's TLS section describes it, on both sides of this package: the
 * server's FORCEDTLS ('require') and SELECTIVETLS ('on', with TLS-only exports) modes, with no byte of
 * a TLS-only export before the TLS handshake; X.509 (with and without client certificates) and PSK;
 * and our client against a server we did not write (nbdkit --tls=require).
 * Method: the Handshake state machine fed options directly; then real sockets on loopback, NbdServer
 * with a memory device and NbdClient, with credentials made for the test by certtool and psktool
 * (test/helpers/pki.ts); raw sockets for what a well-behaved client never sends. nbdkit runs until its
 * --run command's stdin closes (started and stopped by pid).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { MemoryDevice } from '@gannet/block-device';
import { makePki, pskIdentity, type Pki } from '../../../test/helpers/pki.js';
import { freePort, removeTmpDirs, requireTool } from '../../../test/helpers/process.js';
import { NbdClient, NbdHandshakeError } from '../src/client.js';
import { buildClientFlags, buildGoOption, buildInfoOption, buildOption, buildSetMetaContext } from '../src/protocol/builders.js';
import {
  OPT_ABORT,
  OPT_EXPORT_NAME,
  OPT_GO,
  OPT_INFO,
  OPT_LIST,
  OPT_SET_META_CONTEXT,
  OPT_STARTTLS,
  OPT_STRUCTURED_REPLY,
  REP_ACK,
  REP_ERR_INVALID,
  REP_ERR_TLS_REQD,
  REP_ERR_UNKNOWN,
  REP_INFO,
  REP_SERVER,
} from '../src/protocol/constants.js';
import { Handshake, type HandshakeStep } from '../src/server/handshake.js';
import { NbdServer, type NbdServerOptions } from '../src/server/server.js';
import type { ListenAddress } from '../src/server/uri.js';
import { loadClientX509, loadPskFile, loadServerX509, parsePskFile, TlsCredentialsError, type TlsClientCredentials } from '../src/tls.js';
import { decodeOptionReplies, entry, RawClient, registryOf, TestDevice } from './server-fixtures.js';

const MiB = 1024 * 1024;
const readyMsMax = 10_000;
let pki: Pki;

beforeAll(async () => {
  pki = await makePki();
});
afterAll(removeTmpDirs);

/** The option replies of one step, as [option, type] pairs. */
function replies(step: HandshakeStep): [number, number][] {
  return decodeOptionReplies(Buffer.concat(step.frames)).replies.map((r) => [r.option, r.type]);
}

function handshake(mode: 'on' | 'require') {
  const device = new TestDevice(MiB);
  const exports = registryOf([entry('open', device), { ...entry('secret', device), tlsRequired: true }]);
  const hs = new Handshake({ exports, requestBytesMax: MiB, isShuttingDown: () => false, tls: mode });
  hs.clientFlags(1);
  return hs;
}

const name = (s: string) => {
  const b = Buffer.from(s);
  const out = Buffer.alloc(4 + b.length + 2);
  out.writeUInt32BE(b.length, 0);
  b.copy(out, 4);
  return out;
};

describe('Handshake with TLS', () => {
  it("'require' (FORCEDTLS): every option but STARTTLS and ABORT gets TLS_REQD; EXPORT_NAME closes", () => {
    const hs = handshake('require');
    for (const option of [OPT_STRUCTURED_REPLY, OPT_LIST, OPT_INFO, OPT_GO, OPT_SET_META_CONTEXT, 99]) {
      const step = hs.option(option, option === OPT_INFO || option === OPT_GO ? name('open') : Buffer.alloc(0));
      expect(step.next).toBe('continue');
      expect(replies(step)).toEqual([[option, REP_ERR_TLS_REQD]]);
    }
    expect(hs.option(OPT_EXPORT_NAME, Buffer.from('open')).next).toBe('close');
    expect(handshake('require').option(OPT_ABORT, Buffer.alloc(0))).toMatchObject({ next: 'close' });
  });

  it('STARTTLS: ACK then the upgrade; with data, or once TLS runs, INVALID; afterwards nothing is TLS_REQD', () => {
    const hs = handshake('require');
    expect(replies(hs.option(OPT_STARTTLS, Buffer.from([0])))).toEqual([[OPT_STARTTLS, REP_ERR_INVALID]]);
    const start = hs.option(OPT_STARTTLS, Buffer.alloc(0));
    expect(start.next).toBe('starttls');
    expect(replies(start)).toEqual([[OPT_STARTTLS, REP_ACK]]);
    hs.tlsStarted();
    expect(replies(hs.option(OPT_STARTTLS, Buffer.alloc(0)))).toEqual([[OPT_STARTTLS, REP_ERR_INVALID]]);
    const info = hs.option(OPT_INFO, name('secret'));
    expect(replies(info).map(([, type]) => type)).toEqual([REP_INFO, REP_INFO, REP_ACK]);
    expect(hs.option(OPT_GO, name('open')).next).toBe('transmission');
  });

  it('what was negotiated before STARTTLS is forgotten', () => {
    const hs = handshake('on');
    expect(replies(hs.option(OPT_STRUCTURED_REPLY, Buffer.alloc(0)))).toEqual([[OPT_STRUCTURED_REPLY, REP_ACK]]);
    hs.option(OPT_SET_META_CONTEXT, buildSetMetaContext('open', ['base:allocation']).subarray(16));
    expect(hs.option(OPT_STARTTLS, Buffer.alloc(0)).next).toBe('starttls');
    hs.tlsStarted();
    const go = hs.option(OPT_GO, name('open'));
    expect(go).toMatchObject({ next: 'transmission', session: { structuredReplies: false, baseAllocation: false } });
  });

  it("'on' (SELECTIVETLS): TLS-only exports are refused with TLS_REQD, left out of LIST and unknown to meta contexts; the others work in plaintext", () => {
    const hs = handshake('on');
    const list = decodeOptionReplies(Buffer.concat(hs.option(OPT_LIST, Buffer.alloc(0)).frames)).replies;
    expect(list.filter((r) => r.type === REP_SERVER).map((r) => r.data.toString('utf8', 4))).toEqual(['open']);
    expect(replies(hs.option(OPT_INFO, name('secret')))).toEqual([[OPT_INFO, REP_ERR_TLS_REQD]]);
    expect(replies(hs.option(OPT_GO, name('secret')))).toEqual([[OPT_GO, REP_ERR_TLS_REQD]]);
    hs.option(OPT_STRUCTURED_REPLY, Buffer.alloc(0));
    expect(replies(hs.option(OPT_SET_META_CONTEXT, buildSetMetaContext('secret', ['base:allocation']).subarray(16)))).toEqual([[OPT_SET_META_CONTEXT, REP_ERR_UNKNOWN]]);
    expect(handshake('on').option(OPT_EXPORT_NAME, Buffer.from('secret')).next).toBe('close');
    expect(hs.option(OPT_GO, name('open')).next).toBe('transmission');
  });
});

describe('PSK files', () => {
  it('reads psktool output and refuses malformed lines with the line number', async () => {
    const keys = await loadPskFile(pki.pskFile);
    expect([...keys.keys()]).toEqual([pskIdentity]);
    expect(keys.get(pskIdentity)).toHaveLength(32);
    expect(parsePskFile('a:0011\n\nb:ff\n').get('b')).toEqual(Buffer.from([0xff]));
    expect(() => parsePskFile('a:001\n')).toThrow(/line 1: the key is not/);
    expect(() => parsePskFile('a:00\nnokey\n')).toThrow(/line 2: expected identity:hexkey/);
    expect(() => parsePskFile('a:00\na:11\n')).toThrow(TlsCredentialsError);
    expect(() => parsePskFile('\n')).toThrow(/no keys/);
  });
});

const servers: NbdServer[] = [];
afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => s.close({ graceMs: 100 })));
});

async function serve(tls: NbdServerOptions['tls'], exports: { name: string; tlsRequired?: boolean }[] = [{ name: 'disk' }]): Promise<ListenAddress> {
  const server = new NbdServer({ tls });
  servers.push(server);
  for (const e of exports) server.addExport(e.name, new MemoryDevice(64 * MiB), { tlsRequired: e.tlsRequired });
  return server.listen({ host: '127.0.0.1', port: 0 });
}

async function roundTrip(address: ListenAddress, exportName: string, tls?: TlsClientCredentials): Promise<void> {
  const client = await NbdClient.connect(address, { exportName, tls });
  const data = Buffer.alloc(MiB, 0x3c);
  await client.write(data, MiB);
  expect((await client.readBytes(MiB, MiB)).equals(data)).toBe(true);
  await client.close();
}

async function psk(file: string): Promise<TlsClientCredentials> {
  return { psk: { identity: pskIdentity, key: (await loadPskFile(file)).get(pskIdentity)! } };
}

describe('NbdServer and NbdClient over TLS', () => {
  it('X.509, TLS required: a client trusting the CA is served; a plain client gets TLS_REQD; a client trusting another CA fails the handshake', async () => {
    const address = await serve({ mode: 'require', credentials: { x509: await loadServerX509(pki.serverDir) } });
    await roundTrip(address, 'disk', { x509: await loadClientX509(pki.anonymousDir) });
    const plain = NbdClient.connect(address, { exportName: 'disk' });
    await expect(plain).rejects.toBeInstanceOf(NbdHandshakeError);
    await expect(plain).rejects.toMatchObject({ replyType: REP_ERR_TLS_REQD });
    await expect(NbdClient.connect(address, { exportName: 'disk', tls: { x509: await loadClientX509(pki.wrongCaDir) } })).rejects.toThrow(/TLS handshake failed/);
    expect(await NbdClient.list(address, { tls: { x509: await loadClientX509(pki.anonymousDir) } })).toEqual([{ name: 'disk', description: '' }]);
  });

  it('client certificates verified: only a certificate from our CA gets in', async () => {
    const address = await serve({ mode: 'require', credentials: { x509: await loadServerX509(pki.serverDir, { verifyPeer: true }) } });
    await roundTrip(address, 'disk', { x509: await loadClientX509(pki.clientDir) });
    for (const dir of [pki.anonymousDir, pki.strangerDir]) {
      await expect(NbdClient.connect(address, { exportName: 'disk', tls: { x509: await loadClientX509(dir) } })).rejects.toThrow();
    }
  });

  it('PSK: the right key gets in; a wrong key or an unknown identity fails the handshake', async () => {
    const address = await serve({ mode: 'require', credentials: { psk: await loadPskFile(pki.pskFile) } });
    await roundTrip(address, 'disk', await psk(pki.pskFile));
    await expect(NbdClient.connect(address, { exportName: 'disk', tls: await psk(pki.wrongPskFile) })).rejects.toThrow(/TLS handshake failed/);
    const stranger = { psk: { identity: 'mallory', key: (await loadPskFile(pki.pskFile)).get(pskIdentity)! } };
    await expect(NbdClient.connect(address, { exportName: 'disk', tls: stranger })).rejects.toThrow(/TLS handshake failed/);
  });

  it("TLS 'on': a TLS-only export needs TLS, the other is served either way", async () => {
    const address = await serve({ mode: 'on', credentials: { psk: await loadPskFile(pki.pskFile) } }, [{ name: 'open' }, { name: 'secret', tlsRequired: true }]);
    await roundTrip(address, 'open');
    await expect(NbdClient.connect(address, { exportName: 'secret' })).rejects.toMatchObject({ replyType: REP_ERR_TLS_REQD });
    expect((await NbdClient.list(address)).map((e) => e.name)).toEqual(['open']);
    const tls = await psk(pki.pskFile);
    await roundTrip(address, 'secret', tls);
    await roundTrip(address, 'open', tls);
    expect((await NbdClient.list(address, { tls })).map((e) => e.name)).toEqual(['open', 'secret']);
  });

  it('a TLS-only export sends nothing of itself in plaintext: EXPORT_NAME closes without its size, GO gets TLS_REQD', async () => {
    const address = await serve({ mode: 'require', credentials: { psk: await loadPskFile(pki.pskFile) } });
    const byName = await RawClient.open(address);
    byName.socket.write(Buffer.concat([buildClientFlags(3), buildOption(OPT_EXPORT_NAME, Buffer.from('disk'))]));
    await byName.until(() => (byName.closed ? true : undefined), 'close').catch(() => undefined);
    expect(byName.bytes().length).toBe(18);
    const go = await RawClient.open(address);
    go.socket.write(Buffer.concat([buildClientFlags(3), buildInfoOption('disk'), buildGoOption('disk')]));
    const answers = await go.until((b) => {
      const r = b.length > 18 ? decodeOptionReplies(b.subarray(18)).replies : [];
      return r.length >= 2 ? r : undefined;
    }, 'two replies');
    expect(answers.map((r) => r.type)).toEqual([REP_ERR_TLS_REQD, REP_ERR_TLS_REQD]);
    go.socket.destroy();
  });

  it('bytes sent after STARTTLS before its ACK (plaintext injection) end the connection', async () => {
    const address = await serve({ mode: 'on', credentials: { psk: await loadPskFile(pki.pskFile) } });
    const c = await RawClient.open(address);
    c.socket.write(Buffer.concat([buildClientFlags(3), buildOption(OPT_STARTTLS), buildOption(OPT_STRUCTURED_REPLY)]));
    await c.until(() => (c.closed ? true : undefined), 'close').catch(() => undefined);
    expect(c.closed).toBe(true);
    // The greeting is all it got: not even the ACK of STARTTLS.
    expect(decodeOptionReplies(c.bytes().subarray(18)).replies).toEqual([]);
  });
});

/** nbdkit with TLS required, on a free port, until its --run command (`cat`) sees stdin close. */
async function startNbdkit(tlsArgs: string[]): Promise<{ child: ChildProcess; port: number }> {
  const port = await freePort();
  const child = spawn(requireTool('nbdkit'), ['--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), '--tls=require', ...tlsArgs, 'memory', String(64 * MiB), '--run', 'echo ready; cat >/dev/null'], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`nbdkit not ready within ${readyMsMax} ms: ${stderr}`)), readyMsMax);
    child.stdout!.on('data', (d: Buffer) => {
      if (d.toString().includes('ready')) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`nbdkit exited early with code ${code}: ${stderr}`));
    });
  });
  return { child, port };
}

async function stopNbdkit(n: { child: ChildProcess }): Promise<void> {
  const exited = new Promise((resolve) => n.child.once('exit', resolve));
  n.child.stdin!.end();
  await exited;
}

describe('NbdClient against nbdkit --tls=require', () => {
  it('X.509: with the CA the client is served, without TLS it is refused', async () => {
    const nbdkit = await startNbdkit([`--tls-certificates=${pki.serverDir}`]);
    try {
      const address = { host: '127.0.0.1', port: nbdkit.port };
      await roundTrip(address, '', { x509: await loadClientX509(pki.anonymousDir) });
      await expect(NbdClient.connect(address)).rejects.toMatchObject({ replyType: REP_ERR_TLS_REQD });
    } finally {
      await stopNbdkit(nbdkit);
    }
  });

  it('PSK: the right key is served, a wrong one fails the handshake', async () => {
    const nbdkit = await startNbdkit([`--tls-psk=${pki.pskFile}`]);
    try {
      const address = { host: '127.0.0.1', port: nbdkit.port };
      await roundTrip(address, '', await psk(pki.pskFile));
      await expect(NbdClient.connect(address, { tls: await psk(pki.wrongPskFile) })).rejects.toThrow(/TLS handshake failed/);
    } finally {
      await stopNbdkit(nbdkit);
    }
  });
});
