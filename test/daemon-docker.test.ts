/**
 * Goal: docker/Dockerfile and docker/compose.yaml say what the daemon accepts, without a Docker engine
 * (none runs on our machines or in CI). The image's ENTRYPOINT+CMD and the compose service's command are
 * run as `gannet` with the same flags (only the in-container data dir, the certificate mount and the
 * 0.0.0.0 ports swapped for a temporary dir, certificates made by the test and free loopback ports),
 * and the HEALTHCHECK's exact `node -e` command is run against that daemon (passing) and after it
 * stopped (failing).
 *
 * Method: a small Dockerfile reader (instructions, JSON-form arguments, stages) and the yaml package.
 */
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { loadClientX509, NbdClient, REP_ERR_TLS_REQD } from 'nbd-server-js';
import { makeTempDir, repoRoot, run, startDaemon, stopAll, type DaemonHandle } from './helpers/daemon.js';
import { makePki } from './helpers/pki.js';
import { removeTmpDirs } from './helpers/process.js';

// yaml is a dependency of @gannet/server, not of the root package: load it the way the daemon does.
const YAML = createRequire(join(repoRoot, 'packages/server/package.json'))('yaml') as { parse(text: string): any };

interface Instruction {
  keyword: string;
  args: string;
}

/** Instructions with continuation lines joined and comments dropped. */
function parseDockerfile(text: string): Instruction[] {
  const instructions: Instruction[] = [];
  let pending = '';
  for (const line of text.split('\n')) {
    if (/^\s*#/.test(line) && pending === '') continue;
    if (line.trimEnd().endsWith('\\')) {
      pending += `${line.trimEnd().slice(0, -1)} `;
      continue;
    }
    const full = (pending + line).trim();
    pending = '';
    if (full === '') continue;
    const match = /^(\w+)\s+(.*)$/s.exec(full);
    if (!match) throw new Error(`not a Dockerfile instruction: ${full}`);
    instructions.push({ keyword: match[1].toUpperCase(), args: match[2] });
  }
  return instructions;
}

function jsonForm(args: string): string[] {
  const value: unknown = JSON.parse(args);
  if (!Array.isArray(value) || !value.every((item) => typeof item === 'string')) throw new Error(`not exec form: ${args}`);
  return value;
}

const dockerfile = async () => parseDockerfile(await readFile(join(repoRoot, 'docker/Dockerfile'), 'utf8'));
const only = (instructions: Instruction[], keyword: string) => {
  const found = instructions.filter((instruction) => instruction.keyword === keyword);
  expect(found.length, `one ${keyword}`).toBeGreaterThan(0);
  return found[found.length - 1];
};

/** The container's arguments with its paths (data dir, mounts) and public ports swapped for test-safe ones. */
function localize(args: string[], paths: Record<string, string>): string[] {
  return args.map((arg) => paths[arg] ?? arg.replace(/^0\.0\.0\.0:\d+$/, '127.0.0.1:0'));
}

function flagValue(args: string[], flag: string): string {
  const index = args.indexOf(flag);
  expect(index, `${flag} in ${args.join(' ')}`).toBeGreaterThanOrEqual(0);
  return args[index + 1];
}

/** Starts `gannet` with the given container arguments (after the entrypoint's script). */
async function startAsContainer(containerArgs: string[], mounts: Record<string, string> = {}): Promise<DaemonHandle> {
  const dataDir = await makeTempDir();
  const args = localize(containerArgs, { '/data': dataDir, ...mounts });
  expect(args[0]).toBe('serve');
  return startDaemon({ dataDir, volumes: [], args: args.slice(1) });
}

describe('docker/ files, checked without Docker', () => {
  afterEach(stopAll);
  afterAll(removeTmpDirs);

  it('the Dockerfile: pnpm build stage, node:20-slim non-root runtime, ports, existing inputs', async () => {
    const instructions = await dockerfile();
    const froms = instructions.filter((instruction) => instruction.keyword === 'FROM').map((instruction) => instruction.args);
    expect(froms.length).toBeGreaterThanOrEqual(2);
    expect(froms[0]).toMatch(/^node:20\S* AS build$/);
    expect(froms[froms.length - 1]).toBe('node:20-slim');
    const runtimeStart = instructions.findIndex((instruction) => instruction.keyword === 'FROM' && instruction.args === 'node:20-slim');
    const runtime = instructions.slice(runtimeStart);
    const user = only(runtime, 'USER').args;
    expect(user).not.toMatch(/^(root|0)(:|$)/);
    expect(only(runtime, 'EXPOSE').args.split(/\s+/).sort()).toEqual(['10809', '10810']);
    expect(instructions.some((instruction) => instruction.keyword === 'RUN' && /pnpm install --frozen-lockfile/.test(instruction.args))).toBe(true);
    for (const copy of instructions.filter((instruction) => instruction.keyword === 'COPY' && !instruction.args.startsWith('--from'))) {
      const sources = copy.args.split(/\s+/).slice(0, -1);
      for (const source of sources) expect(existsSync(join(repoRoot, source)), `COPY source ${source}`).toBe(true);
    }
    const entrypoint = jsonForm(only(runtime, 'ENTRYPOINT').args);
    expect(entrypoint).toEqual(['node', '/app/bin/gannet.js']);
  });

  it("the image's CMD starts a daemon whose HEALTHCHECK passes, and fails once it stopped", async () => {
    const instructions = await dockerfile();
    const cmd = jsonForm(only(instructions, 'CMD').args);
    expect(flagValue(cmd, '--control')).toBe('0.0.0.0:10810');
    expect(flagValue(cmd, '--nbd')).toBe('0.0.0.0:10809');
    const daemon = await startAsContainer(cmd);

    const healthcheck = /^(?:--\S+\s+)*CMD\s+(\[.*\])$/s.exec(only(instructions, 'HEALTHCHECK').args);
    expect(healthcheck).not.toBeNull();
    const probe = jsonForm(healthcheck![1]);
    expect(probe[0]).toBe('node');
    expect(probe[1]).toBe('-e');
    expect(probe[2]).toContain('http://127.0.0.1:10810/healthz');
    const localProbe = probe[2].replace('127.0.0.1:10810', `127.0.0.1:${daemon.control.port}`);

    const healthy = await run(process.execPath, ['-e', localProbe]);
    expect(healthy.status).toBe(0);
    expect((await daemon.stop()).code).toBe(0);
    const unhealthy = await run(process.execPath, ['-e', localProbe]);
    expect(unhealthy.status).toBe(1);
  });

  it("compose.yaml's secondary service: its command runs, its data volume is the daemon's data dir", async () => {
    const compose = YAML.parse(await readFile(join(repoRoot, 'docker/compose.yaml'), 'utf8'));
    const service = compose.services['gannet-secondary'];
    expect(service.build).toEqual({ context: '..', dockerfile: 'docker/Dockerfile' });
    expect(existsSync(join(repoRoot, 'docker', service.build.context, service.build.dockerfile))).toBe(true);
    const command: string[] = service.command;
    const mount = (service.volumes as string[]).map((volume) => volume.split(':'));
    expect(mount).toContainEqual(['gannet-data', flagValue(command, '--data-dir')]);
    expect(Object.keys(compose.volumes)).toContain('gannet-data');
    expect(service.ports).toEqual(expect.arrayContaining([expect.stringMatching(/:10809:10809$|^10809:10809$/), expect.stringMatching(/10810:10810$/)]));

    // NBD is published, so TLS is required, with certificates from a read-only bind mount of ./pki.
    expect(flagValue(command, '--tls')).toBe('require');
    const certificates = flagValue(command, '--tls-certificates');
    expect(mount).toContainEqual(['./pki', certificates, 'ro']);
    const pki = await makePki();
    const daemon = await startAsContainer(command, { [certificates]: pki.serverDir });
    const volume = flagValue(command, '--volume').split(':')[0];
    expect(daemon.stdoutLines.some((line) => line.startsWith(`volume ${volume}:`))).toBe(true);
    const exportName = `${volume}/primary`;
    await expect(NbdClient.connect(daemon.nbd, { exportName })).rejects.toMatchObject({ replyType: REP_ERR_TLS_REQD });
    const client = await NbdClient.connect(daemon.nbd, { exportName, tls: { x509: await loadClientX509(pki.anonymousDir) } });
    await client.close();
    expect((await daemon.stop()).code).toBe(0);
  });
});
