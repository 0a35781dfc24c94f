import type { ByteRange } from './types.js';

/** Sorted, merged copy of `ranges` (touching ranges merge). */
export function mergeRanges(ranges: readonly ByteRange[]): ByteRange[] {
  const sorted = [...ranges].filter((r) => r.length > 0).sort((a, b) => a.offset - b.offset);
  const out: { offset: number; length: number }[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last !== undefined && r.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, r.offset + r.length - last.offset);
    } else {
      out.push({ offset: r.offset, length: r.length });
    }
  }
  return out;
}

/** `ranges` minus `cut`: the parts of `ranges` no range of `cut` covers. Both may be unsorted. */
export function subtractRanges(ranges: readonly ByteRange[], cut: readonly ByteRange[]): ByteRange[] {
  const cuts = mergeRanges(cut);
  const out: ByteRange[] = [];
  for (const r of mergeRanges(ranges)) {
    let start = r.offset;
    const end = r.offset + r.length;
    for (const c of cuts) {
      const cEnd = c.offset + c.length;
      if (cEnd <= start || c.offset >= end) continue;
      if (c.offset > start) out.push({ offset: start, length: c.offset - start });
      start = Math.max(start, cEnd);
      if (start >= end) break;
    }
    if (start < end) out.push({ offset: start, length: end - start });
  }
  return out;
}

/** Ranges as little-endian float64 pairs (offsets are safe integers, exact in a double). */
export function encodeRanges(ranges: readonly ByteRange[]): Buffer {
  const out = Buffer.alloc(ranges.length * 16);
  ranges.forEach((r, i) => {
    out.writeDoubleLE(r.offset, i * 16);
    out.writeDoubleLE(r.length, i * 16 + 8);
  });
  return out;
}

export function decodeRanges(bytes: Uint8Array | undefined): ByteRange[] {
  if (bytes === undefined) return [];
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out: ByteRange[] = [];
  for (let i = 0; i + 16 <= buf.length; i += 16) {
    out.push({ offset: buf.readDoubleLE(i), length: buf.readDoubleLE(i + 8) });
  }
  return out;
}
