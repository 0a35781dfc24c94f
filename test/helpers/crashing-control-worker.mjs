/**
 * A stand-in for the daemon's control thread (packages/server/src/control-worker.ts), for tests of how
 * the main thread supervises it: it reports listening on the addresses it was given without binding
 * any, crashes with an uncaught exception when the main thread publishes an event for volume "crash",
 * and closes when asked.
 */
import { parentPort, workerData } from 'node:worker_threads';

const { listen, lanePort } = workerData;
lanePort.on('message', (message) => {
  if (message.kind === 'event' && message.volume === 'crash') throw new Error('a bug in the control thread');
});
parentPort.on('message', (command) => {
  if (command.kind !== 'close') return;
  lanePort.close();
  parentPort.postMessage({ kind: 'closed' });
});
parentPort.postMessage({ kind: 'listening', addresses: listen });
