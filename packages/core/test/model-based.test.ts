/**
 * Goal: each strategy's views, checkpoints, flushes and failovers agree byte for byte with the reference
 * model (model.ts) over random, concurrent, seeded interleavings. Method: model-harness.ts. The COLO
 * baseline does file I/O for every request, so the default run gives it fewer seeds.
 */
import { runModelBasedTests } from './model-harness.js';

/** COLO seeds in the default run (GANNET_LONG runs as many as gannet's). */
const coloSeedCount = 10;

runModelBasedTests('gannet');
runModelBasedTests('colo', { seedCount: coloSeedCount });
