/** Byte units, one set for the whole project, and the one size grammar of its flags and config files. */

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;
export const PiB = 1024 * TiB;

const unitBytes: Readonly<Record<string, number>> = { '': 1, K: KiB, M: MiB, G: GiB, T: TiB, P: PiB };

/**
 * Parses `4096`, `4096B`, `64K`, `64KiB`, `512M`, `1G`, `1GiB`, `2T`, `1P` (binary units, case-blind)
 * into bytes. Returns undefined when the text is not a size or the result is not a safe integer.
 */
export function parseSize(text: string): number | undefined {
  const match = /^(\d+)\s*(?:([KMGTP])(?:i?B)?|B)?$/i.exec(text.trim());
  if (!match) return undefined;
  const bytes = Number(match[1]) * unitBytes[(match[2] ?? '').toUpperCase()];
  return Number.isSafeInteger(bytes) ? bytes : undefined;
}

/** Largest piece of zeroes handed to a write; every zero write in the project shares one such buffer. */
export const zeroChunkBytes = 1 * MiB;

let zeroChunk: Buffer | undefined;

/**
 * `length` (at most zeroChunkBytes) zero bytes from the one shared buffer. It is only ever passed to
 * writes, which read it, so it stays zero.
 */
export function zeroes(length: number): Buffer {
  zeroChunk ??= Buffer.alloc(zeroChunkBytes);
  return length === zeroChunkBytes ? zeroChunk : zeroChunk.subarray(0, length);
}
