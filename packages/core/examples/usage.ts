import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ReplicatedVolume } from '@gannet/core';

const dir = await mkdtemp(join(tmpdir(), 'gannet-example-'));
const path = join(dir, 'disk.img');

// One replicated disk: the backing file is created sparse, metadata and a state file go to dataDir.
const volume = await ReplicatedVolume.open({ path, sizeBytes: 16 * 1024 * 1024, dataDir: join(dir, 'meta') });
volume.on('flushed', ({ epoch, bytes }) => console.log(`epoch ${epoch} durable (${bytes} bytes written)`));

// The primary VM's writes arrive on the primary view, the secondary VM's on the secondary view.
await volume.primary.write(Buffer.from('written by the primary VM'), 4096);
await volume.secondary.write(Buffer.from('written by the secondary'), 4096);

const seen = Buffer.alloc(25);
await volume.secondary.read(seen, 4096);
assert.equal(seen.subarray(0, 24).toString(), 'written by the secondary');

// A checkpoint seals the primary's writes and drops the secondary's: both views now agree.
const epoch = await volume.checkpoint();
await volume.secondary.read(seen, 4096);
assert.equal(seen.toString(), 'written by the primary VM');

// The primary host dies: fail over to the secondary (COLO). Its writes since the checkpoint are kept:
// the secondary view serves them at once, and a FLUSH returns once they are in the backing file.
await volume.secondary.write(Buffer.from('after the checkpoint'), 8192);
await volume.failover({ to: 'secondary' });
await volume.secondary.flush();
const disk = await readFile(path);
assert.equal(disk.subarray(4096, 4121).toString(), 'written by the primary VM');
assert.equal(disk.subarray(8192, 8212).toString(), 'after the checkpoint');
console.log(volume.stats().state, 'after epoch', epoch); // failed-over after epoch 1

await volume.close();
await rm(dir, { recursive: true, force: true });
