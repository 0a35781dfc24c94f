/**
 * Progress on stderr: one line per step; on a TTY a live line is redrawn in place while a step runs
 * (at most every `liveIntervalMs`), and wiped before the next step's line.
 */

export const liveIntervalMs = 250;

export class Progress {
  private readonly stream: NodeJS.WriteStream;
  private readonly tty: boolean;
  private readonly quiet: boolean;
  private liveShown = false;
  private lastLive = 0;

  constructor(options: { stream?: NodeJS.WriteStream; quiet?: boolean } = {}) {
    this.stream = options.stream ?? process.stderr;
    this.tty = this.stream.isTTY === true;
    this.quiet = options.quiet === true;
  }

  line(text: string): void {
    if (this.quiet) return;
    this.clearLive();
    this.stream.write(`${text}\n`);
  }

  /** A transient status line (TTY only); cheap to call often. */
  live(text: string): void {
    if (this.quiet || !this.tty) return;
    const now = performance.now();
    if (now - this.lastLive < liveIntervalMs) return;
    this.lastLive = now;
    const columns = this.stream.columns ?? 100;
    this.stream.write(`\r\x1b[2K${text.slice(0, Math.max(10, columns - 1))}`);
    this.liveShown = true;
  }

  clearLive(): void {
    if (!this.liveShown) return;
    this.stream.write('\r\x1b[2K');
    this.liveShown = false;
  }
}
