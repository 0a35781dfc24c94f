/**
 * A cursor over the chunks a socket delivers. Fields that sit inside one chunk are handed out as
 * `subarray` views (valid only until the next `push`, callers decode them at once); only a field that
 * spans chunks is copied. Bulk payloads are copied straight into their destination with `copyInto`.
 */
export class ChunkCursor {
  private readonly chunks: Buffer[] = [];
  /** Read position inside chunks[0]. */
  private head = 0;
  private availableBytes = 0;

  get available(): number {
    return this.availableBytes;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.availableBytes += chunk.length;
  }

  /** The next `n` bytes (n <= available), consumed. A view when one chunk holds them, else a copy. */
  take(n: number): Buffer {
    if (n > this.availableBytes) throw new RangeError(`take(${n}) with ${this.availableBytes} bytes available`);
    const first = this.chunks[0];
    if (n === 0) return Buffer.alloc(0);
    if (first.length - this.head >= n) {
      const view = first.subarray(this.head, this.head + n);
      this.advance(n);
      return view;
    }
    const out = Buffer.allocUnsafe(n);
    this.copyInto(out, 0, n);
    return out;
  }

  /** Reads a big-endian uint32 at `at` bytes ahead without consuming (at + 4 <= available). */
  peekUInt32BE(at: number): number {
    if (at + 4 > this.availableBytes) throw new RangeError(`peek past the available bytes`);
    let value = 0;
    let pos = this.head + at;
    let i = 0;
    for (let k = 0; k < 4; k++) {
      while (pos >= this.chunks[i].length) {
        pos -= this.chunks[i].length;
        i++;
      }
      value = value * 256 + this.chunks[i][pos];
      pos++;
    }
    return value;
  }

  /** Copies up to `n` bytes into dest[destOffset...], consuming them; returns how many were copied. */
  copyInto(dest: Uint8Array, destOffset: number, n: number): number {
    let copied = 0;
    while (copied < n && this.availableBytes > 0) {
      const first = this.chunks[0];
      const step = Math.min(n - copied, first.length - this.head);
      dest.set(first.subarray(this.head, this.head + step), destOffset + copied);
      copied += step;
      this.advance(step);
    }
    return copied;
  }

  /** Discards up to `n` bytes; returns how many were discarded. */
  skip(n: number): number {
    let skipped = 0;
    while (skipped < n && this.availableBytes > 0) {
      const step = Math.min(n - skipped, this.chunks[0].length - this.head);
      skipped += step;
      this.advance(step);
    }
    return skipped;
  }

  /** Hands over every unread byte (the handshake passes leftovers to the transmission parser). */
  drain(): Buffer[] {
    const rest = this.chunks.splice(0);
    if (rest.length > 0) rest[0] = rest[0].subarray(this.head);
    this.head = 0;
    this.availableBytes = 0;
    return rest;
  }

  private advance(n: number): void {
    this.head += n;
    this.availableBytes -= n;
    if (this.head === this.chunks[0].length) {
      this.chunks.shift();
      this.head = 0;
    }
  }
}
