/**
 * Goal: one client cannot make the daemon run unbounded range operations or start processes (issue 11,
 * item 3: after failover, 2,000 pipelined 1 MiB WRITE_ZEROES ran 1,944 `fallocate` children at once).
 * Zero and trim punch holes in place (FileDevice, through fs-native-extensions), at most a few at once
 * per file, and the data reads back as zeroes.
 *
 * Method: a real daemon with a preload (helpers/count-trim.mjs) that wraps the hole punch it uses and
 * reports, when the daemon exits, how many ran and the most at once. The volume is failed over (so
 * writes reach the backing file), its first 64 MiB filled with a pattern, and then one raw connection
 * sends 2,000 WRITE_ZEROES of 1 MiB back to back without waiting. While they run, the daemon's
 * children are read from /proc/PID/task/TID/children (a measurement; nothing waits on it). Checked:
 * every request answered with success, no child process ever, punches at once <= rangeOpsInFlightMax,
 * and the zeroed ranges read back as zeroes.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { rangeOpsInFlightMax } from '@gannet/block-device';
import { buildRequest, CMD_WRITE_ZEROES, NbdClient } from 'nbd-server-js';
import { afterEach, describe, expect, it } from 'vitest';
import { api, makeTempDir, startDaemon, stopAll } from './helpers/daemon.js';
import { negotiate, RawConn, readReply } from './helpers/raw-nbd.js';

const MiB = 1024 * 1024;
const requests = 2_000;
const zeroBytes = 1 * MiB;
const volumeBytes = 2_048 * MiB;
/** The patterned prefix; the storm zeroes it all and 1,936 MiB of holes beyond. */
const patternBytes = 64 * MiB;
const childSampleMs = 20;
const countTrim = fileURLToPath(new URL('./helpers/count-trim.mjs', import.meta.url));

afterEach(stopAll);

/** Child processes of `pid`, over all its threads (a child belongs to the thread that forked it). */
async function childCount(pid: number): Promise<number> {
  let count = 0;
  for (const tid of await readdir(`/proc/${pid}/task`).catch(() => [])) {
    const text = await readFile(`/proc/${pid}/task/${tid}/children`, 'utf8').catch(() => '');
    count += text.split(' ').filter((s) => s.trim() !== '').length;
  }
  return count;
}

describe('WRITE_ZEROES storm after failover', () => {
  it(`${requests} pipelined 1 MiB WRITE_ZEROES: no child process, at most ${rangeOpsInFlightMax} punches at once, zeroes read back`, async () => {
    const countFile = join(await makeTempDir('gannet-trim-'), 'trim.json');
    const daemon = await startDaemon({
      volumes: [`vol0:${volumeBytes / MiB}M`],
      nodeArgs: ['--import', countTrim],
      env: { GANNET_TRIM_COUNT_FILE: countFile },
    });
    const failover = await api(daemon, 'POST', '/v1/volumes/vol0/failover', { to: 'secondary' });
    expect(failover.status, failover.text).toBe(200);

    const client = await NbdClient.connect(daemon.nbd, { exportName: 'vol0/secondary' });
    const pattern = Buffer.alloc(patternBytes, 0xa7);
    await client.write(pattern, 0);
    await client.flush();

    const c = await RawConn.connect(daemon.nbd);
    await negotiate(c, { exportName: 'vol0/secondary' });
    let childrenMax = 0;
    let sampling = true;
    const sampler = (async () => {
      while (sampling) {
        childrenMax = Math.max(childrenMax, await childCount(daemon.child.pid!));
        await new Promise((resolve) => setTimeout(resolve, childSampleMs));
      }
    })();
    const storm = Buffer.concat(
      Array.from({ length: requests }, (_, i) => buildRequest({ type: CMD_WRITE_ZEROES, cookie: i + 1, offset: i * zeroBytes, length: zeroBytes })),
    );
    await c.write(storm);
    const partial = new Map();
    const errors: number[] = [];
    for (let i = 0; i < requests; i++) {
      const reply = await readReply(c, () => undefined, partial);
      if (reply.error !== 0) errors.push(reply.error);
    }
    sampling = false;
    await sampler;
    expect(errors).toEqual([]);

    // The zeroed ranges read back as zeroes: the patterned prefix, and the end of the storm.
    const zeroed = await client.readBytes(0, patternBytes);
    expect(zeroed.equals(Buffer.alloc(patternBytes)), 'the patterned prefix reads as zeroes').toBe(true);
    const last = await client.readBytes((requests - 1) * zeroBytes, zeroBytes);
    expect(last.equals(Buffer.alloc(zeroBytes))).toBe(true);
    await client.flush();
    await client.close();
    c.destroy();

    await daemon.stop();
    const counted = JSON.parse(await readFile(countFile, 'utf8')) as { calls: number; runningMax: number };
    process.stdout.write(`zero storm: ${JSON.stringify({ requests, punches: counted.calls, punchesAtOnceMax: counted.runningMax, childrenMax })}\n`);
    expect(childrenMax).toBe(0);
    expect(counted.calls, 'the storm reached the hole punch').toBeGreaterThan(0);
    expect(counted.runningMax).toBeLessThanOrEqual(rangeOpsInFlightMax);
  }, 120_000);
});
