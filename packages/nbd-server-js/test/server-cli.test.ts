/**
 * Goal: the nbd-server-js CLI parses its arguments, serves a memory disk or a file on the address it
 * prints, honours --read-only and --name, and shuts down cleanly on SIGTERM/SIGINT. Method: spawn the
 * built CLI (dist: build first), parse the `nbd-server-js: serving URI` line, speak raw NBD to it, and
 * assert on exit codes, replies and data.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { buildRequest } from '../src/protocol/builders.js';
import { CMD_FLUSH, CMD_READ, CMD_WRITE, NBD_EPERM } from '../src/protocol/constants.js';
import { RawClient } from './server-fixtures.js';

const bin = fileURLToPath(new URL('../bin/nbd-server-js.js', import.meta.url));
const dist = fileURLToPath(new URL('../dist/cli.js', import.meta.url));
const children: ChildProcess[] = [];
const dirs: string[] = [];

beforeAll(() => {
  if (!existsSync(dist)) throw new Error(`${dist} is missing: run \`npx -y pnpm@9 run build\` first`);
});

afterEach(() => {
  for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function run(args: string[]) {
  const child = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (c: Buffer) => (stdout += c.toString()));
  child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
  const exited = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) =>
    child.once('exit', (code) => resolve({ code, stdout, stderr })),
  );
  const serving = new Promise<string>((resolve, reject) => {
    child.stdout!.on('data', () => {
      const m = /^nbd-server-js: serving (\S+)$/m.exec(stdout);
      if (m) resolve(m[1]);
    });
    void exited.then((r) => reject(new Error(`exited ${r.code} before serving: ${r.stderr}`)));
  });
  // Runs that are expected to fail never await `serving`.
  serving.catch(() => {});
  return { child, exited, serving };
}

function addressOf(uri: string) {
  const u = new URL(uri);
  if (u.protocol === 'nbd+unix:') return { address: { path: u.searchParams.get('socket')! }, name: decodeURIComponent(u.pathname.slice(1)) };
  return { address: { host: u.hostname, port: Number(u.port) }, name: decodeURIComponent(u.pathname.slice(1)) };
}

describe('nbd-server-js CLI', () => {
  it('usage errors exit 2 with a message', async () => {
    for (const args of [[], ['--memory', '12Q'], ['--memory', '0'], ['--memory', '1M', 'file.img'], ['--memory', '1M', '--port', 'x'], ['--memory', '1M', '--socket', '/tmp/s', '--port', '1'], ['--bogus'],
      ['--memory', '1M', '--tls', 'maybe'], ['--memory', '1M', '--tls', 'require'], ['--memory', '1M', '--tls-psk', 'keys.psk'],
      ['--memory', '1M', '--tls', 'on', '--tls-psk', 'k', '--tls-certificates', 'd'], ['--memory', '1M', '--tls', 'on', '--tls-psk', 'k', '--tls-verify-peer']]) {
      const r = await run(args).exited;
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr).toMatch(/nbd-server-js: .+/);
    }
  });

  it('--help prints usage and exits 0', async () => {
    const r = await run(['--help']).exited;
    expect(r.code).toBe(0);
    expect(r.stdout).toContain('Usage: nbd-server-js');
  });

  it('serves a named memory disk on a free port, reachable by its name and by the empty name; SIGTERM exits 0', async () => {
    const p = run(['--memory', '1M', '--port', '0', '--name', 'vol0/primary']);
    const uri = await p.serving;
    expect(uri).toMatch(/^nbd:\/\/127\.0\.0\.1:\d+\/vol0%2Fprimary$/);
    const { address, name } = addressOf(uri);
    expect(name).toBe('vol0/primary');
    const a = await RawClient.open(address);
    await a.go('vol0/primary');
    a.socket.write(buildRequest({ type: CMD_WRITE, cookie: 1, offset: 1000, length: 5 }, Buffer.from('hello')));
    await a.replies(1);
    const b = await RawClient.open(address);
    await b.go('');
    b.socket.write(buildRequest({ type: CMD_READ, cookie: 2, offset: 1000, length: 5 }));
    const [reply] = await b.replies(1);
    expect(reply.kind === 'chunk' && reply.payload.subarray(8).toString()).toBe('hello');
    a.socket.destroy();
    b.socket.destroy();
    p.child.kill('SIGTERM');
    expect((await p.exited).code).toBe(0);
  });

  it('serves a file read-only over a Unix socket: reads the file, writes get EPERM; SIGINT exits 0', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'nbd-cli-'));
    dirs.push(dir);
    const file = join(dir, 'disk.img');
    const content = Buffer.alloc(64 * 1024 + 3, 0x3c);
    writeFileSync(file, content);
    const sock = join(dir, 'nbd.sock');
    const p = run([file, '--socket', sock, '--read-only']);
    const uri = await p.serving;
    expect(uri).toBe(`nbd+unix:///?socket=${sock}`);
    const c = await RawClient.open({ path: sock });
    await c.go('');
    c.socket.write(buildRequest({ type: CMD_WRITE, cookie: 1, offset: 0, length: 2 }, Buffer.from('no')));
    c.socket.write(buildRequest({ type: CMD_READ, cookie: 2, offset: 64 * 1024 - 1, length: 4 }));
    c.socket.write(buildRequest({ type: CMD_FLUSH, cookie: 3, offset: 0, length: 0 }));
    const replies = new Map((await c.replies(3)).map((r) => [r.cookie, r]));
    const w = replies.get(1n)!;
    expect(w.kind === 'chunk' ? w.payload.readUInt32BE(0) : w.error).toBe(NBD_EPERM);
    const r = replies.get(2n)!;
    expect(r.kind === 'chunk' && [...r.payload.subarray(8)]).toEqual([0x3c, 0x3c, 0x3c, 0x3c]);
    c.socket.destroy();
    p.child.kill('SIGINT');
    expect((await p.exited).code).toBe(0);
    expect(readFileSync(file).equals(content)).toBe(true);
  });

  it('a missing file is a runtime error: exit 1', async () => {
    const r = await run(['/nonexistent/disk.img', '--port', '0']).exited;
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('nbd-server-js:');
  });
});
