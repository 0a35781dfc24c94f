import type { DaemonHandle } from './daemon.js';

/**
 * A subscription to the daemon's Server-Sent Events (GET /v1/events), read frame by frame: tests wait for
 * an event instead of polling the status. Frames that arrive before a `next` call are kept for it.
 */

export const eventTimeoutMs = 20_000;

export interface DaemonEvent {
  event: string;
  data: Record<string, any>;
}

export interface EventStream {
  /** The first event from the subscription on (not yet consumed) that `match` accepts. */
  next(match: (event: DaemonEvent) => boolean, timeoutMs?: number): Promise<DaemonEvent>;
  close(): Promise<void>;
}

export async function subscribe(daemon: DaemonHandle, volume?: string): Promise<EventStream> {
  const query = volume === undefined ? '' : `?volume=${encodeURIComponent(volume)}`;
  const response = await fetch(`${daemon.controlUrl}/v1/events${query}`, { headers: { authorization: `Bearer ${daemon.token}` } });
  if (response.status !== 200 || response.body === null) throw new Error(`GET /v1/events: HTTP ${response.status}`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const seen: DaemonEvent[] = [];
  let buffered = '';
  let ended = false;
  /** Reads one chunk into `seen`; false once the stream ended. */
  const readMore = async (): Promise<boolean> => {
    const { value, done } = await reader.read();
    if (done) {
      ended = true;
      return false;
    }
    buffered += decoder.decode(value, { stream: true });
    let end: number;
    while ((end = buffered.indexOf('\n\n')) !== -1) {
      const frame = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      const event = /^event: (.+)$/m.exec(frame)?.[1];
      const data = /^data: (.+)$/m.exec(frame)?.[1];
      if (event !== undefined && data !== undefined) seen.push({ event, data: JSON.parse(data) });
    }
    return true;
  };
  let reading: Promise<boolean> | null = null;
  return {
    async next(match, timeoutMs = eventTimeoutMs) {
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`no matching event within ${timeoutMs} ms; saw ${JSON.stringify(seen)}`)), timeoutMs);
      });
      try {
        for (;;) {
          const index = seen.findIndex(match);
          if (index !== -1) return seen.splice(index, 1)[0];
          if (ended) throw new Error(`the event stream ended; saw ${JSON.stringify(seen)}`);
          reading ??= readMore().finally(() => {
            reading = null;
          });
          await Promise.race([reading, timeout]);
        }
      } finally {
        clearTimeout(timer);
      }
    },
    async close() {
      await reader.cancel().catch(() => undefined);
    },
  };
}
