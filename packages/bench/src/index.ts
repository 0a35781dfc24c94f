export { main } from './cli.js';
export * from './profiles.js';
export * from './workload.js';
export * from './stats.js';
export * from './report.js';
export * from './daemon.js';
export { runBench, medianRun, strategyOf, type RunnerOptions } from './runner.js';
export { Progress } from './progress.js';
