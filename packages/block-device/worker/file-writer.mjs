// The writer thread of a FileDevice: writes the runs of a batch with synchronous pwritev, so the event
// loop of the main thread pays one message per batch instead of one callback per run. Plain JavaScript
// (not TypeScript) so it loads the same from src and dist. Jobs arrive and are answered in order.
//
// A job: { id, fd, sabs: SharedArrayBuffer[], plan: Float64Array }. The plan is, per run:
//   fileOffset, partCount, then partCount triples (sabIndex, byteOffset, length).
import fs from 'node:fs';
import { parentPort } from 'node:worker_threads';

/** Entries per pwritev call (IOV_MAX on Linux). */
const iovecCountMax = 1024;

function writeAll(fd, parts, position) {
  let pending = parts;
  let pos = position;
  while (pending.length > 0) {
    const batch = pending.length > iovecCountMax ? pending.slice(0, iovecCountMax) : pending;
    let want = 0;
    for (const p of batch) want += p.byteLength;
    let n = fs.writevSync(fd, batch, pos);
    if (n <= 0) throw Object.assign(new Error(`write made no progress at ${pos}`), { code: 'EIO' });
    pos += n;
    if (n === want) {
      pending = pending.slice(batch.length);
      continue;
    }
    const rest = [];
    for (const p of pending) {
      if (n >= p.byteLength) n -= p.byteLength;
      else {
        rest.push(n > 0 ? p.subarray(n) : p);
        n = 0;
      }
    }
    pending = rest;
  }
}

parentPort.on('message', (job) => {
  try {
    const { fd, sabs, plan } = job;
    for (let i = 0; i < plan.length; ) {
      const fileOffset = plan[i++];
      const count = plan[i++];
      const parts = [];
      for (let k = 0; k < count; k++, i += 3) parts.push(new Uint8Array(sabs[plan[i]], plan[i + 1], plan[i + 2]));
      writeAll(fd, parts, fileOffset);
    }
    parentPort.postMessage({ id: job.id });
  } catch (err) {
    parentPort.postMessage({ id: job.id, error: { code: err?.code ?? 'EIO', message: err?.message ?? String(err) } });
  }
});
