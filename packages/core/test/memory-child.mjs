/**
 * Child program of memory.test.ts: writes `totalBytes` of distinct patterned data into the primary view
 * of a volume whose memoryBytesMax is far smaller, with no checkpoint, then reads every byte back and
 * checks it. Prints one JSON line with what the parent asserts: the peak anonymous RSS (RssAnon +
 * RssShmem, sampled after every MiB written or read), which is the memory the process itself holds, and
 * the kernel's peak total RSS (VmHWM), which also counts the file pages LevelDB maps to read its tables.
 * Usage: node memory-child.mjs <dir> <memoryBytesMax> <totalBytes>
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

const writeBytes = 64 * 1024;
const readBytes = 1024 * 1024;
/** Writes in flight at once, as a guest's queue would keep them. */
const writeDepth = 8;

/** Every 4-byte word holds its own absolute offset / 4, xor a salt: no two words on the volume alike. */
const salt = 0x5a17c0de;
function pattern(buf, offset) {
  const words = new Uint32Array(buf.buffer, buf.byteOffset, buf.length / 4);
  const first = offset / 4;
  for (let i = 0; i < words.length; i++) words[i] = (first + i) ^ salt;
}

function statusBytes(status, field) {
  const m = new RegExp(`^${field}:\\s+(\\d+)\\s+kB$`, 'm').exec(status);
  if (!m) throw new Error(`no ${field} in /proc/self/status`);
  return Number(m[1]) * 1024;
}

let peakAnon = 0;
/** Private memory now (anonymous + shared-memory pages), folded into the running peak. */
function sampleAnon() {
  const status = readFileSync('/proc/self/status', 'utf8');
  const anon = statusBytes(status, 'RssAnon') + statusBytes(status, 'RssShmem');
  peakAnon = Math.max(peakAnon, anon);
  return anon;
}

const peakRssBytes = () => statusBytes(readFileSync('/proc/self/status', 'utf8'), 'VmHWM');
const sampleEveryBytes = 1024 * 1024;

async function main([dir, limitText, totalText]) {
  const memoryBytesMax = Number(limitText);
  const totalBytes = Number(totalText);
  if (!dir || totalBytes % readBytes !== 0) throw new Error('usage: memory-child.mjs <dir> <memoryBytesMax> <totalBytes (MiB multiple)>');
  const { openVolume } = await import('@gannet/core');
  const vol = await openVolume({ path: join(dir, 'disk.img'), dataDir: join(dir, 'meta'), sizeBytes: totalBytes, memoryBytesMax });
  let pressure = 0;
  const errors = [];
  vol.on('pressure', () => pressure++);
  vol.on('error', (err) => errors.push(String(err)));
  const anonBaseline = sampleAnon();

  const started = performance.now();
  let next = 0;
  const writer = async () => {
    const buf = new Uint8Array(writeBytes);
    while (next < totalBytes) {
      const offset = next;
      next += writeBytes;
      pattern(buf, offset);
      await vol.primary.write(buf, offset);
      if ((offset + writeBytes) % sampleEveryBytes === 0) sampleAnon();
    }
  };
  await Promise.all(Array.from({ length: writeDepth }, writer));
  const writeMs = performance.now() - started;
  const afterWrite = vol.stats();
  const anonPeakWrite = peakAnon;

  const readStarted = performance.now();
  const got = new Uint8Array(readBytes);
  const want = new Uint8Array(readBytes);
  let firstMismatch = -1;
  for (let offset = 0; offset < totalBytes && firstMismatch < 0; offset += readBytes) {
    await vol.primary.read(got, offset);
    sampleAnon();
    pattern(want, offset);
    if (!Buffer.from(got.buffer).equals(Buffer.from(want.buffer))) {
      for (let i = 0; i < readBytes; i++) {
        if (got[i] !== want[i]) {
          firstMismatch = offset + i;
          break;
        }
      }
    }
  }
  const readMs = performance.now() - readStarted;
  // The secondary view must not see any of it (no checkpoint): spot-check its first and last MiB.
  let secondaryLeak = -1;
  for (const offset of [0, totalBytes - readBytes]) {
    await vol.secondary.read(got, offset);
    const at = got.findIndex((b) => b !== 0);
    if (at >= 0 && secondaryLeak < 0) secondaryLeak = offset + at;
  }
  await vol.close();
  process.stdout.write(
    `${JSON.stringify({
      memoryBytesMax,
      totalBytes,
      pressure,
      errors,
      bufferedBytes: afterWrite.bufferedBytes,
      spilledBytes: afterWrite.spilledBytes,
      anonBaseline,
      anonPeakWrite,
      anonPeak: peakAnon,
      peakRss: peakRssBytes(),
      firstMismatch,
      secondaryLeak,
      writeMs: Math.round(writeMs),
      readMs: Math.round(readMs),
    })}\n`,
  );
}

main(process.argv.slice(2)).catch((err) => {
  process.stderr.write(`memory-child: ${err?.stack ?? err}\n`);
  process.exit(2);
});
