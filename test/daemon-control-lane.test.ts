/**
 * Goal: the control API answers while NBD traffic keeps the daemon's main thread busy, and the priority
 * lane is what answers it: the main thread serves control calls between NBD request batches, not only
 * when its event loop comes round. Also: a control thread that crashes is started again on the same
 * addresses, and one that keeps crashing is given up, which the daemon must hear of.
 *
 * Method: a real daemon; an NbdClient keeps many 4 KiB writes pipelined on vol0/primary while the test
 * checkpoints through the HTTP API, each call returning the next epoch. The daemon counts the calls its
 * main thread served by lane in /metrics (gannet_control_calls_total): before any NBD traffic every call
 * is served by the event loop, under traffic the data path's check must have served some. No timing is
 * asserted (latency is measured by benchmarks). The crash handling is driven with a stand-in control
 * thread (helpers/crashing-control-worker.mjs) that crashes when told to.
 */
import { randomBytes } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { NbdClient } from 'nbd-server-js';
import { ControlThread, controlRestartsMax, type ControlOperations, type ControlThreadOptions, type VolumeView } from '@gannet/server';
import { api, startDaemon, stopAll, type DaemonHandle } from './helpers/daemon.js';

const blockBytes = 4096;
const volumeBytes = 64 * 1024 * 1024;
/** Writes kept in flight: enough that the daemon always has a batch to read. */
const writesInFlight = 128;
/** Checkpoints tried before concluding that the data path never served one. */
const checkpointCallsMax = 2000;
/** /metrics is read after this many checkpoints, to stop as soon as the lane was seen. */
const metricsEveryCalls = 25;

afterEach(stopAll);

async function laneCounts(daemon: DaemonHandle): Promise<{ dataPath: number; eventLoop: number }> {
  const { status, text } = await api(daemon, 'GET', '/metrics');
  expect(status).toBe(200);
  const count = (lane: string) => {
    const match = new RegExp(`^gannet_control_calls_total\\{lane="${lane}"\\} (\\d+)$`, 'm').exec(text);
    if (!match) throw new Error(`no gannet_control_calls_total for lane ${lane} in /metrics`);
    return Number(match[1]);
  };
  return { dataPath: count('data-path'), eventLoop: count('event-loop') };
}

/** Keeps `writesInFlight` random 4 KiB writes outstanding until stopped; resolves with the count. */
function keepWriting(client: NbdClient): { stop(): Promise<number> } {
  let stopping = false;
  let written = 0;
  const payload = randomBytes(blockBytes);
  const loop = async () => {
    while (!stopping) {
      await client.write(payload, Math.floor(Math.random() * (volumeBytes / blockBytes)) * blockBytes);
      written += 1;
    }
  };
  const loops = Array.from({ length: writesInFlight }, loop);
  return {
    async stop() {
      stopping = true;
      await Promise.all(loops);
      return written;
    },
  };
}

describe('the control lane', () => {
  it('checkpoints through the API while NBD writes keep the main thread busy, served between request batches', async () => {
    const daemon = await startDaemon();
    // No NBD connection yet: nothing runs the data path's check, so the event loop serves every call.
    const idle = await laneCounts(daemon);
    expect(idle.dataPath).toBe(0);
    expect(idle.eventLoop).toBeGreaterThan(0);

    let epoch = (await api(daemon, 'GET', '/v1/volumes/vol0')).json.epoch as number;
    const client = await NbdClient.connect(daemon.nbd, { exportName: 'vol0/primary' });
    const writer = keepWriting(client);
    let busy = idle;
    try {
      for (let call = 1; call <= checkpointCallsMax && busy.dataPath === 0; call++) {
        const checkpoint = await api(daemon, 'POST', '/v1/volumes/vol0/checkpoint');
        expect(checkpoint.status).toBe(200);
        expect(checkpoint.json).toEqual({ epoch: epoch + 1, durableEpoch: expect.any(Number), instance: expect.any(String) });
        epoch += 1;
        if (call % metricsEveryCalls === 0) busy = await laneCounts(daemon);
      }
    } finally {
      const written = await writer.stop();
      await client.close();
      expect(written).toBeGreaterThan(0);
    }
    busy = await laneCounts(daemon);
    expect(busy.dataPath).toBeGreaterThan(0);
    const view = (await api(daemon, 'GET', '/v1/volumes/vol0')).json;
    expect(view).toMatchObject({ state: 'replicating', epoch });
    expect((await daemon.stop()).code).toBe(0);
  });
});

interface LogLine {
  level: string;
  message: string;
}

/** Enough of pino's Logger for ControlThread, keeping what it logged. */
function recordingLogger(lines: LogLine[], onLine: () => void): ControlThreadOptions['logger'] {
  const at = (level: string) => (_fields: unknown, message: string) => {
    lines.push({ level, message });
    onLine();
  };
  return { fatal: at('fatal'), error: at('error'), warn: at('warn'), info: at('info'), debug: at('debug') } as unknown as ControlThreadOptions['logger'];
}

describe('the control thread', () => {
  it('is started again on the same addresses after a crash, and given up after crashing too often', async () => {
    const lines: LogLine[] = [];
    let waiters: (() => void)[] = [];
    const logged = async (level: string, message: string, count: number) => {
      const seen = () => lines.filter((line) => line.level === level && line.message.includes(message)).length >= count;
      while (!seen()) await new Promise<void>((resolve) => waiters.push(resolve));
    };
    const logger = recordingLogger(lines, () => {
      const woken = waiters;
      waiters = [];
      for (const wake of woken) wake();
    });
    const prepared: unknown[] = [];
    const view = { name: 'vol0' } as VolumeView;
    const operations: ControlOperations = {
      volumes: () => [view],
      volume: () => view,
      checkpoint: async () => [],
      failover: async () => view,
      metricsText: async () => ({ contentType: 'text/plain', text: '' }),
    };
    const listen = [{ host: '127.0.0.1', port: 1 }, { path: '/nonexistent/control.sock' }];
    const thread = await ControlThread.start({
      token: 'x'.repeat(32),
      bodyBytesMax: 1024,
      connectionsMax: 128,
      listen,
      operations,
      logger,
      served: () => {},
      prepare: async (addresses) => {
        prepared.push(addresses);
      },
      entry: new URL('./helpers/crashing-control-worker.mjs', import.meta.url),
    });
    try {
      expect(thread.addresses).toEqual(listen);
      let gaveUp = false;
      void thread.failed.then(() => {
        gaveUp = true;
      });
      for (let crash = 1; crash <= controlRestartsMax; crash++) {
        thread.publish('error', 'crash', {});
        await logged('warn', 'control thread restarted', crash);
        expect(gaveUp).toBe(false);
      }
      // Each restart removed stale sockets first and listened where the first thread had.
      expect(prepared).toEqual(Array.from({ length: controlRestartsMax + 1 }, () => listen));
      expect(lines.filter((line) => line.level === 'error' && line.message.includes('crashed'))).toHaveLength(controlRestartsMax);
      thread.publish('error', 'crash', {});
      const why = await thread.failed;
      expect(why.message).toMatch(new RegExp(`crashed ${controlRestartsMax + 1} times`));
      expect(lines.some((line) => line.level === 'fatal')).toBe(true);
    } finally {
      await thread.terminate();
    }
  });
});
