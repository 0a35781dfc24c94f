import { createHash } from 'node:crypto';
import type { BlockDevice } from '@gannet/block-device';
import { GannetError } from './errors.js';
import { digestBytes, digestChunkBytes, digestChunksPerCallMax } from './link.js';

/** The digest of one chunk (sha256 truncated to digestBytes). */
export function chunkDigest(data: Uint8Array): Buffer {
  return createHash('sha256').update(data).digest().subarray(0, digestBytes);
}

/**
 * Checks a digests request against a disk of `sizeBytes`: chunk-aligned offset, a length that ends on a
 * chunk boundary or at the end of the disk, at most digestChunksPerCallMax chunks. Names the field.
 */
export function checkDigestRange(offset: number, length: number, sizeBytes: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || offset % digestChunkBytes !== 0) {
    throw new GannetError('EOPTIONS', `offset: must be a non-negative multiple of ${digestChunkBytes}, not ${offset}`);
  }
  if (!Number.isSafeInteger(length) || length <= 0 || offset + length > sizeBytes) {
    throw new GannetError('EOPTIONS', `length: must be positive and end within the disk (${sizeBytes} bytes), not ${length} at ${offset}`);
  }
  if ((offset + length) % digestChunkBytes !== 0 && offset + length !== sizeBytes) {
    throw new GannetError('EOPTIONS', `length: must end on a ${digestChunkBytes}-byte boundary or at the end of the disk`);
  }
  if (Math.ceil(length / digestChunkBytes) > digestChunksPerCallMax) {
    throw new GannetError('EOPTIONS', `length: at most ${digestChunksPerCallMax} chunks of ${digestChunkBytes} bytes per call, not ${length} bytes`);
  }
}

/** The digests of `device` over a checked range, read a chunk at a time. */
export async function deviceDigests(device: BlockDevice, offset: number, length: number): Promise<Uint8Array> {
  checkDigestRange(offset, length, device.size);
  const chunks = Math.ceil(length / digestChunkBytes);
  const out = Buffer.alloc(chunks * digestBytes);
  const buf = Buffer.allocUnsafe(digestChunkBytes);
  for (let i = 0; i < chunks; i++) {
    const at = offset + i * digestChunkBytes;
    const piece = buf.subarray(0, Math.min(digestChunkBytes, offset + length - at));
    await device.read(piece, at);
    chunkDigest(piece).copy(out, i * digestBytes);
  }
  return out;
}
