/**
 * Goal: the control API's contract as a client sees it: auth, error statuses and codes with the field
 * named, the atomic group checkpoint, Server-Sent Events, Prometheus metrics that move with NBD I/O,
 * and the CLI's exit statuses (0 done, 1 refused or unreachable, 2 usage).
 *
 * Method: one daemon with two volumes for the whole file, real HTTP (fetch), real NBD I/O (qemu-io).
 * The failover test comes last because it ends replication of vol1.
 */
import { stat } from 'node:fs/promises';
import { request as httpRequest } from 'node:http';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { api, assertQemuOk, clientFlags, gannet, qemuIo, requireTool, startDaemon, stopAll, type DaemonHandle } from './helpers/daemon.js';

const eventTimeoutMs = 10_000;

let daemon: DaemonHandle;

beforeAll(async () => {
  daemon = await startDaemon({ volumes: ['vol0:64M', 'vol1:16M'] });
});
afterAll(async () => {
  if (daemon) expect((await daemon.stop()).code).toBe(0);
  await stopAll();
});

/** Parses Prometheus text exposition strictly enough to catch a malformed line. */
function parseMetrics(text: string): Map<string, number> {
  const samples = new Map<string, number>();
  const sample = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (-?(?:\d+(?:\.\d+)?(?:e[+-]?\d+)?|NaN|\+Inf|-Inf))(?: \d+)?$/;
  for (const line of text.split('\n')) {
    if (line === '') continue;
    if (/^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$/.test(line)) continue;
    const match = sample.exec(line);
    if (!match) throw new Error(`not a Prometheus text line: ${JSON.stringify(line)}`);
    samples.set(match[1] + (match[2] ?? ''), Number(match[3]));
  }
  return samples;
}

/**
 * A request with the path sent exactly as written: fetch and undici's request() resolve `..` and `%2e%2e`
 * through URL before sending, which would hide what the daemon does with them.
 */
function rawRequest(method: string, path: string, body?: unknown, token = daemon.token): Promise<{ status: number; json: any }> {
  const payload = body === undefined ? undefined : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = httpRequest(
      {
        host: daemon.control.host,
        port: daemon.control.port,
        method,
        path,
        headers: {
          ...(token !== '' && { authorization: `Bearer ${token}` }),
          ...(payload !== undefined && { 'content-type': 'application/json' }),
        },
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => (text += chunk));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, json: JSON.parse(text) }));
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(payload);
  });
}

/** Reads SSE frames from a stream until `predicate` accepts one. */
async function nextEvent(reader: ReadableStreamDefaultReader<Uint8Array>, predicate: (event: string, data: any) => boolean) {
  const decoder = new TextDecoder();
  let buffered = '';
  const deadline = Date.now() + eventTimeoutMs;
  while (Date.now() < deadline) {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no event within ${eventTimeoutMs} ms`)), deadline - Date.now());
    });
    const { value, done } = await Promise.race([reader.read(), timeout]).finally(() => clearTimeout(timer));
    if (done) throw new Error('event stream ended');
    buffered += decoder.decode(value, { stream: true });
    let end: number;
    while ((end = buffered.indexOf('\n\n')) !== -1) {
      const frame = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      const event = /^event: (.+)$/m.exec(frame)?.[1];
      const data = /^data: (.+)$/m.exec(frame)?.[1];
      if (event !== undefined && data !== undefined && predicate(event, JSON.parse(data))) return { event, data: JSON.parse(data) };
    }
  }
  throw new Error(`no matching event within ${eventTimeoutMs} ms`);
}

describe('gannet control API', () => {
  it('serves /healthz and /metrics without a token', async () => {
    const health = await api(daemon, 'GET', '/healthz', undefined, '');
    expect(health.status).toBe(200);
    expect(health.json).toEqual({ status: 'ok' });
    const metrics = await api(daemon, 'GET', '/metrics', undefined, '');
    expect(metrics.status).toBe(200);
    expect(metrics.headers.get('content-type')).toMatch(/^text\/plain/);
  });

  it('refuses /v1 without a token and with a wrong one (401)', async () => {
    const token = (await stat(join(daemon.dataDir, 'control.token'))).mode & 0o777;
    expect(token).toBe(0o600);
    for (const wrong of ['', 'x', daemon.token.replace(/.$/, (c) => (c === '0' ? '1' : '0')), `${daemon.token}0`]) {
      const response = await api(daemon, 'GET', '/v1/volumes', undefined, wrong);
      expect(response.status).toBe(401);
      expect(response.json.error.code).toBe('unauthorized');
      expect(response.headers.get('www-authenticate')).toMatch(/^Bearer/);
    }
    const events = await api(daemon, 'GET', '/v1/events', undefined, 'nope');
    expect(events.status).toBe(401);
  });

  it('lists volumes and describes one', async () => {
    const list = await api(daemon, 'GET', '/v1/volumes');
    expect(list.status).toBe(200);
    expect(list.json.volumes.map((volume: { name: string }) => volume.name)).toEqual(['vol0', 'vol1']);
    const one = await api(daemon, 'GET', '/v1/volumes/vol1');
    expect(one.status).toBe(200);
    expect(one.json).toMatchObject({
      name: 'vol1',
      exports: { primary: 'vol1/primary', secondary: 'vol1/secondary' },
      state: 'replicating',
      sizeBytes: 16 * 1024 * 1024,
      strategy: 'gannet',
    });
    expect(one.json.uris.secondary[0]).toMatch(/^nbd:\/\/127\.0\.0\.1:\d+\/vol1(%2F|\/)secondary$/);
    for (const field of ['epoch', 'durableEpoch', 'spilledBytes']) expect(typeof one.json[field]).toBe('number');
    expect(Object.keys(one.json.bufferedBytes).sort()).toEqual(['committed', 'primary', 'secondary']);
    expect(Array.isArray(one.json.tornRanges)).toBe(true);
  });

  it('answers 404 for an unknown volume or endpoint, 405 for a wrong method', async () => {
    const volume = await api(daemon, 'GET', '/v1/volumes/nope');
    expect(volume.status).toBe(404);
    expect(volume.json.error).toMatchObject({ code: 'not_found' });
    expect(volume.json.error.message).toContain('nope');
    expect((await api(daemon, 'POST', '/v1/volumes/nope/checkpoint')).status).toBe(404);
    expect((await api(daemon, 'POST', '/v1/checkpoint', { volumes: ['vol0', 'nope'] })).status).toBe(404);
    expect((await api(daemon, 'GET', '/v2/volumes')).status).toBe(404);
    const method = await api(daemon, 'PUT', '/v1/volumes/vol0');
    expect(method.status).toBe(405);
    expect(method.json.error.code).toBe('method_not_allowed');
    expect(method.headers.get('allow')).toBe('GET, DELETE');
    expect((await api(daemon, 'DELETE', '/v1/volumes/nope')).status).toBe(404);
  });

  it('answers 400 naming the field for bad bodies, 413 for big ones', async () => {
    const target = await api(daemon, 'POST', '/v1/volumes/vol0/failover', { to: 'sideways' });
    expect(target.status).toBe(400);
    expect(target.json.error).toMatchObject({ code: 'bad_request', field: 'to' });
    expect(target.json.error.message).toMatch(/^to: /);
    const extra = await api(daemon, 'POST', '/v1/checkpoint', { volumes: ['vol0'], force: true });
    expect(extra.status).toBe(400);
    expect(extra.json.error.field).toBe('force');
    const list = await api(daemon, 'POST', '/v1/checkpoint', { volumes: 'vol0' });
    expect(list.status).toBe(400);
    expect(list.json.error.field).toBe('volumes');
    // A body is JSON whatever its Content-Type says (curl -d sends a form type).
    const form = await fetch(`${daemon.controlUrl}/v1/volumes/vol0/failover`, {
      method: 'POST',
      headers: { authorization: `Bearer ${daemon.token}`, 'content-type': 'application/x-www-form-urlencoded' },
      body: '{"to":"sideways"}',
    });
    expect(form.status).toBe(400);
    expect((await form.json()).error).toMatchObject({ code: 'bad_request', field: 'to' });
    const json = await api(daemon, 'POST', '/v1/volumes/vol0/checkpoint', '{"oops"');
    expect(json.status).toBe(400);
    expect(json.json.error.field).toBe('body');
    const big = await api(daemon, 'POST', '/v1/checkpoint', { volumes: Array.from({ length: 20_000 }, () => 'vol0') });
    expect(big.status).toBe(413);
    expect(big.json.error.code).toBe('payload_too_large');
    expect((await api(daemon, 'GET', '/v1/volumes/vol0')).json.state).toBe('replicating');
  });

  it('refuses dot segments and encoded slashes in the raw path (400 path) without acting on any volume', async () => {
    const volumesState = async () =>
      (await api(daemon, 'GET', '/v1/volumes')).json.volumes.map((v: { name: string; epoch: number; state: string }) => [v.name, v.epoch, v.state]);
    const before = await volumesState();
    expect(before).toEqual([
      ['vol0', expect.any(Number), 'replicating'],
      ['vol1', expect.any(Number), 'replicating'],
    ]);
    const refused: [string, string, unknown?][] = [
      // URL resolution turned these into POST /v1/checkpoint (every volume) and a failover of vol1.
      ['POST', '/v1/volumes/%2e%2e/checkpoint'],
      ['POST', '/v1/volumes/%2E%2e/checkpoint?x=1'],
      ['POST', '/v1/volumes/w/%2e%2e/vol1/failover', { to: 'checkpoint' }],
      ['POST', '/v1/volumes/w/%2E./vol1/failover', { to: 'checkpoint' }],
      ['POST', '/v1/volumes/vol0/../checkpoint'],
      ['POST', '/v1/volumes/vol0/../../checkpoint'],
      ['POST', '/v1/./checkpoint'],
      ['POST', '/v1/volumes/vol0/%2E/checkpoint'],
      ['POST', '/v1/volumes/x%2f..%2fvol0/checkpoint'],
      ['POST', '/v1/volumes/x%5C..%5Cvol1/failover', { to: 'checkpoint' }],
      ['GET', '/v1/volumes/%2e%2e'],
      ['GET', '/v1/volumes/vol0%2F'],
    ];
    const answers = [];
    for (const [method, path, body] of refused) {
      const response = await rawRequest(method, path, body);
      answers.push({ path, status: response.status, error: response.json.error });
    }
    expect(await volumesState()).toEqual(before);
    for (const answer of answers) expect(answer).toMatchObject({ status: 400, error: { code: 'bad_request', field: 'path' } });
    // Refused before the token is looked at, like any other malformed request.
    expect((await rawRequest('POST', '/v1/volumes/%2e%2e/checkpoint', undefined, '')).status).toBe(400);
    // Dots inside a segment are a name, not a dot segment.
    expect((await rawRequest('GET', '/v1/volumes/..vol0')).json.error.code).toBe('not_found');
  });

  it('checkpoints one volume, a group atomically, and delivers checkpoint events over SSE', async () => {
    const response = await fetch(`${daemon.controlUrl}/v1/events`, { headers: { authorization: `Bearer ${daemon.token}` } });
    expect(response.status).toBe(200);
    expect(response.headers.get('content-type')).toMatch(/^text\/event-stream/);
    const reader = response.body!.getReader();
    try {
      const before = (await api(daemon, 'GET', '/v1/volumes/vol0')).json.epoch as number;
      const single = await api(daemon, 'POST', '/v1/volumes/vol0/checkpoint');
      expect(single.status).toBe(200);
      expect(single.json).toEqual({ epoch: before + 1, durableEpoch: expect.any(Number), instance: expect.any(String) });
      const event = await nextEvent(reader, (name, data) => name === 'checkpoint' && data.volume === 'vol0');
      expect(event.data.epoch).toBe(before + 1);

      const group = await api(daemon, 'POST', '/v1/checkpoint', {});
      expect(group.status).toBe(200);
      expect(group.json.volumes.map((entry: { name: string }) => entry.name)).toEqual(['vol0', 'vol1']);
      expect(group.json.volumes[0].epoch).toBe(before + 2);
      const vol1Event = await nextEvent(reader, (name, data) => name === 'checkpoint' && data.volume === 'vol1');
      expect(vol1Event.data.epoch).toBe(group.json.volumes[1].epoch);
    } finally {
      await reader.cancel();
    }
  });

  it('exposes Prometheus metrics whose NBD request counter moves with qemu-io I/O', async () => {
    requireTool('qemu-io');
    const key = 'gannet_nbd_requests_total{export="vol0/primary",command="write",result="ok"}';
    const before = parseMetrics((await api(daemon, 'GET', '/metrics')).text);
    assertQemuOk(await qemuIo(daemon, 'vol0/primary', ['write -P 0x5a 0 65536', 'write -P 0x5b 1M 65536']), 'writes');
    const after = parseMetrics((await api(daemon, 'GET', '/metrics')).text);
    expect(after.get(key)).toBe((before.get(key) ?? 0) + 2);
    expect(after.get('gannet_volume_buffered_bytes{volume="vol0",buffer="primary"}')).toBeGreaterThanOrEqual(2 * 65536);
    expect(after.get('gannet_volume_epoch{volume="vol0"}')).toBeGreaterThanOrEqual(2);
    const bytesKey = 'gannet_nbd_request_bytes_total{export="vol0/primary",command="write"}';
    expect(after.get(bytesKey)).toBe((before.get(bytesKey) ?? 0) + 2 * 65536);
    // The latency histogram: cumulative buckets ending in +Inf, which equals the count.
    const count = 'gannet_nbd_request_duration_seconds_count{command="write"}';
    expect(after.get(count)).toBe((before.get(count) ?? 0) + 2);
    expect(after.get('gannet_nbd_request_duration_seconds_bucket{le="+Inf",command="write"}')).toBe(after.get(count));
    const buckets = [...after].filter(([name]) => name.startsWith('gannet_nbd_request_duration_seconds_bucket{') && name.includes('command="write"'));
    expect(buckets.length).toBeGreaterThan(2);
    for (let i = 1; i < buckets.length; i++) expect(buckets[i][1]).toBeGreaterThanOrEqual(buckets[i - 1][1]);
    expect(after.get('gannet_nbd_request_duration_seconds_sum{command="write"}')).toBeGreaterThan(0);
    expect([...after.keys()].some((name) => name.startsWith('gannet_checkpoint_pause_seconds_count{volume="vol0"}'))).toBe(true);
    expect(after.get('gannet_nbd_connections_total')).toBeGreaterThanOrEqual(1);
    expect(() => parseMetrics('gannet_bad metric\n')).toThrow(/not a Prometheus text line/);
  });

  it('the CLI: status, usage errors (2), refusals (1), an unreachable daemon (1)', async () => {
    const table = await gannet(['status', ...clientFlags(daemon)]);
    expect(table.status).toBe(0);
    expect(table.stdout).toMatch(/^VOLUME\s+STRATEGY\s+STATE/);
    expect(table.stdout).toMatch(/^vol1\s+gannet\s+replicating/m);
    const json = await gannet(['status', 'vol0', '--json', ...clientFlags(daemon)]);
    expect(JSON.parse(json.stdout).name).toBe('vol0');

    const usage = await gannet(['failover', 'vol0', '--to', 'sideways', ...clientFlags(daemon)]);
    expect(usage.status).toBe(2);
    expect(usage.stderr).toContain('--to');
    expect((await gannet(['frobnicate'])).status).toBe(2);
    expect((await gannet(['status', '--control', 'nowhere', '--data-dir', daemon.dataDir])).status).toBe(2);
    expect((await gannet(['status', '--control', `127.0.0.1:${daemon.control.port}`, '--data-dir', '/nonexistent'])).status).toBe(2);

    const missing = await gannet(['checkpoint', 'nope', ...clientFlags(daemon)]);
    expect(missing.status).toBe(1);
    expect(missing.stderr).toMatch(/404 not_found.*nope/);

    const closedPort = await new Promise<number>((resolve) => {
      const probe = createServer().listen(0, '127.0.0.1', () => {
        const { port } = probe.address() as { port: number };
        probe.close(() => resolve(port));
      });
    });
    const unreachable = await gannet(['status', '--control', `127.0.0.1:${closedPort}`, '--data-dir', daemon.dataDir]);
    expect(unreachable.status).toBe(1);
    expect(unreachable.stderr).toContain(`http://127.0.0.1:${closedPort}`);

    for (const command of [[], ['serve'], ['status'], ['checkpoint'], ['failover']]) {
      const help = await gannet([...command, '--help']);
      expect(help.status).toBe(0);
      expect(help.stdout).toContain('Usage: gannet');
    }
  });

  it('fails over, then answers 409 to checkpoint and to another target, 200 to the same one, with the failover event', async () => {
    const response = await fetch(`${daemon.controlUrl}/v1/events?volume=vol1`, { headers: { authorization: `Bearer ${daemon.token}` } });
    const reader = response.body!.getReader();
    try {
      const failover = await api(daemon, 'POST', '/v1/volumes/vol1/failover', { to: 'checkpoint' });
      expect(failover.status).toBe(200);
      expect(failover.json).toMatchObject({ name: 'vol1', state: 'failed-over', failoverTarget: 'checkpoint' });
      const event = await nextEvent(reader, (name) => name === 'failover');
      expect(event.data).toMatchObject({ volume: 'vol1', to: 'checkpoint' });
    } finally {
      await reader.cancel();
    }
    const checkpoint = await api(daemon, 'POST', '/v1/volumes/vol1/checkpoint');
    expect(checkpoint.status).toBe(409);
    expect(checkpoint.json.error.code).toBe('conflict');
    // Every volume: the failed-over one is left out, and said so.
    const all = await api(daemon, 'POST', '/v1/checkpoint', {});
    expect(all.status).toBe(200);
    expect(all.json.volumes.map((entry: { name: string }) => entry.name)).toEqual(['vol0']);
    expect(all.json.skipped).toEqual([{ name: 'vol1', reason: 'failed-over (to checkpoint)' }]);
    expect((await api(daemon, 'POST', '/v1/checkpoint', { volumes: ['vol0', 'vol1'] })).status).toBe(409);
    expect((await api(daemon, 'POST', '/v1/volumes/vol1/failover', { to: 'secondary' })).status).toBe(409);
    // The same target again answers as the first time did.
    const again = await api(daemon, 'POST', '/v1/volumes/vol1/failover', { to: 'checkpoint' });
    expect(again.status).toBe(200);
    expect(again.json).toMatchObject({ name: 'vol1', state: 'failed-over', failoverTarget: 'checkpoint' });
    const other = await api(daemon, 'POST', '/v1/checkpoint', { volumes: ['vol0'] });
    expect(other.status).toBe(200);
  });
});
