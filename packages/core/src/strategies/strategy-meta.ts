import { mkdir, open, readFile, rename } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { GannetError } from '../errors.js';
import type { StrategyName } from '../types.js';

/**
 * The only metadata the disk baselines keep: which strategy owns the data directory, the epoch at the
 * last orderly close, and whether the volume failed over (and to what), so a restarted daemon serves a
 * failed-over volume as the plain disk it became. Written at failover and at close, never per request.
 */

const metaFileName = 'strategy.json';

const strategyMetaSchema = z
  .object({
    strategy: z.enum(['colo', 'passthrough']),
    epoch: z.number().int().nonnegative(),
    failoverTarget: z.enum(['secondary', 'checkpoint', 'primary']).optional(),
  })
  .strict();

export type StrategyMeta = z.output<typeof strategyMetaSchema>;

export async function readStrategyMeta(dataDir: string, strategy: Extract<StrategyName, 'colo' | 'passthrough'>): Promise<StrategyMeta> {
  let text: string;
  try {
    text = await readFile(join(dataDir, metaFileName), 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return { strategy, epoch: 0 };
    throw error;
  }
  const meta = strategyMetaSchema.parse(JSON.parse(text));
  if (meta.strategy !== strategy) {
    throw new GannetError('EMISMATCH', `${dataDir}: holds a ${meta.strategy} volume, not a ${strategy} one`);
  }
  return meta;
}

/** Write to a temporary file, fsync, rename: a crash leaves the old record or the new one. */
export async function writeStrategyMeta(dataDir: string, meta: StrategyMeta): Promise<void> {
  await mkdir(dataDir, { recursive: true });
  const path = join(dataDir, metaFileName);
  const tmp = `${path}.tmp`;
  const handle = await open(tmp, 'w', 0o600);
  try {
    await handle.writeFile(`${JSON.stringify(strategyMetaSchema.parse(meta))}\n`);
    await handle.datasync();
  } finally {
    await handle.close();
  }
  await rename(tmp, path);
}
