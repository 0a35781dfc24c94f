import { MessageChannel, Worker } from 'node:worker_threads';
import type { Logger } from 'pino';
import {
  laneFlagBytes,
  LaneServer,
  type ControlListenAddress,
  type ControlOperations,
  type ControlWorkerData,
  type ErrorData,
  type Lane,
  type WorkerCommand,
  type WorkerReport,
} from './control-lane.js';
import type { EventName } from './events.js';

/**
 * The main thread's side of the control thread: starts it, hands it the listen addresses, answers its
 * calls (LaneServer), forwards engine events to it, and shuts it down in the daemon's order.
 *
 * A crash of the control thread (an uncaught exception: a bug) is logged and the thread is started again
 * on the addresses it had bound, ports included. Restarting rather than exiting keeps the NBD exports up:
 * exiting would take the VMs' disks away and drop the buffered epoch, turning a control-plane bug into a
 * data-plane outage and a full resync. A thread that keeps crashing is given up after
 * `controlRestartsMax` crashes within `controlRestartWindowMs`: then `failed` resolves and the daemon
 * shuts down and exits with an error, for a supervisor (systemd, Pacemaker) to act on.
 */

export const controlRestartsMax = 3;
export const controlRestartWindowMs = 60_000;
/**
 * The control thread's nice value; Linux keeps one per thread. A call needs the CPU for well under a
 * millisecond, several times (request, answer from the main thread, response), and on a host whose
 * cores the data path and its clients keep busy each of those wake-ups waited a slice behind them:
 * measured with fio saturating the daemon, checkpoint calls took about 1 ms less at the median. The
 * cost: a flood of control requests takes more CPU from the data path (the API listens on loopback
 * unless told otherwise). Lowering nice needs CAP_SYS_NICE; without it the thread keeps the default.
 */
export const controlThreadNice = -10;

/** The compiled control thread, next to this module in dist. */
export const controlWorkerEntry = new URL('./control-worker.js', import.meta.url);

export interface ControlThreadOptions {
  readonly token: string;
  readonly bodyBytesMax: number;
  /** Control connections open at once; more are closed on accept. */
  readonly connectionsMax: number;
  readonly listen: readonly ControlListenAddress[];
  readonly operations: ControlOperations;
  readonly logger: Logger;
  /** Counts each call by the lane that served it (for /metrics). */
  readonly served: (lane: Lane) => void;
  /** Runs before each (re)start: removes Unix sockets a dead listener left behind. */
  readonly prepare: (listen: readonly ControlListenAddress[]) => Promise<void>;
  /** The worker's module; tests substitute one of their own. */
  readonly entry?: URL;
}

function errorFrom(data: ErrorData): Error {
  return Object.assign(new Error(data.message), data);
}

interface Running {
  readonly worker: Worker;
  readonly lane: LaneServer;
  /** Resolves once the thread reported its connections closed, or exited. */
  readonly closed: Promise<void>;
}

export class ControlThread {
  /** The addresses bound, ports chosen by the kernel included, in the order given. */
  addresses: ControlListenAddress[] = [];
  /** Resolves, with why, once the control API is down for good. */
  readonly failed: Promise<Error>;
  private giveUp!: (error: Error) => void;
  private readonly flagBuffer = new SharedArrayBuffer(laneFlagBytes);
  private running: Running | undefined;
  private crashes: number[] = [];
  private closing = false;

  private constructor(private readonly options: ControlThreadOptions) {
    this.failed = new Promise((resolve) => {
      this.giveUp = resolve;
    });
  }

  static async start(options: ControlThreadOptions): Promise<ControlThread> {
    const thread = new ControlThread(options);
    await options.prepare(options.listen);
    thread.addresses = await thread.spawn(options.listen);
    return thread;
  }

  /** The data path's check (NbdServer's betweenBatches): one shared-memory read when no call waits. */
  poll(): void {
    this.running?.lane.poll();
  }

  publish(event: EventName, volume: string, data: Record<string, unknown>): void {
    this.running?.lane.publish(event, volume, data);
  }

  /** Stops accepting and closes idle connections; resolves once every control connection is gone. */
  stopAccepting(): Promise<void> {
    this.closing = true;
    if (this.running === undefined) return Promise.resolve();
    this.command({ kind: 'close' });
    return this.running.closed;
  }

  /** Cuts the connections still open (after the shutdown grace). */
  forceClose(): void {
    this.command({ kind: 'force-close' });
  }

  async terminate(): Promise<void> {
    this.closing = true;
    const running = this.running;
    this.running = undefined;
    if (running === undefined) return;
    running.lane.close();
    await running.worker.terminate();
  }

  private command(command: WorkerCommand): void {
    this.running?.worker.postMessage(command);
  }

  /** Starts a thread listening on `listen`; resolves with the bound addresses. */
  private spawn(listen: readonly ControlListenAddress[]): Promise<ControlListenAddress[]> {
    const { options } = this;
    const { port1, port2 } = new MessageChannel();
    const data: ControlWorkerData = {
      token: options.token,
      bodyBytesMax: options.bodyBytesMax,
      connectionsMax: options.connectionsMax,
      nice: controlThreadNice,
      listen,
      lanePort: port2,
      laneFlag: this.flagBuffer,
    };
    const worker = new Worker(options.entry ?? controlWorkerEntry, { workerData: data, transferList: [port2] });
    const lane = new LaneServer(port1, this.flagBuffer, options.operations, options.served, (error, call) =>
      options.logger.error({ err: error, call: call.op }, 'control request failed'),
    );
    let reportClosed!: () => void;
    const closed = new Promise<void>((resolve) => {
      reportClosed = resolve;
    });
    const running: Running = { worker, lane, closed };
    this.running = running;
    let crash: Error | undefined;
    return new Promise((resolve, reject) => {
      let listening = false;
      worker.on('message', (report: WorkerReport) => {
        switch (report.kind) {
          case 'listening':
            listening = true;
            resolve(report.addresses);
            break;
          case 'listen-failed':
            reject(errorFrom(report.error));
            if (this.running === running) this.running = undefined;
            lane.close();
            void worker.terminate();
            break;
          case 'log': {
            const { err, ...fields } = report.fields as { err?: ErrorData };
            options.logger[report.level]({ component: 'control', ...fields, ...(err !== undefined && { err: errorFrom(err) }) }, report.message);
            break;
          }
          case 'closed':
            reportClosed();
            break;
        }
      });
      worker.on('error', (error) => {
        crash = error;
      });
      worker.on('exit', (exitCode) => {
        lane.close();
        reportClosed();
        if (!listening) reject(crash ?? new Error(`the control thread exited (code ${exitCode}) before it listened`));
        if (this.running !== running) return;
        this.running = undefined;
        if (!this.closing && listening) void this.restart(crash ?? new Error(`the control thread exited (code ${exitCode})`));
      });
    });
  }

  private async restart(crash: Error): Promise<void> {
    const { logger } = this.options;
    const now = Date.now();
    this.crashes = [...this.crashes.filter((at) => now - at < controlRestartWindowMs), now];
    if (this.crashes.length > controlRestartsMax) {
      logger.fatal({ err: crash, crashes: this.crashes.length, windowMs: controlRestartWindowMs }, 'control thread crashed too often; giving up');
      this.giveUp(new Error(`the control thread crashed ${this.crashes.length} times within ${controlRestartWindowMs} ms: ${crash.message}`));
      return;
    }
    logger.error({ err: crash, addresses: this.addresses }, 'control thread crashed; restarting it on the same addresses');
    try {
      await this.options.prepare(this.addresses);
      // Shutdown began meanwhile: it found no thread to stop, so none is started.
      if (this.closing) return;
      await this.spawn(this.addresses);
      logger.warn({ addresses: this.addresses }, 'control thread restarted');
    } catch (error) {
      // A thread that shutdown terminated before it listened did not fail to restart.
      if (this.closing) return;
      logger.fatal({ err: error, addresses: this.addresses }, 'control thread could not be restarted');
      this.giveUp(error as Error);
    }
  }
}
