/**
 * Goal: `pnpm test`'s set-up check (test/setup/requirements.mjs) names the Debian package of a missing
 * client in one message with the install line, and only as root does it run apt-get, then checks again.
 *
 * Method: run the script with PATH pointing at a directory of symlinks to every program on this
 * machine's PATH except the ones "uninstalled", and a fake apt-get in it that logs its arguments (and,
 * for `install`, links the missing program back in). GANNET_SETUP_AS picks the user or root path.
 */
import { readdir, readFile, symlink, writeFile, chmod } from 'node:fs/promises';
import { delimiter, join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { makeTmpDir, removeTmpDirs, runCommand } from './helpers/process.js';
import { repoRoot } from './helpers/daemon.js';

const script = join(repoRoot, 'test/setup/requirements.mjs');

afterAll(removeTmpDirs);

/**
 * A PATH directory holding everything on this PATH except `without`, plus an apt-get that logs its
 * arguments and, for `install`, links the programs of `without` back in, as installing them would.
 */
async function strippedPath(without: string[]): Promise<{ dir: string; aptLog: string }> {
  const dir = await makeTmpDir('gannet-path-');
  const aptLog = join(dir, 'apt-get.log');
  const seen = new Set<string>(['apt-get']);
  const originals = new Map<string, string>();
  for (const source of (process.env.PATH ?? '').split(delimiter).filter((d) => d !== '')) {
    let names: string[];
    try {
      names = await readdir(source);
    } catch {
      continue;
    }
    for (const name of names) {
      if (seen.has(name)) continue;
      seen.add(name);
      if (without.includes(name)) originals.set(name, join(source, name));
      else await symlink(join(source, name), join(dir, name));
    }
  }
  expect([...originals.keys()].sort(), 'the programs to hide must be installed here').toEqual([...without].sort());
  const restore = [...originals].map(([name, original]) => `ln -s '${original}' '${join(dir, name)}'`).join('\n');
  await writeFile(join(dir, 'apt-get'), `#!/bin/sh\necho "$*" >> '${aptLog}'\nif [ "$1" = install ]; then\n${restore}\nfi\n`);
  await chmod(join(dir, 'apt-get'), 0o755);
  return { dir, aptLog };
}

function runCheck(path: string, as: 'user' | 'root') {
  return runCommand(process.execPath, [script], { env: { ...process.env, PATH: path, GANNET_SETUP_AS: as } });
}

const readLog = (file: string) => readFile(file, 'utf8').catch(() => '');

describe('pnpm test set-up check', () => {
  it('passes silently when everything is installed', async () => {
    const r = await runCheck(process.env.PATH ?? '', 'user');
    expect(r.stderr).toBe('');
    expect(r.stdout).toBe('');
    expect(r.status).toBe(0);
  });

  it('as a user, stops with one message naming the missing package and the install line, installing nothing', async () => {
    const { dir, aptLog } = await strippedPath(['qemu-img']);
    const r = await runCheck(dir, 'user');
    expect(r.status).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toBe(
      'gannet tests: missing qemu-img (qemu-utils). Install with:\n' +
        '  sudo apt-get update && sudo apt-get install -y --no-install-recommends qemu-utils\n',
    );
    expect(await readLog(aptLog)).toBe('');
  });

  it('names each missing package once, in one install line', async () => {
    const { dir } = await strippedPath(['qemu-img', 'qemu-io', 'fio']);
    const r = await runCheck(dir, 'user');
    expect(r.status).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(2);
    expect(r.stderr).toContain('qemu-io (qemu-utils), qemu-img (qemu-utils), fio (fio)');
    expect(r.stderr).toContain('apt-get install -y --no-install-recommends qemu-utils fio\n');
  });

  it('as root, says what it installs, runs apt-get update then install, and checks again', async () => {
    const { dir, aptLog } = await strippedPath(['fio']);
    const r = await runCheck(dir, 'root');
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout).toContain('gannet tests: installing fio with apt-get, for fio (fio)');
    expect(await readLog(aptLog)).toBe('update -q\ninstall -y -q --no-install-recommends fio\n');
  });

  it('as root, fails when the package did not bring the program', async () => {
    const { dir, aptLog } = await strippedPath(['qemu-img']);
    await writeFile(join(dir, 'apt-get'), `#!/bin/sh\necho "$*" >> '${aptLog}'\n`);
    const r = await runCheck(dir, 'root');
    expect(r.status).toBe(1);
    expect(r.stderr).toBe('gannet tests: still missing after apt-get install: qemu-img (qemu-utils)\n');
  });
});
