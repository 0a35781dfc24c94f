import { receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import type { FailoverTarget, Generation } from '@gannet/core';
import {
  ApiError,
  apiErrorOf,
  type CheckpointResult,
  type DemoteRequest,
  type DigestsView,
  type ErrorCode,
  type GroupView,
  type PeerAttachRequest,
  type PeerAttachView,
  type PromoteRequest,
  type RecoverResult,
  type ResolveRequest,
  type ReloadResult,
  type RemoveResult,
  type AnyVolumeView,
  type VolumeView,
} from './control.js';
import type { EventName } from './events.js';

/**
 * The priority lane between the control thread, which speaks HTTP, and the main thread, which owns the
 * volumes. The control thread posts each call on a MessagePort and raises a flag in shared memory; the
 * main thread answers calls from two places: the port's 'message' event, when its event loop comes round,
 * and `poll()`, which the NBD data path calls between request batches. Under a saturated data path the
 * event loop comes round only after a pass over every busy socket (several milliseconds), while a batch
 * ends every few hundred microseconds; the flag makes `poll()` one shared-memory read when nothing waits.
 * The messages about the control thread's life (start, listening, logs, shutdown) are defined here too.
 */

/** What the control API asks of the main thread. */
export type Call =
  | { op: 'volumes' }
  | { op: 'volume'; name: string }
  | { op: 'create'; body: unknown }
  | { op: 'remove'; name: string; force: boolean; purge: boolean }
  | { op: 'recover'; name: string }
  | { op: 'checkpoint'; names?: string[] }
  | { op: 'failover'; name: string; to: FailoverTarget; force: boolean }
  | { op: 'attach-peer'; name: string; from?: PeerAttachRequest; generation?: Generation | null }
  | { op: 'set-inconsistent'; name: string; inconsistent: boolean; generation?: Generation }
  | { op: 'digests'; name: string; offset: number; length: number }
  | { op: 'promote'; name: string; request: PromoteRequest }
  | { op: 'demote'; name: string; request: DemoteRequest }
  | { op: 'resolve'; name: string; request: ResolveRequest }
  | { op: 'groups' }
  | { op: 'reload' }
  | { op: 'metrics' };

export interface MetricsText {
  contentType: string;
  text: string;
}

/** The answer each call gets. */
export interface Results {
  volumes: AnyVolumeView[];
  volume: AnyVolumeView;
  create: AnyVolumeView;
  remove: RemoveResult;
  recover: RecoverResult;
  checkpoint: CheckpointResult;
  failover: AnyVolumeView;
  'attach-peer': PeerAttachView;
  'set-inconsistent': VolumeView;
  promote: AnyVolumeView;
  demote: AnyVolumeView;
  resolve: AnyVolumeView;
  digests: DigestsView;
  groups: GroupView[];
  reload: ReloadResult;
  metrics: MetricsText;
}

/** An error as the API returns it; it crosses the thread boundary as plain data. */
export interface WireError {
  code: ErrorCode;
  message: string;
  field?: string;
  reason?: string;
}

/** Control thread to main thread. */
export type LaneRequest = { kind: 'call'; id: number; call: Call };
/** Main thread to control thread: answers, and engine events for the SSE subscribers. */
export type LaneMessage =
  | { kind: 'result'; id: number; result: unknown }
  | { kind: 'error'; id: number; error: WireError }
  | { kind: 'event'; event: EventName; volume: string; data: Record<string, unknown>; time: string };

/** Which way the main thread took a call: from the data path's check, or from its event loop. */
export type Lane = 'data-path' | 'event-loop';

/** One Int32 in a SharedArrayBuffer: non-zero while a call may be waiting on the port. */
export const laneFlagBytes = Int32Array.BYTES_PER_ELEMENT;

// The control thread's life: its start data, its reports and the main thread's commands.

export type ControlListenAddress = { host: string; port: number } | { path: string };

export interface ControlWorkerData {
  readonly token: string;
  readonly bodyBytesMax: number;
  /** Control connections open at once, per listener; more are closed on accept. */
  readonly connectionsMax: number;
  /** The nice value the control thread asks for (control-thread.ts). */
  readonly nice: number;
  readonly listen: readonly ControlListenAddress[];
  readonly lanePort: MessagePort;
  readonly laneFlag: SharedArrayBuffer;
}

export type WorkerLogLevel = 'error' | 'warn' | 'info' | 'debug';
/** An error as plain data, for the main thread's log (structured clone keeps no class nor `code`). */
export interface ErrorData {
  name: string;
  message: string;
  stack?: string;
  code?: string;
}

/** Control thread to main thread. */
export type WorkerReport =
  | { kind: 'listening'; addresses: ControlListenAddress[] }
  | { kind: 'listen-failed'; error: ErrorData }
  | { kind: 'log'; level: WorkerLogLevel; message: string; fields: Record<string, unknown> }
  | { kind: 'closed' };

/** Main thread to control thread: stop accepting and close idle connections; then cut the rest. */
export type WorkerCommand = { kind: 'close' } | { kind: 'force-close' };

export function errorData(error: unknown): ErrorData {
  if (!(error instanceof Error)) return { name: 'Error', message: String(error) };
  const code = (error as NodeJS.ErrnoException).code;
  return { name: error.name, message: error.message, stack: error.stack, ...(typeof code === 'string' && { code }) };
}

/** What the main thread does for each call; the daemon implements it. */
export interface ControlOperations {
  volumes(): AnyVolumeView[];
  volume(name: string): AnyVolumeView;
  create(body: unknown): Promise<AnyVolumeView>;
  remove(name: string, options: { force: boolean; purge: boolean }): Promise<RemoveResult>;
  recover(name: string): Promise<RecoverResult>;
  checkpoint(names?: string[]): Promise<CheckpointResult>;
  failover(name: string, to: FailoverTarget, force: boolean): Promise<AnyVolumeView>;
  /** A primary attaches: earlier NBD connections to NAME/primary are closed, then the volume's state is read. */
  attachPeer(name: string, from?: PeerAttachRequest, generation?: Generation | null): Promise<PeerAttachView>;
  setInconsistent(name: string, inconsistent: boolean, generation?: Generation): Promise<VolumeView>;
  digests(name: string, offset: number, length: number): Promise<DigestsView>;
  promote(name: string, request: PromoteRequest): Promise<AnyVolumeView>;
  demote(name: string, request: DemoteRequest): Promise<AnyVolumeView>;
  resolve(name: string, request: ResolveRequest): Promise<AnyVolumeView>;
  groups(): GroupView[];
  reload(): Promise<ReloadResult>;
  metricsText(): Promise<MetricsText>;
}

function perform(operations: ControlOperations, call: Call): unknown {
  switch (call.op) {
    case 'volumes':
      return operations.volumes();
    case 'volume':
      return operations.volume(call.name);
    case 'create':
      return operations.create(call.body);
    case 'remove':
      return operations.remove(call.name, { force: call.force, purge: call.purge });
    case 'recover':
      return operations.recover(call.name);
    case 'checkpoint':
      return operations.checkpoint(call.names);
    case 'failover':
      return operations.failover(call.name, call.to, call.force);
    case 'attach-peer':
      return operations.attachPeer(call.name, call.from, call.generation);
    case 'set-inconsistent':
      return operations.setInconsistent(call.name, call.inconsistent, call.generation);
    case 'digests':
      return operations.digests(call.name, call.offset, call.length);
    case 'promote':
      return operations.promote(call.name, call.request);
    case 'demote':
      return operations.demote(call.name, call.request);
    case 'resolve':
      return operations.resolve(call.name, call.request);
    case 'groups':
      return operations.groups();
    case 'reload':
      return operations.reload();
    case 'metrics':
      return operations.metricsText();
  }
}

/** The main thread's end: answers calls and forwards events. */
export class LaneServer {
  private readonly flag: Int32Array;

  constructor(
    private readonly port: MessagePort,
    flagBuffer: SharedArrayBuffer,
    private readonly operations: ControlOperations,
    private readonly served: (lane: Lane) => void,
    /** An error with no API code: logged by the daemon, answered as `internal`. */
    private readonly unexpected: (error: unknown, call: Call) => void,
  ) {
    this.flag = new Int32Array(flagBuffer);
    port.on('message', (request: LaneRequest) => this.serve(request, 'event-loop'));
  }

  /** The data path's check: nearly free when nothing is pending. */
  poll(): void {
    if (Atomics.load(this.flag, 0) === 0) return;
    // Cleared before draining: a call posted from here on raises the flag again after it is on the port.
    Atomics.store(this.flag, 0, 0);
    for (let received = receiveMessageOnPort(this.port); received !== undefined; received = receiveMessageOnPort(this.port)) {
      this.serve(received.message as LaneRequest, 'data-path');
    }
  }

  publish(event: EventName, volume: string, data: Record<string, unknown>): void {
    this.port.postMessage({ kind: 'event', event, volume, data, time: new Date().toISOString() } satisfies LaneMessage);
  }

  close(): void {
    this.port.close();
  }

  private serve({ id, call }: LaneRequest, lane: Lane): void {
    this.served(lane);
    let pending: unknown;
    try {
      pending = perform(this.operations, call);
    } catch (error) {
      this.fail(id, call, error);
      return;
    }
    // A call that finished synchronously is answered now, not a microtask later.
    if (!(pending instanceof Promise)) {
      this.port.postMessage({ kind: 'result', id, result: pending } satisfies LaneMessage);
      return;
    }
    pending.then(
      (result: unknown) => this.port.postMessage({ kind: 'result', id, result } satisfies LaneMessage),
      (error: unknown) => this.fail(id, call, error),
    );
  }

  private fail(id: number, call: Call, error: unknown): void {
    const known = apiErrorOf(error);
    if (known === undefined) this.unexpected(error, call);
    const api = known ?? new ApiError('internal', (error as Error)?.message ?? String(error));
    const wire: WireError = { code: api.code, message: api.message };
    if (api.field !== undefined) wire.field = api.field;
    if (api.reason !== undefined) wire.reason = api.reason;
    this.port.postMessage({ kind: 'error', id, error: wire } satisfies LaneMessage);
  }
}

/** The control thread's end: one promise per call, settled by the main thread's answer. */
export class LaneClient {
  private readonly flag: Int32Array;
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: (result: unknown) => void; reject: (error: ApiError) => void }>();

  constructor(
    private readonly port: MessagePort,
    flagBuffer: SharedArrayBuffer,
    onEvent: (event: EventName, volume: string, data: Record<string, unknown>, time: string) => void,
  ) {
    this.flag = new Int32Array(flagBuffer);
    port.on('message', (message: LaneMessage) => {
      if (message.kind === 'event') {
        onEvent(message.event, message.volume, message.data, message.time);
        return;
      }
      const waiter = this.waiting.get(message.id);
      if (waiter === undefined) return;
      this.waiting.delete(message.id);
      if (message.kind === 'result') waiter.resolve(message.result);
      else waiter.reject(new ApiError(message.error.code, message.error.message, message.error.field, message.error.reason));
    });
  }

  call<C extends Call>(call: C): Promise<Results[C['op']]> {
    const id = this.nextId++;
    const answer = new Promise<Results[C['op']]>((resolve, reject) => {
      this.waiting.set(id, { resolve: resolve as (result: unknown) => void, reject });
    });
    this.port.postMessage({ kind: 'call', id, call } satisfies LaneRequest);
    // Raised after the post, so the main thread that sees it finds the call on the port.
    Atomics.store(this.flag, 0, 1);
    return answer;
  }

  close(): void {
    this.port.close();
  }
}
