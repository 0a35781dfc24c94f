export * from './config.js';
export * from './registry.js';
export * from './control.js';
export * from './control-lane.js';
export {
  ControlThread,
  controlRestartsMax,
  controlRestartWindowMs,
  controlThreadNice,
  controlWorkerEntry,
  type ControlThreadOptions,
} from './control-thread.js';
export * from './events.js';
export * from './metrics.js';
export * from './qemu.js';
export * from './client.js';
export * from './peer-link.js';
export * from './primary-set.js';
export { Daemon, ensureToken, nbdShutdownGraceMs, controlShutdownGraceMs, type ControlAddress } from './daemon.js';
export { main, buildProgram, startupLines, readyLine, exitOk, exitRefused, exitUsage } from './cli.js';
