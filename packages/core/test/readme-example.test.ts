/**
 * The README's usage example is examples/usage.ts, verbatim, and it runs: a README that drifts from the
 * code, or an example that no longer works, fails here.
 */
import { readFileSync } from 'node:fs';
import { expect, it } from 'vitest';

const example = readFileSync(new URL('../examples/usage.ts', import.meta.url), 'utf8');
const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');

it('the README contains examples/usage.ts verbatim', () => {
  expect(readme).toContain('```ts\n' + example + '```');
});

it('examples/usage.ts runs to completion', async () => {
  const logs: string[] = [];
  const log = console.log;
  console.log = (...args: unknown[]) => void logs.push(args.join(' '));
  try {
    await import('../examples/usage.ts');
  } finally {
    console.log = log;
  }
  expect(logs).toContain('failed-over after epoch 1');
});
