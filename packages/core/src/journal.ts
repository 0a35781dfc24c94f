import { crc32 } from 'node:zlib';
import { type BlockDevice, type WriteRun } from '@gannet/block-device';
import { GannetError } from './errors.js';
import type { BlockSource, FlushPlan, Geometry, Run } from './plan.js';
import type { JournalRef } from './state-file.js';
import type { Storage } from './storage.js';

/**
 * The failover journal: the final content of every block a failover keeps that is not yet in the backing
 * file, in one file written front to back and fdatasynced before the state file commits to it. The
 * journal is what makes the kept state atomic: a crash after the commit finds it whole and applies it
 * again; a crash before finds no commit, and the failover is reported lost.
 *
 * Layout (little-endian): a header of `headerBytes` (magic GANNETJ1, version, block size, volume size,
 * counts, the volume's uuid); the data blocks back to back, block i of the index at headerBytes + i *
 * blockBytes; the index (block numbers, then hole runs, then zero runs, as float64s), padded to the header
 * size; a footer (magic GANNETJE, the crc32 of header and index, the file size). The header size is a
 * whole number of blocks, so a data block's offset in blocks is headerBlocks + i: the reopened journal
 * serves reads as a layer whose entries point into the file (see BlockBuffers.journalLayer).
 */
export const journalFileName = 'failover.journal';
const headerBytesMin = 4096;
const magic = Buffer.from('GANNETJ1');
const footerMagic = Buffer.from('GANNETJE');
const version = 1;
/** Data blocks per batch handed to the journal file (the writer thread writes them in one go). */
export const journalBatchBlocksMax = 1024;

export interface JournalIndex {
  /** The data blocks, in journal order (sorted). */
  readonly blocks: Float64Array;
  readonly holeRuns: readonly Run[];
  readonly zeroRuns: readonly Run[];
  /** Blocks before the first data block (the header). */
  readonly headerBlocks: number;
}

function headerBytesOf(blockBytes: number): number {
  return Math.max(headerBytesMin, blockBytes);
}

function layout(geometry: Geometry, blockCount: number, runCount: number) {
  const headerBytes = headerBytesOf(geometry.blockBytes);
  const indexBytes = (blockCount + 2 * runCount) * 8;
  const indexPadded = Math.ceil(indexBytes / headerBytes) * headerBytes;
  const dataBytes = blockCount * geometry.blockBytes;
  return { headerBytes, indexBytes, indexAt: headerBytes + dataBytes, footerAt: headerBytes + dataBytes + indexPadded, total: headerBytes + dataBytes + indexPadded + headerBytes };
}

function header(geometry: Geometry, uuid: string, blocks: number, holeRuns: number, zeroRuns: number): Buffer {
  const out = Buffer.alloc(headerBytesOf(geometry.blockBytes));
  magic.copy(out, 0);
  out.writeUInt32LE(version, 8);
  out.writeUInt32LE(geometry.blockBytes, 12);
  out.writeDoubleLE(geometry.sizeBytes, 16);
  out.writeDoubleLE(blocks, 24);
  out.writeDoubleLE(holeRuns, 32);
  out.writeDoubleLE(zeroRuns, 40);
  out.write(uuid, 48, 36, 'ascii');
  return out;
}

function indexBytes(plan: Pick<FlushPlan, 'blocks' | 'holeRuns' | 'zeroRuns'>): Buffer {
  const values = new Float64Array(plan.blocks.length + 2 * (plan.holeRuns.length + plan.zeroRuns.length));
  values.set(plan.blocks, 0);
  let i = plan.blocks.length;
  for (const run of [...plan.holeRuns, ...plan.zeroRuns]) {
    values[i++] = run.first;
    values[i++] = run.count;
  }
  const out = Buffer.alloc(values.byteLength);
  for (let k = 0; k < values.length; k++) out.writeDoubleLE(values[k], k * 8);
  return out;
}

/**
 * Writes the journal of `plan` (data from `source`) to `path`, fdatasyncs it and makes its directory
 * entry durable. Returns the reference the state file commits to.
 */
export async function writeJournal(
  storage: Storage,
  path: string,
  dir: string,
  plan: Pick<FlushPlan, 'blocks' | 'holeRuns' | 'zeroRuns'>,
  source: BlockSource,
  geometry: Geometry,
  uuid: string,
): Promise<JournalRef> {
  const { blockBytes } = geometry;
  const at = layout(geometry, plan.blocks.length, plan.holeRuns.length + plan.zeroRuns.length);
  const head = header(geometry, uuid, plan.blocks.length, plan.holeRuns.length, plan.zeroRuns.length);
  const index = indexBytes(plan);
  const checksum = crc32(index, crc32(head));
  const footer = Buffer.alloc(at.headerBytes);
  footerMagic.copy(footer, 0);
  footer.writeUInt32LE(checksum, 8);
  footer.writeDoubleLE(at.total, 16);
  const file = await storage.createFile(path, at.total);
  try {
    await file.write(head, 0);
    for (let first = 0; first < plan.blocks.length; first += journalBatchBlocksMax) {
      const count = Math.min(journalBatchBlocksMax, plan.blocks.length - first);
      const buffers: Uint8Array[] = [];
      for (let i = first; i < first + count; i++) {
        const b = plan.blocks[i];
        const found = source(b);
        const data = found instanceof Promise ? await found : found;
        if (data === null) throw new GannetError('EIO', `journal: block ${b} has no data`);
        buffers.push(data.subarray(0, blockBytes));
      }
      const run: WriteRun = { offset: at.headerBytes + first * blockBytes, buffers };
      await file.writeBatch([run]);
    }
    await file.write(index, at.indexAt);
    await file.write(footer, at.footerAt);
    await file.flush();
  } finally {
    await file.close();
  }
  await storage.syncDirectory(dir);
  return { file: path.slice(dir.length + 1), bytes: at.total, checksum };
}

/**
 * Opens a committed journal and reads its index, checking it is the one the state file names (size,
 * checksum), of this volume and geometry. The device stays open: the journal is served as a layer.
 */
export async function openJournal(
  storage: Storage,
  path: string,
  ref: JournalRef,
  geometry: Geometry,
  uuid: string,
): Promise<{ device: BlockDevice; index: JournalIndex }> {
  let device: BlockDevice;
  try {
    device = await storage.openFile(path);
  } catch (err) {
    throw new GannetError('EMETA', `the failover journal ${path} the state file commits to cannot be opened: ${(err as Error).message}`, { cause: err });
  }
  try {
    const bad = (problem: string) => new GannetError('EMETA', `the failover journal ${path} is damaged: ${problem}`);
    if (device.size !== ref.bytes) throw bad(`it is ${device.size} bytes, the state file says ${ref.bytes}`);
    const headerBytes = headerBytesOf(geometry.blockBytes);
    const head = Buffer.alloc(headerBytes);
    await device.read(head, 0);
    if (!head.subarray(0, 8).equals(magic) || head.readUInt32LE(8) !== version) throw bad('no journal header');
    if (head.readUInt32LE(12) !== geometry.blockBytes || head.readDoubleLE(16) !== geometry.sizeBytes) throw bad('it is of another geometry');
    if (head.toString('ascii', 48, 84) !== uuid) throw bad('it belongs to another volume');
    const blockCount = head.readDoubleLE(24);
    const holeCount = head.readDoubleLE(32);
    const zeroCount = head.readDoubleLE(40);
    const counts = [blockCount, holeCount, zeroCount];
    if (!counts.every((n) => Number.isSafeInteger(n) && n >= 0)) throw bad('bad counts');
    const at = layout(geometry, blockCount, holeCount + zeroCount);
    if (at.total !== ref.bytes) throw bad('its counts do not match its size');
    const index = Buffer.alloc(at.indexBytes);
    await device.read(index, at.indexAt);
    const footer = Buffer.alloc(headerBytes);
    await device.read(footer, at.footerAt);
    const checksum = crc32(index, crc32(head));
    if (!footer.subarray(0, 8).equals(footerMagic) || footer.readUInt32LE(8) !== checksum || checksum !== ref.checksum) {
      throw bad('its checksum does not match');
    }
    const values = new Float64Array(index.length / 8);
    for (let k = 0; k < values.length; k++) values[k] = index.readDoubleLE(k * 8);
    const runs = (from: number, count: number): Run[] =>
      Array.from({ length: count }, (_, r) => ({ first: values[from + 2 * r], count: values[from + 2 * r + 1] }));
    return {
      device,
      index: {
        blocks: values.slice(0, blockCount),
        holeRuns: runs(blockCount, holeCount),
        zeroRuns: runs(blockCount + 2 * holeCount, zeroCount),
        headerBlocks: headerBytes / geometry.blockBytes,
      },
    };
  } catch (err) {
    await device.close().catch(() => undefined);
    throw err;
  }
}
