/**
 * Goal: the CLI as libnbd's nbdinfo sees it — what the handshake advertises (size, block sizes, can_*
 * flags, meta contexts), what LIST returns, and what BLOCK_STATUS reports after real writes.
 * Method: spawn the CLI on an ephemeral port (or a Unix socket), run nbdinfo, parse its JSON, and change
 * the disk with qemu-io between maps. Every assertion is on what the client printed.
 */
import { connect } from 'node:net';
import { join } from 'node:path';
import { NbdClient } from 'nbd-server-js';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startNbdCli } from './helpers/nbd-cli.js';
import {
  describeResult,
  makeTmpDir,
  removeTmpDirs,
  requireTool,
  runCommand,
  runOk,
  stopAllProcesses,
} from './helpers/process.js';

const MiB = 1024 * 1024;
const diskBytes = 64 * MiB;

interface NbdinfoExport {
  'export-name': string;
  'export-size': number;
  uri: string;
  contexts?: string[];
  is_read_only: boolean;
  is_rotational: boolean;
  can_cache: boolean;
  can_df: boolean;
  can_fast_zero: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_multi_conn: boolean;
  can_trim: boolean;
  can_zero: boolean;
  block_size_minimum?: number;
  block_size_preferred?: number;
  block_size_maximum?: number;
  description?: string;
}
interface NbdinfoJson {
  protocol: string;
  TLS: boolean;
  structured: boolean;
  exports: NbdinfoExport[];
}
interface MapEntry {
  offset: number;
  length: number;
  type: number;
  description: string;
}

async function nbdinfoJson(uri: string, extra: string[] = []): Promise<NbdinfoJson> {
  const r = await runOk('nbdinfo', ['--json', ...extra, uri]);
  return JSON.parse(r.stdout) as NbdinfoJson;
}

async function nbdinfoMap(uri: string): Promise<MapEntry[]> {
  const r = await runOk('nbdinfo', ['--map', '--json', uri]);
  return JSON.parse(r.stdout) as MapEntry[];
}

/** The map must tile [0, size) exactly: sorted, contiguous, non-empty extents. */
function assertTiles(map: MapEntry[], size: number): void {
  let at = 0;
  for (const e of map) {
    expect(e.offset).toBe(at);
    expect(e.length).toBeGreaterThan(0);
    at += e.length;
  }
  expect(at).toBe(size);
}

/** The type (base:allocation flags) of every byte in [offset, offset+length), as a set. */
function typesIn(map: MapEntry[], offset: number, length: number): Set<number> {
  const types = new Set<number>();
  for (const e of map) {
    if (e.offset < offset + length && e.offset + e.length > offset) types.add(e.type);
  }
  return types;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

beforeAll(() => {
  requireTool('nbdinfo');
  requireTool('qemu-io');
});
afterEach(stopAllProcesses);
afterAll(removeTmpDirs);

describe('nbdinfo --json', () => {
  it('reports size, block sizes, capabilities and base:allocation of a memory disk', async () => {
    const cli = await startNbdCli({ memory: diskBytes, name: 'vol0' });
    const info = await nbdinfoJson(cli.uri);
    expect(info.protocol).toBe('newstyle-fixed');
    expect(info.structured).toBe(true);
    expect(info.exports).toHaveLength(1);
    const ex = info.exports[0];
    expect(ex['export-name']).toBe('vol0');
    expect(ex['export-size']).toBe(diskBytes);
    expect(ex.contexts).toContain('base:allocation');
    expect(ex.is_read_only).toBe(false);
    expect(ex.can_flush).toBe(true);
    expect(ex.can_fua).toBe(true);
    expect(ex.can_trim).toBe(true);
    expect(ex.can_zero).toBe(true);
    expect(ex.can_multi_conn).toBe(true);
    expect(ex.can_df).toBe(true);

    // Block sizes come from NBD_INFO_BLOCK_SIZE; the spec's constraints, and our 32 MiB payload ceiling.
    expect(ex.block_size_minimum).toBeDefined();
    expect(isPowerOfTwo(ex.block_size_minimum!)).toBe(true);
    expect(ex.block_size_minimum!).toBeLessThanOrEqual(64 * 1024);
    expect(isPowerOfTwo(ex.block_size_preferred!)).toBe(true);
    expect(ex.block_size_preferred!).toBeGreaterThanOrEqual(512);
    expect(ex.block_size_preferred!).toBeGreaterThanOrEqual(ex.block_size_minimum!);
    expect(ex.block_size_maximum!).toBeGreaterThanOrEqual(ex.block_size_preferred!);
    expect(ex.block_size_maximum!).toBeLessThanOrEqual(32 * MiB);
  });

  it('answers `--can multi-conn` true and `--is read-only` false on a writable disk', async () => {
    const cli = await startNbdCli({ memory: diskBytes });
    const multi = await runCommand('nbdinfo', ['--can', 'multi-conn', cli.uri]);
    expect(multi.status, describeResult('nbdinfo --can multi-conn', multi)).toBe(0);
    const ro = await runCommand('nbdinfo', ['--is', 'read-only', cli.uri]);
    expect(ro.status, describeResult('nbdinfo --is read-only', ro)).toBe(2);
  });

  it('reports a read-only export as read-only', async () => {
    const cli = await startNbdCli({ memory: diskBytes, readOnly: true });
    const ex = (await nbdinfoJson(cli.uri)).exports[0];
    expect(ex.is_read_only).toBe(true);
    const ro = await runCommand('nbdinfo', ['--is', 'read-only', cli.uri]);
    expect(ro.status, describeResult('nbdinfo --is read-only', ro)).toBe(0);
  });

  it('works over a Unix socket (nbd+unix://)', async () => {
    const dir = await makeTmpDir();
    const socket = join(dir, 'nbd.sock');
    const cli = await startNbdCli({ memory: diskBytes, socket });
    expect(cli.uri).toMatch(/^nbd\+unix:\/\//);
    const info = await nbdinfoJson(`nbd+unix:///?socket=${socket}`);
    expect(info.exports[0]['export-size']).toBe(diskBytes);
    const size = await runOk('nbdinfo', ['--size', `nbd+unix:///?socket=${socket}`]);
    expect(size.stdout.trim()).toBe(String(diskBytes));
  });
});

describe('nbdinfo --list', () => {
  it('lists the named export, and "" selects the same disk', async () => {
    const cli = await startNbdCli({ memory: diskBytes, name: 'vol0/primary' });
    const list = await nbdinfoJson(cli.uriFor(''), ['--list']);
    const names = list.exports.map((e) => e['export-name']);
    expect(names).toContain('vol0/primary');
    for (const e of list.exports) expect(e['export-size']).toBe(diskBytes);

    // The name with '/' kept raw in the path and percent-encoded both reach the export.
    expect(cli.uri).toMatch(/vol0(%2F|\/)primary$/);
    for (const uri of [cli.uri, cli.uriFor('vol0/primary'), cli.uriFor('')]) {
      const size = await runOk('nbdinfo', ['--size', uri]);
      expect(size.stdout.trim()).toBe(String(diskBytes));
    }
    const addr = cli.address as { host: string; port: number };
    const raw = await runOk('nbdinfo', ['--size', `nbd://${addr.host}:${addr.port}/vol0/primary`]);
    expect(raw.stdout.trim()).toBe(String(diskBytes));
  });

  it('refuses an unknown export name', async () => {
    const cli = await startNbdCli({ memory: diskBytes, name: 'vol0' });
    const r = await runCommand('nbdinfo', ['--size', cli.uriFor('no-such-export')]);
    expect(r.status, describeResult('nbdinfo unknown export', r)).not.toBe(0);
    // The server is still fine afterwards.
    const ok = await runOk('nbdinfo', ['--size', cli.uri]);
    expect(ok.stdout.trim()).toBe(String(diskBytes));
  });
});

describe('nbdinfo --map', () => {
  it('shows holes on a fresh memory disk and data where qemu-io wrote', async () => {
    const cli = await startNbdCli({ memory: diskBytes });
    const fresh = await nbdinfoMap(cli.uri);
    assertTiles(fresh, diskBytes);
    for (const e of fresh) expect(e.type & 2, `fresh extent ${JSON.stringify(e)} must read as zero`).toBe(2);

    await runOk('qemu-io', ['-f', 'raw', cli.uri, '-c', `write -P 0xab ${4 * MiB} ${2 * MiB}`, '-c', `write -P 0x11 ${40 * MiB} 64k`, '-c', 'flush']);
    const written = await nbdinfoMap(cli.uri);
    assertTiles(written, diskBytes);
    expect([...typesIn(written, 4 * MiB, 2 * MiB)]).toEqual([0]);
    expect([...typesIn(written, 40 * MiB, 64 * 1024)]).toEqual([0]);
    for (const t of typesIn(written, 0, 4 * MiB)) expect(t & 2).toBe(2);
    for (const t of typesIn(written, 6 * MiB, 34 * MiB)) expect(t & 2).toBe(2);
    for (const t of typesIn(written, 40 * MiB + 64 * 1024, diskBytes - 40 * MiB - 64 * 1024)) expect(t & 2).toBe(2);

    // A trimmed range of the memory disk is a hole again. `write -z` (NO_HOLE) keeps its range allocated,
    // which base:allocation may report as plain data, so only its contents are checked.
    await runOk('qemu-io', ['-f', 'raw', cli.uri, '-c', `discard ${4 * MiB} ${2 * MiB}`, '-c', `write -z ${40 * MiB} 64k`, '-c', 'flush']);
    const cleared = await nbdinfoMap(cli.uri);
    assertTiles(cleared, diskBytes);
    expect([...typesIn(cleared, 4 * MiB, 2 * MiB)]).toEqual([3]);
    const check = await runOk('qemu-io', ['-f', 'raw', cli.uri, '-c', `read -P 0 ${4 * MiB} ${2 * MiB}`, '-c', `read -P 0 ${40 * MiB} 64k`]);
    expect(check.stdout).not.toMatch(/Pattern verification failed/);
  });
});

describe('CLI lifecycle', () => {
  it('exits 0 on SIGTERM, promptly, also with idle clients still connected', async () => {
    const idle = await startNbdCli({ memory: MiB });
    expect(await idle.stop()).toEqual({ code: 0, signal: null });

    const busy = await startNbdCli({ memory: MiB });
    await runOk('nbdinfo', ['--size', busy.uri]);
    // One client attached and idle in transmission, one stopped mid-handshake; both read what they get,
    // as real clients do, so they see the server's FIN.
    const attached = await NbdClient.connect(busy.address);
    await attached.write(Buffer.alloc(512, 1), 0);
    const addr = busy.address as { host: string; port: number };
    const handshaking = connect(addr.port, addr.host);
    handshaking.on('error', () => {});
    handshaking.resume();
    await new Promise<void>((resolve) => handshaking.once('connect', () => resolve()));
    const started = Date.now();
    // stop() sends SIGKILL after its grace period, which would show up here as signal SIGKILL.
    expect(await busy.stop()).toEqual({ code: 0, signal: null });
    expect(Date.now() - started).toBeLessThan(5_000);
    attached.destroy();
    handshaking.destroy();
  });
});
