import type { PrimaryState, PrimaryVolume, Volume, VolumeStats } from '@gannet/core';
import type { RequestEvent } from 'nbd-server-js';
import type { Lane } from './control-lane.js';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

/**
 * Prometheus metrics of one daemon, in a registry of its own (never prom-client's global one, so two
 * daemons in one process, as in tests, do not collide). Volume gauges are read from `stats()` at scrape
 * time; latencies come from the engine's events and the NBD server's 'request' events.
 */

const nsPerSecond = 1e9;
const msPerSecond = 1e3;

const checkpointBucketsSeconds = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1];
const flushBucketsSeconds = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];
const requestBucketsSeconds = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1];

/** `error`: the volume could not be opened and is not served (its exports are absent). */
const volumeStates = ['replicating', 'failing-over', 'failed-over', 'halted', 'closed', 'error'] as const;
const bufferNames = ['primary', 'secondary', 'committed'] as const;
const primaryStates = ['replicating', 'degraded', 'resyncing', 'fenced', 'split-brain', 'halted', 'closed'] as const satisfies readonly PrimaryState[];

/**
 * Request counts and bytes, summed in plain Maps on the hot path and handed to prom-client when scraped:
 * prom-client hashes and validates the labels on every call, which took about a tenth of the daemon's
 * CPU at 90k 4 KiB writes per second. The Maps are nested by label value, because the values arrive as
 * the same few strings every time (hashed once), while a joined key would be a new string per request.
 */
class RequestTally {
  /** command -> export -> result -> entry. */
  private readonly byCommand = new Map<string, Map<string, Map<string, TallyEntry>>>();

  add(event: RequestEvent): void {
    let byExport = this.byCommand.get(event.command);
    if (byExport === undefined) {
      byExport = new Map();
      this.byCommand.set(event.command, byExport);
    }
    let byResult = byExport.get(event.exportName);
    if (byResult === undefined) {
      byResult = new Map();
      byExport.set(event.exportName, byResult);
    }
    const result = event.error ?? 'ok';
    let entry = byResult.get(result);
    if (entry === undefined) {
      entry = { labels: { export: event.exportName, command: event.command, result }, requests: 0, bytes: 0 };
      byResult.set(result, entry);
    }
    entry.requests += 1;
    entry.bytes += event.bytes;
  }

  *entries(): IterableIterator<TallyEntry> {
    for (const byExport of this.byCommand.values()) for (const byResult of byExport.values()) yield* byResult.values();
  }
}

/** A label value in the text exposition format: backslash, double quote and newline are escaped. */
export function escapeLabelValue(value: string): string {
  return value.replace(/[\\"\n]/g, (c) => (c === '\n' ? '\\n' : `\\${c}`));
}

/**
 * A Prometheus histogram by command, kept in plain arrays and written in the text format at scrape
 * time, for the same reason as RequestTally: prom-client's observe() validates and hashes its labels on
 * every call (about 6% of the daemon's CPU at 90k requests per second).
 */
class LatencyHistogram {
  private readonly byCommand = new Map<string, { readonly label: string; readonly buckets: Float64Array; sum: number; count: number }>();

  constructor(
    private readonly name: string,
    private readonly help: string,
    private readonly bounds: readonly number[],
  ) {}

  observe(command: string, seconds: number): void {
    let h = this.byCommand.get(command);
    if (h === undefined) {
      h = { label: escapeLabelValue(command), buckets: new Float64Array(this.bounds.length), sum: 0, count: 0 };
      this.byCommand.set(command, h);
    }
    let i = 0;
    while (i < this.bounds.length && seconds > this.bounds[i]) i++;
    if (i < this.bounds.length) h.buckets[i] += 1;
    h.sum += seconds;
    h.count += 1;
  }

  /** The text exposition format (version 0.0.4), cumulative buckets, as prom-client writes its own. */
  text(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} histogram`];
    for (const h of this.byCommand.values()) {
      let cumulative = 0;
      this.bounds.forEach((bound, i) => {
        cumulative += h.buckets[i];
        lines.push(`${this.name}_bucket{le="${bound}",command="${h.label}"} ${cumulative}`);
      });
      lines.push(`${this.name}_bucket{le="+Inf",command="${h.label}"} ${h.count}`);
      lines.push(`${this.name}_sum{command="${h.label}"} ${h.sum}`);
      lines.push(`${this.name}_count{command="${h.label}"} ${h.count}`);
    }
    return `${lines.join('\n')}\n`;
  }
}

interface TallyEntry {
  readonly labels: Record<'export' | 'command' | 'result', string>;
  requests: number;
  bytes: number;
}

export class Metrics {
  readonly registry = new Registry();
  readonly contentType = this.registry.contentType;
  private readonly volumes = new Map<string, Volume>();
  /** Volumes of a primary daemon (role primary), by name. */
  private readonly primaries = new Map<string, PrimaryVolume>();
  /** Volumes in state `error`, by name. */
  private readonly broken = new Set<string>();
  /** The error codes counted per volume, so a removed volume's series can be dropped. */
  private readonly errorCodes = new Map<string, Set<string>>();
  private readonly checkpointPause: Histogram<'volume'>;
  private readonly checkpoints: Counter<'volume'>;
  private readonly flushDuration: Histogram<'volume'>;
  private readonly flushedBytes: Counter<'volume'>;
  private readonly failovers: Counter<'volume' | 'to'>;
  private readonly pressureEvents: Counter<'volume'>;
  private readonly volumeErrors: Counter<'volume' | 'code'>;
  private readonly volumesAdded: Counter;
  private readonly volumesRemoved: Counter;
  private readonly tally = new RequestTally();
  private readonly nbdLatency = new LatencyHistogram(
    'gannet_nbd_request_duration_seconds',
    'NBD command latency inside the server, by command.',
    requestBucketsSeconds,
  );
  private readonly nbdConnectionsTotal: Counter;
  private readonly controlCalls: Counter<'lane'>;

  constructor(connectionCount: () => number) {
    const registers = [this.registry];
    collectDefaultMetrics({ register: this.registry });
    const volumes = this.volumes;
    const broken = this.broken;
    const perVolume = (name: string, help: string, read: (volume: Volume) => number) =>
      new Gauge({
        name,
        help,
        labelNames: ['volume'],
        registers,
        collect() {
          this.reset();
          for (const [volumeName, volume] of volumes) this.set({ volume: volumeName }, read(volume));
        },
      });
    perVolume('gannet_volume_epoch', 'Current epoch (checkpoints taken since creation).', (v) => v.stats().epoch);
    perVolume('gannet_volume_durable_epoch', 'Newest epoch whose data is all in the backing file.', (v) => v.stats().durableEpoch);
    perVolume('gannet_volume_size_bytes', 'Size of the volume.', (v) => v.stats().sizeBytes);
    perVolume('gannet_volume_spilled_bytes', 'Buffered bytes spilled from memory to disk.', (v) => v.stats().spilledBytes);
    perVolume('gannet_volume_torn_ranges', 'Ranges an interrupted flush may have left half-written.', (v) => v.stats().tornRanges.length);
    const failoverTime = (name: string, help: string, read: (failover: NonNullable<VolumeStats['failover']>) => number | undefined) =>
      new Gauge({
        name,
        help,
        labelNames: ['volume'],
        registers,
        collect() {
          this.reset();
          for (const [volumeName, volume] of volumes) {
            const failover = volume.stats().failover;
            const ms = failover === undefined ? undefined : read(failover);
            if (ms !== undefined) this.set({ volume: volumeName }, ms / msPerSecond);
          }
        },
      });
    failoverTime(
      'gannet_volume_failover_foreground_seconds',
      'Failover in this run: from the request until both exports served the kept state.',
      (failover) => failover.foregroundMs,
    );
    failoverTime(
      'gannet_volume_failover_durable_seconds',
      'Failover in this run: from the request until the kept state was durable (journal committed).',
      (failover) => failover.durableMs,
    );
    new Gauge({
      name: 'gannet_volume_buffered_bytes',
      help: 'Bytes held in each buffer: primary (P), secondary (S), committed not yet flushed (C).',
      labelNames: ['volume', 'buffer'],
      registers,
      collect() {
        this.reset();
        for (const [volumeName, volume] of volumes) {
          const buffered = volume.stats().bufferedBytes;
          for (const buffer of bufferNames) this.set({ volume: volumeName, buffer }, buffered[buffer]);
        }
      },
    });
    new Gauge({
      name: 'gannet_volume_state',
      help: '1 for the state the volume is in.',
      labelNames: ['volume', 'state'],
      registers,
      collect() {
        this.reset();
        const stateOf = new Map<string, string>();
        for (const [volumeName, volume] of volumes) stateOf.set(volumeName, volume.stats().state);
        for (const volumeName of broken) stateOf.set(volumeName, 'error');
        for (const [volumeName, current] of stateOf) {
          for (const state of volumeStates) this.set({ volume: volumeName, state }, state === current ? 1 : 0);
        }
      },
    });
    new Gauge({
      name: 'gannet_volume_split_brain',
      help: '1 while the volume and its peer have both written since they split: the attach is refused, nothing is resynced until an operator resolves it.',
      labelNames: ['volume'],
      registers,
      collect() {
        this.reset();
        for (const [volumeName, volume] of volumes) this.set({ volume: volumeName }, volume.stats().splitBrain !== undefined ? 1 : 0);
        for (const [volumeName, volume] of primaries) this.set({ volume: volumeName }, volume.stats().state === 'split-brain' ? 1 : 0);
      },
    });
    new Gauge({
      name: 'gannet_volume_failover_phase',
      help: '1 for the phase a failover of this run is in: journaling (not durable yet), applying, done.',
      labelNames: ['volume', 'phase'],
      registers,
      collect() {
        this.reset();
        for (const [volumeName, volume] of volumes) {
          const failover = volume.stats().failover;
          if (failover === undefined) continue;
          for (const phase of ['journaling', 'applying', 'done'] as const) this.set({ volume: volumeName, phase }, phase === failover.phase ? 1 : 0);
        }
      },
    });
    const primaries = this.primaries;
    const perPrimary = (name: string, help: string, read: (volume: PrimaryVolume) => number | null) =>
      new Gauge({
        name,
        help,
        labelNames: ['volume'],
        registers,
        collect() {
          this.reset();
          for (const [volumeName, volume] of primaries) {
            const value = read(volume);
            if (value !== null) this.set({ volume: volumeName }, value);
          }
        },
      });
    perPrimary('gannet_primary_link_up', '1 while the link to the peer (the secondary daemon) is up.', (v) => (v.stats().link.state === 'up' ? 1 : 0));
    perPrimary('gannet_primary_inflight_bytes', 'Bytes forwarded to the peer and not yet acknowledged (ack mode local).', (v) => v.stats().inflightBytes);
    perPrimary('gannet_primary_dirty_bytes', "Bytes that may differ from the peer's durable disk.", (v) => v.stats().dirtyBytes);
    perPrimary('gannet_primary_unsent_bytes', 'Of the dirty bytes, those written while the peer was away, waiting for a resync.', (v) => v.stats().unsentBytes);
    perPrimary('gannet_primary_resync_bytes_done', 'Bytes the resync under way has gone over (0 when none runs).', (v) => v.stats().resync?.bytesDone ?? 0);
    perPrimary('gannet_primary_resync_bytes_total', 'Bytes the resync under way goes over (0 when none runs).', (v) => v.stats().resync?.bytesTotal ?? 0);
    perPrimary('gannet_primary_resync_bytes_per_second', 'Data rate of the resync under way (0 when none runs).', (v) => v.stats().resync?.bytesPerSecond ?? 0);
    perPrimary('gannet_primary_peer_epoch', 'The epoch the peer began at the last checkpoint.', (v) => v.stats().peerEpoch);
    perPrimary('gannet_primary_peer_durable_epoch', "The newest epoch the peer reported durable (in its backing file).", (v) => v.stats().peerDurableEpoch);
    new Counter({
      name: 'gannet_primary_resynced_bytes_total',
      help: 'Bytes resyncs went over since the volume opened, by kind: data (sent as writes) or zero (sent as zero requests).',
      labelNames: ['volume', 'kind'],
      registers,
      collect() {
        this.reset();
        for (const [volumeName, volume] of primaries) {
          const stats = volume.stats();
          this.inc({ volume: volumeName, kind: 'data' }, stats.resyncDataBytesTotal);
          this.inc({ volume: volumeName, kind: 'zero' }, stats.resyncBytesTotal - stats.resyncDataBytesTotal);
        }
      },
    });
    new Gauge({
      name: 'gannet_primary_state',
      help: '1 for the state the primary volume is in.',
      labelNames: ['volume', 'state'],
      registers,
      collect() {
        this.reset();
        for (const [volumeName, volume] of primaries) {
          const current = volume.stats().state;
          for (const state of primaryStates) this.set({ volume: volumeName, state }, state === current ? 1 : 0);
        }
      },
    });
    new Gauge({
      name: 'gannet_volume_role',
      help: '1 for the role the volume has on this daemon: secondary (the GANNET buffer) or primary (the VM\'s disk, replicated to the peer).',
      labelNames: ['volume', 'role'],
      registers,
      collect() {
        this.reset();
        for (const volumeName of volumes.keys()) this.set({ volume: volumeName, role: 'secondary' }, 1);
        for (const volumeName of primaries.keys()) this.set({ volume: volumeName, role: 'primary' }, 1);
      },
    });
    new Gauge({
      name: 'gannet_nbd_connections',
      help: 'Open NBD connections.',
      registers,
      collect() {
        this.set(connectionCount());
      },
    });
    this.nbdConnectionsTotal = new Counter({ name: 'gannet_nbd_connections_total', help: 'NBD connections accepted.', registers });
    this.checkpointPause = new Histogram({
      name: 'gannet_checkpoint_pause_seconds',
      help: 'Time writes were paused while a checkpoint sealed the epoch.',
      labelNames: ['volume'],
      buckets: checkpointBucketsSeconds,
      registers,
    });
    this.checkpoints = new Counter({ name: 'gannet_checkpoints_total', help: 'Checkpoints taken.', labelNames: ['volume'], registers });
    this.flushDuration = new Histogram({
      name: 'gannet_flush_duration_seconds',
      help: 'Time to write one committed epoch to the backing file and sync it.',
      labelNames: ['volume'],
      buckets: flushBucketsSeconds,
      registers,
    });
    this.flushedBytes = new Counter({
      name: 'gannet_flushed_bytes_total',
      help: 'Bytes written to backing files by the flusher.',
      labelNames: ['volume'],
      registers,
    });
    this.failovers = new Counter({ name: 'gannet_failovers_total', help: 'Failovers done.', labelNames: ['volume', 'to'], registers });
    this.pressureEvents = new Counter({
      name: 'gannet_pressure_events_total',
      help: 'Times buffered bytes crossed the pressure threshold.',
      labelNames: ['volume'],
      registers,
    });
    this.volumeErrors = new Counter({
      name: 'gannet_volume_errors_total',
      help: 'Errors by volume and code: the engine\'s (ENOSPC, EIO, EHALTED, ...) and volumes that could not be opened or created (EMETA, ...).',
      labelNames: ['volume', 'code'],
      registers,
    });
    this.volumesAdded = new Counter({ name: 'gannet_volumes_added_total', help: 'Volumes added while the daemon runs (created, reloaded or recovered).', registers });
    this.volumesRemoved = new Counter({ name: 'gannet_volumes_removed_total', help: 'Volumes deleted while the daemon runs.', registers });
    this.controlCalls = new Counter({
      name: 'gannet_control_calls_total',
      help: 'Calls from the control thread answered by the main thread, by lane: data-path (between NBD request batches) or event-loop.',
      labelNames: ['lane'],
      registers,
    });
    for (const lane of ['data-path', 'event-loop'] satisfies Lane[]) this.controlCalls.inc({ lane }, 0);
    const tally = this.tally;
    new Counter({
      name: 'gannet_nbd_requests_total',
      help: 'NBD commands completed, by export, command and result (ok or errno).',
      labelNames: ['export', 'command', 'result'],
      registers,
      collect() {
        this.reset();
        for (const t of tally.entries()) this.inc(t.labels, t.requests);
      },
    });
    new Counter({
      name: 'gannet_nbd_request_bytes_total',
      help: 'Bytes covered by completed NBD commands.',
      labelNames: ['export', 'command'],
      registers,
      collect() {
        this.reset();
        // Bytes are counted by export and command only, whatever the result.
        for (const t of tally.entries()) if (t.bytes > 0) this.inc({ export: t.labels.export, command: t.labels.command }, t.bytes);
      },
    });

  }

  addVolume(name: string, volume: Volume): void {
    this.broken.delete(name);
    this.volumes.set(name, volume);
    volume.on('checkpoint', (event) => {
      this.checkpoints.inc({ volume: name });
      this.checkpointPause.observe({ volume: name }, event.pauseMs / msPerSecond);
    });
    volume.on('flushed', (event) => {
      this.flushDuration.observe({ volume: name }, event.durationMs / msPerSecond);
      this.flushedBytes.inc({ volume: name }, event.bytes);
    });
    volume.on('failover', (event) => this.failovers.inc({ volume: name, to: event.to }));
    volume.on('pressure', () => this.pressureEvents.inc({ volume: name }));
  }

  /** A volume of a primary daemon: its checkpoints are the peer's, counted as the secondary's are. */
  addPrimary(name: string, volume: PrimaryVolume): void {
    this.broken.delete(name);
    this.primaries.set(name, volume);
    volume.on('checkpoint', (event) => {
      this.checkpoints.inc({ volume: name });
      this.checkpointPause.observe({ volume: name }, event.pauseMs / msPerSecond);
    });
  }

  /** A volume that could not be opened: shown in state `error` until it is recovered or removed. */
  addBrokenVolume(name: string): void {
    this.volumes.delete(name);
    this.primaries.delete(name);
    this.broken.add(name);
  }

  onVolumeError(name: string, code: string): void {
    this.volumeErrors.inc({ volume: name, code });
    let codes = this.errorCodes.get(name);
    if (codes === undefined) this.errorCodes.set(name, (codes = new Set()));
    codes.add(code);
  }

  /** Forgets a volume (it was deleted, or replaced by its recovered self): its series go too. */
  removeVolume(name: string): void {
    this.volumes.delete(name);
    this.primaries.delete(name);
    this.broken.delete(name);
  }

  onVolumeAdded(): void {
    this.volumesAdded.inc();
  }

  /** A deleted volume's series go: a counter that stops being reported is how Prometheus sees a removal. */
  onVolumeRemoved(name: string): void {
    this.removeVolume(name);
    this.volumesRemoved.inc();
    for (const metric of [this.checkpoints, this.checkpointPause, this.flushDuration, this.flushedBytes, this.pressureEvents]) metric.remove({ volume: name });
    for (const to of ['secondary', 'checkpoint', 'primary']) this.failovers.remove({ volume: name, to });
    for (const code of this.errorCodes.get(name) ?? []) this.volumeErrors.remove({ volume: name, code });
    this.errorCodes.delete(name);
  }

  onControlCall(lane: Lane): void {
    this.controlCalls.inc({ lane });
  }

  onConnection(): void {
    this.nbdConnectionsTotal.inc();
  }

  onRequest(event: RequestEvent): void {
    this.tally.add(event);
    this.nbdLatency.observe(event.command, Number(event.durationNs) / nsPerSecond);
  }

  async text(): Promise<string> {
    return `${await this.registry.metrics()}${this.nbdLatency.text()}`;
  }
}
