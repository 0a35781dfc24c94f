import type { ServerResponse } from 'node:http';
import { MiB } from '@gannet/block-device';

/**
 * Server-Sent Events fan-out. Volume events are small and rare (checkpoints, flushes, pressure,
 * failover, errors, volumes added and removed, and on a primary: link and state changes, resyncs), so each subscriber gets a plain stream; a subscriber that stops reading is cut off
 * once its unsent backlog passes `sseBacklogBytesMax`, so a stuck client cannot grow the daemon's memory.
 */

export const sseSubscribersMax = 64;
export const sseBacklogBytesMax = MiB;
export const sseHeartbeatMs = 15_000;

export type EventName =
  | 'checkpoint'
  | 'flushed'
  | 'pressure'
  | 'failover'
  | 'failover-durable'
  | 'failover-applied'
  // Both sides of a volume wrote since they split (either role): both generations.
  | 'split-brain'
  | 'error'
  | 'volume-added'
  | 'volume-removed'
  // A primary daemon's volumes: the link to the peer, the volume's state, the peer's durable epoch, resyncs.
  | 'link'
  | 'state'
  | 'durable'
  | 'resync-start'
  | 'resync-done'
  // A volume changed role (promote, demote, resolve).
  | 'role-changed'
  // Daemon-wide (empty volume, only to subscribers of every volume): NBD connections refused or dropped.
  | 'nbd-limits';

interface Subscriber {
  readonly res: ServerResponse;
  readonly volume?: string;
}

export class EventHub {
  private readonly subscribers = new Set<Subscriber>();
  private nextId = 1;
  private readonly heartbeat: NodeJS.Timeout;

  constructor() {
    // Comments keep proxies and idle-timeouts from closing quiet streams.
    this.heartbeat = setInterval(() => {
      for (const subscriber of this.subscribers) this.write(subscriber, ': keep-alive\n\n');
    }, sseHeartbeatMs);
    this.heartbeat.unref();
  }

  get size(): number {
    return this.subscribers.size;
  }

  /** Takes over the response; returns false when the subscriber limit is reached (nothing was written). */
  subscribe(res: ServerResponse, volume?: string): boolean {
    if (this.subscribers.size >= sseSubscribersMax) return false;
    const subscriber: Subscriber = { res, volume };
    res.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache',
      connection: 'keep-alive',
      'x-accel-buffering': 'no',
    });
    res.flushHeaders();
    this.subscribers.add(subscriber);
    res.on('close', () => this.subscribers.delete(subscriber));
    // Sent at once so a client knows it is subscribed before it triggers anything.
    this.write(subscriber, ': subscribed\n\n');
    return true;
  }

  /** `time` is when the event happened, which a busy daemon may tell the hub somewhat later. */
  publish(event: EventName, volume: string, data: Record<string, unknown>, time = new Date().toISOString()): void {
    const id = this.nextId++;
    const frame = `id: ${id}\nevent: ${event}\ndata: ${JSON.stringify({ volume, ...data, time })}\n\n`;
    for (const subscriber of this.subscribers) {
      if (subscriber.volume === undefined || subscriber.volume === volume) this.write(subscriber, frame);
    }
  }

  closeAll(): void {
    clearInterval(this.heartbeat);
    for (const subscriber of this.subscribers) subscriber.res.end();
    this.subscribers.clear();
  }

  private write(subscriber: Subscriber, frame: string): void {
    if (subscriber.res.writableLength > sseBacklogBytesMax) {
      this.subscribers.delete(subscriber);
      subscriber.res.destroy();
      return;
    }
    subscriber.res.write(frame);
  }
}
