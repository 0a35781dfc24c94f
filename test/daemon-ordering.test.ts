/**
 * Goal: control operations are ordered per volume, not across the daemon. With volume a's storage hung,
 * a failover of a stays pending, and a checkpoint of volume b, requested after it, completes meanwhile;
 * once a's storage is back, a's failover completes too. (Chaining every operation in one queue made b's
 * checkpoint wait for a's failover.)
 *
 * Method: a's directory moved onto an ext4 whose device can be paused (test/helpers/mounts.ts), a real
 * daemon on the data directory, the two requests over HTTP; the test asserts the order in which they
 * complete, not how long they take.
 */
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { api, makeTempDir, requireTool, startDaemon, stopAll } from './helpers/daemon.js';
import { mountPausable } from './helpers/mounts.js';
import { runOk } from './helpers/process.js';

const MiB = 1024 * 1024;
/** Bounds the wait for b's checkpoint: with operations chained across volumes it never comes while a is hung. */
const checkpointWaitMs = 20_000;

describe('gannet daemon: control operations ordered per volume', () => {
  afterEach(stopAll);

  it("completes b's checkpoint while a's failover waits for a's hung storage", async () => {
    const dataDir = await makeTempDir();
    const first = await startDaemon({ dataDir, volumes: ['a:16M', 'b:16M'] });
    expect((await first.stop()).code).toBe(0);
    const dir = join(dataDir, 'volumes', 'a');
    const saved = await makeTempDir();
    await runOk(requireTool('cp'), ['-a', '--sparse=always', `${dir}/.`, saved]);
    await rm(dir, { recursive: true });
    await mkdir(dir);
    const storage = await mountPausable(dir, 256 * MiB);
    await runOk(requireTool('cp'), ['-a', '--sparse=always', `${saved}/.`, dir]);

    const daemon = await startDaemon({ dataDir, volumes: [] });
    await storage.pause();
    const completed: string[] = [];
    const failover = api(daemon, 'POST', '/v1/volumes/a/failover', { to: 'secondary' }).then((response) => {
      completed.push('a failover');
      return response;
    });
    // Awaited below; a failed assertion before that must not leave it unhandled.
    failover.catch(() => undefined);
    // The daemon logs the request as it hands it to the volume, which then waits on the hung storage.
    await daemon.logLine((line) => line.msg === 'failover requested' && line.volume === 'a');
    let timer: NodeJS.Timeout | undefined;
    const checkpoint = await Promise.race([
      api(daemon, 'POST', '/v1/volumes/b/checkpoint'),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`b's checkpoint did not complete within ${checkpointWaitMs} ms while a's storage hung`)), checkpointWaitMs);
      }),
    ]).finally(() => clearTimeout(timer));
    completed.push('b checkpoint');
    expect(checkpoint.status).toBe(200);
    expect(completed).toEqual(['b checkpoint']);
    expect((await api(daemon, 'GET', '/v1/volumes/a')).json.state).toBe('replicating');

    await storage.resume();
    const done = await failover;
    expect(done.status, done.text).toBe(200);
    expect(done.json).toMatchObject({ name: 'a', state: 'failed-over', failoverTarget: 'secondary' });
    expect(completed).toEqual(['b checkpoint', 'a failover']);
    expect((await daemon.stop()).code).toBe(0);
  });
});
