import { runModelBasedTests } from './model-harness.js';
runModelBasedTests('colo');
