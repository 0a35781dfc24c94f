/**
 * Goal: the gannet strategy's views, checkpoints, flushes and failovers agree byte for byte with the
 * reference model (model.ts) over random, concurrent, seeded interleavings. Method: model-harness.ts;
 * the colo strategy runs through the same harness.
 */
import { runModelBasedTests } from './model-harness.js';

runModelBasedTests('gannet');
