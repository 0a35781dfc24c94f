import { once } from 'node:events';
import { readlinkSync } from 'node:fs';
import { setPriority } from 'node:os';
import { parentPort, workerData } from 'node:worker_threads';
import type { FastifyInstance } from 'fastify';
import { createControlServer, type ControlBackend } from './control.js';
import {
  errorData,
  LaneClient,
  type ControlListenAddress,
  type ControlWorkerData,
  type WorkerLogLevel,
  type WorkerCommand,
  type WorkerReport,
} from './control-lane.js';
import { EventHub } from './events.js';

/**
 * The control thread: the HTTP control API (fastify, SSE) on a thread of its own, so that reading a
 * request, parsing it and writing the answer never wait for the main thread's event loop, which a
 * saturated NBD data path keeps busy. Volume operations are calls to the main thread over the priority
 * lane (control-lane.ts). Messages with the main thread about its life (listening, logs, shutdown) go
 * over the worker's own port; see control-thread.ts for the other side.
 */

function report(message: WorkerReport): void {
  parentPort!.postMessage(message);
}

const data = workerData as ControlWorkerData;
const events = new EventHub();
const lane = new LaneClient(data.lanePort, data.laneFlag, (event, volume, fields, time) => events.publish(event, volume, fields, time));
const log = (level: WorkerLogLevel, message: string, fields: Record<string, unknown> = {}) => report({ kind: 'log', level, message, fields });

const backend: ControlBackend = {
  token: data.token,
  events,
  bodyBytesMax: data.bodyBytesMax,
  volumes: () => lane.call({ op: 'volumes' }),
  volume: (name) => lane.call({ op: 'volume', name }),
  create: (body) => lane.call({ op: 'create', body }),
  remove: (name, { force, purge }) => lane.call({ op: 'remove', name, force, purge }),
  recover: (name) => lane.call({ op: 'recover', name }),
  checkpoint: (names) => lane.call(names === undefined ? { op: 'checkpoint' } : { op: 'checkpoint', names }),
  failover: (name, to, force) => lane.call({ op: 'failover', name, to, force }),
  attachPeer: (name, from, generation) =>
    lane.call({ op: 'attach-peer', name, ...(from !== undefined && { from }), ...(generation !== undefined && { generation }) }),
  setInconsistent: (name, inconsistent, generation) => lane.call({ op: 'set-inconsistent', name, inconsistent, ...(generation !== undefined && { generation }) }),
  digests: (name, offset, length) => lane.call({ op: 'digests', name, offset, length }),
  promote: (name, request) => lane.call({ op: 'promote', name, request }),
  demote: (name, request) => lane.call({ op: 'demote', name, request }),
  resolve: (name, request) => lane.call({ op: 'resolve', name, request }),
  groups: () => lane.call({ op: 'groups' }),
  reload: () => lane.call({ op: 'reload' }),
  metrics: () => lane.call({ op: 'metrics' }),
  onError: (error, request) => log('error', 'control request failed', { err: errorData(error), request }),
};

const apps: FastifyInstance[] = [];

/** Connections closed at the cap are logged as a count, at most this often. */
const dropLogIntervalMs = 1_000;
let droppedConnections = 0;
let dropLog: NodeJS.Timeout | null = null;

/**
 * Node closes connections past `maxConnections` as it accepts them, so a flood of idle sockets on this
 * port costs the daemon at most the cap in descriptors; the NBD cap leaves room for them (nbd-setup.ts).
 */
function onDrop(): void {
  droppedConnections += 1;
  if (dropLog !== null) return;
  dropLog = setTimeout(() => {
    dropLog = null;
    log('warn', 'control connections refused at the cap', { refused: droppedConnections, connectionsMax: data.connectionsMax });
    droppedConnections = 0;
  }, dropLogIntervalMs);
  dropLog.unref();
}

function raisePriority(nice: number): void {
  try {
    // PID/task/TID: setpriority() on a thread id sets the nice value of that thread alone.
    const threadId = Number(readlinkSync('/proc/thread-self').split('/').pop());
    setPriority(threadId, nice);
  } catch (error) {
    log('info', 'control thread keeps the default CPU priority', { err: errorData(error), nice });
  }
}

/**
 * Listens on the node server under fastify rather than with fastify's listen(), which binds both
 * 127.0.0.1 and ::1 for `localhost`: the daemon listens on exactly the address it was given and prints.
 */
async function listen(address: ControlListenAddress): Promise<ControlListenAddress> {
  const app = createControlServer(backend);
  apps.push(app);
  await app.ready();
  const { server } = app;
  server.maxConnections = data.connectionsMax;
  server.on('drop', onDrop);
  server.listen('path' in address ? { path: address.path } : { port: address.port, host: address.host });
  await once(server, 'listening');
  server.on('error', (error) => log('error', 'control server error', { err: errorData(error) }));
  const bound = server.address();
  return bound !== null && typeof bound === 'object' ? { host: bound.address, port: bound.port } : address;
}

/** As node's server.close() does: stop accepting, close idle keep-alive connections, wait for the rest. */
async function close(): Promise<void> {
  events.closeAll();
  await Promise.all(apps.map((app) => app.close()));
  lane.close();
  report({ kind: 'closed' });
}

parentPort!.on('message', (command: WorkerCommand) => {
  if (command.kind === 'close') void close();
  else for (const app of apps) app.server.closeAllConnections();
});

raisePriority(data.nice);
try {
  const addresses: ControlListenAddress[] = [];
  for (const address of data.listen) addresses.push(await listen(address));
  report({ kind: 'listening', addresses });
} catch (error) {
  report({ kind: 'listen-failed', error: errorData(error) });
}
