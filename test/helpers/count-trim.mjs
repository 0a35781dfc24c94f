/**
 * Preloaded into a daemon (`node --import`) by tests that count the range operations the daemon runs:
 * it wraps fs-native-extensions' trim (FileDevice's hole punch, the module instance the daemon
 * itself loads) and, as the process exits, writes to $GANNET_TRIM_COUNT_FILE how many calls ran in all
 * and the most that ran at once.
 */
import { writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const file = process.env.GANNET_TRIM_COUNT_FILE;
if (!file) throw new Error('count-trim.mjs needs GANNET_TRIM_COUNT_FILE');
const fsExt = createRequire(new URL('../../packages/block-device/package.json', import.meta.url))('fs-native-extensions');
const trim = fsExt.trim;
let running = 0;
let runningMax = 0;
let calls = 0;
fsExt.trim = async (...args) => {
  calls += 1;
  running += 1;
  runningMax = Math.max(runningMax, running);
  try {
    return await trim(...args);
  } finally {
    running -= 1;
  }
};
process.on('exit', () => writeFileSync(file, JSON.stringify({ calls, runningMax })));
