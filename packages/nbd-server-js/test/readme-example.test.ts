/**
 * Goal: the README's usage example works and is the code we run.
 * Method: run examples/serve-memory.ts and check its result, then check the README holds that file's
 * code verbatim in the fenced block after its `<!-- example: ... -->` marker.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { serveMemory } from '../examples/serve-memory.js';

const packageDir = new URL('../', import.meta.url);
const examplePath = 'examples/serve-memory.ts';

/** The body of the fenced code block that follows `<!-- example: PATH -->`. */
function exampleBlock(readme: string, path: string): string | undefined {
  const marker = `<!-- example: ${path} -->\n`;
  const at = readme.indexOf(marker);
  if (at < 0) return undefined;
  const fence = readme.slice(at + marker.length).match(/^```ts\n([\s\S]*?)^```$/m);
  return fence?.index === 0 ? fence[1] : undefined;
}

describe('README example', () => {
  it('runs: serves a MemoryDevice, writes and reads back through NbdClient', async () => {
    expect(await serveMemory()).toBe('hello, block device');
  });

  it('is shown in the README exactly as in the example file', () => {
    const readme = readFileSync(new URL('README.md', packageDir), 'utf8');
    const code = readFileSync(new URL(examplePath, packageDir), 'utf8');
    expect(exampleBlock(readme, examplePath)).toBe(code);
  });

  it('detects a README that drifted from the example', () => {
    const readme = readFileSync(new URL('README.md', packageDir), 'utf8');
    const drifted = readme.replace('hello, block device', 'hello, world');
    const code = readFileSync(new URL(examplePath, packageDir), 'utf8');
    expect(exampleBlock(drifted, examplePath)).not.toBe(code);
    expect(exampleBlock(readme.replace(`<!-- example: ${examplePath} -->\n`, ''), examplePath)).toBeUndefined();
  });
});
