import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

const src = (p: string) => fileURLToPath(new URL(`./packages/${p}`, import.meta.url));

// Tests import the workspace packages from source, so a test run never sees a stale build; the CLIs
// that interop tests spawn run from dist, which `pnpm test` builds first.
export default defineConfig({
  resolve: {
    alias: [
      { find: /^@gannet\/block-device\/conformance$/, replacement: src('block-device/src/conformance.ts') },
      { find: /^@gannet\/block-device$/, replacement: src('block-device/src/index.ts') },
      { find: /^nbd-server-js$/, replacement: src('nbd-server-js/src/index.ts') },
      { find: /^@gannet\/core$/, replacement: src('core/src/index.ts') },
      { find: /^@gannet\/server$/, replacement: src('server/src/index.ts') },
      { find: /^@gannet\/bench$/, replacement: src('bench/src/index.ts') },
    ],
  },
  test: {
    include: ['packages/*/test/**/*.test.ts', 'test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: 'forks',
    reporters: ['default'],
  },
});
