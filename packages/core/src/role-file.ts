import { join } from 'node:path';
import { z } from 'zod';
import { GannetError } from './errors.js';
import type { Storage } from './storage.js';

/**
 * Which role a volume directory belongs to. The two roles keep their metadata under different names in
 * the same dataDir (the secondary: volume-state.json and gannet-meta; the primary: primary-meta), and a
 * role change (role-change.ts) builds the new role's files beside the old ones before it rewrites this
 * file: this file is the commit point. Each role's open refuses a directory this file gives to the other
 * role, so a crash at any step leaves the old role whole or the new one complete, never a mix that one of
 * them takes for its own. A directory without the file is one no role change has touched: its files say
 * which role it is, as before.
 */
export const roleFileName = 'volume-role.json';
const roleFileBytesMax = 4096;

export type VolumeRole = 'primary' | 'secondary';

const roleSchema = z.object({ format: z.literal(1), role: z.enum(['primary', 'secondary']), since: z.string() }).strict();
export type RoleRecord = z.output<typeof roleSchema>;

export async function readRole(storage: Storage, dataDir: string): Promise<RoleRecord | null> {
  const path = join(dataDir, roleFileName);
  const bytes = await storage.readFile(path);
  if (bytes === undefined) return null;
  if (bytes.byteLength > roleFileBytesMax) throw new GannetError('EMETA', `the role file ${path} is damaged: larger than ${roleFileBytesMax} bytes`);
  let value: unknown;
  try {
    value = JSON.parse(Buffer.from(bytes).toString('utf8'));
  } catch {
    throw new GannetError('EMETA', `the role file ${path} is damaged: not JSON`);
  }
  const parsed = roleSchema.safeParse(value);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new GannetError('EMETA', `the role file ${path} is damaged: field ${issue.path.join('.') || '(top)'}: ${issue.message}`);
  }
  return parsed.data;
}

export async function writeRole(storage: Storage, dataDir: string, role: VolumeRole): Promise<void> {
  const record: RoleRecord = { format: 1, role, since: new Date().toISOString() };
  await storage.writeFileAtomic(join(dataDir, roleFileName), Buffer.from(`${JSON.stringify(record)}\n`));
}

/** Refuses to open dataDir as `role` when its role file gives it to the other role. */
export async function checkRole(storage: Storage, dataDir: string, role: VolumeRole): Promise<void> {
  const record = await readRole(storage, dataDir);
  if (record !== null && record.role !== role) {
    throw new GannetError(
      'EMETA',
      `${dataDir} holds the ${record.role} role of its volume since ${record.since} (${join(dataDir, roleFileName)}): it cannot be opened as the ${role}`,
    );
  }
}
