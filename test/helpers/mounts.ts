/**
 * Real file systems with real faults under a daemon's volume, mounted as root (the daemon tests run as
 * root; without it these fail loudly, never skip):
 *
 * - a small tmpfs, to fill up (ENOSPC) and to grow again (`mount -o remount,size=`);
 * - an ext4 whose block device can be paused: every request to it then waits until it is resumed, as on
 *   a hung disk or an overloaded SAN. It is ext4 on a loop device over a file that nbdfuse serves from
 *   nbdkit's memory plugin behind nbdkit's pause filter, whose control socket pauses and resumes.
 *
 * Each mount is undone by stopAll (test/helpers/daemon.ts) after the daemons are gone; a paused one is
 * resumed first, since a process blocked on it cannot die.
 */
import { spawn } from 'node:child_process';
import { watch } from 'node:fs';
import { access, mkdir, mkdtemp, rm } from 'node:fs/promises';
import { createConnection, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { onCleanup } from './daemon.js';
import { requireTool, runOk } from './process.js';

/** How long nbdfuse gets to serve its file, and to exit once unmounted. */
export const fuseReadyTimeoutMs = 15_000;
/** How long the pause filter gets to answer a command (a pause waits for the requests in flight). */
export const pauseCommandTimeoutMs = 30_000;

export interface Mount {
  readonly dir: string;
  unmount(): Promise<void>;
}

export interface Tmpfs extends Mount {
  /** Grows (or shrinks) the file system in place. */
  resize(sizeBytes: number): Promise<void>;
}

export async function mountTmpfs(dir: string, sizeBytes: number): Promise<Tmpfs> {
  const mount = requireTool('mount');
  const umount = requireTool('umount');
  await runOk(mount, ['-t', 'tmpfs', '-o', `size=${sizeBytes},mode=0755`, 'tmpfs', dir]);
  let mounted = true;
  const unmount = async () => {
    if (!mounted) return;
    mounted = false;
    await runOk(umount, [dir]);
  };
  onCleanup(unmount);
  return {
    dir,
    unmount,
    resize: async (bytes) => {
      await runOk(mount, ['-o', `remount,size=${bytes}`, dir]);
    },
  };
}

export interface PausableMount extends Mount {
  /** Resolves once the device has finished the requests it had; later ones wait. */
  pause(): Promise<void>;
  resume(): Promise<void>;
}

/** Resolves once `file` exists (nbdfuse writes its pid file when it serves); rejects if `failed` does first. */
async function fileAppears(dir: string, name: string, failed: Promise<string>, timeoutMs: number): Promise<void> {
  const watcher = watch(dir);
  try {
    const appeared = new Promise<void>((resolve) => {
      watcher.on('change', (_event, changed) => {
        if (changed === name) resolve();
      });
    });
    const present = access(join(dir, name)).then(
      () => true,
      () => false,
    );
    if (await present) return;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${join(dir, name)} did not appear within ${timeoutMs} ms`)), timeoutMs);
    });
    await Promise.race([appeared, failed.then((why) => Promise.reject(new Error(why))), timeout]).finally(() => clearTimeout(timer));
  } finally {
    watcher.close();
  }
}

/** One-character commands to nbdkit's pause filter, each answered by its upper case. */
function pauseControl(path: string): { command(letter: 'p' | 'r'): Promise<void>; close(): void } {
  const socket: Socket = createConnection(path);
  let received = '';
  const waiters: { letter: string; resolve: () => void }[] = [];
  socket.setEncoding('utf8');
  socket.on('data', (chunk: string) => {
    received += chunk;
    while (waiters.length > 0 && received.includes(waiters[0].letter)) {
      received = received.replace(waiters[0].letter, '');
      waiters.shift()!.resolve();
    }
  });
  return {
    command(letter) {
      let timer: NodeJS.Timeout | undefined;
      const answered = new Promise<void>((resolve, reject) => {
        waiters.push({ letter: letter.toUpperCase(), resolve });
        timer = setTimeout(() => reject(new Error(`the pause filter did not answer '${letter}' within ${pauseCommandTimeoutMs} ms`)), pauseCommandTimeoutMs);
      });
      socket.write(letter);
      return answered.finally(() => clearTimeout(timer));
    },
    close: () => socket.destroy(),
  };
}

/** An empty ext4 of `sizeBytes` mounted on `dir`, whose device can be paused. */
export async function mountPausable(dir: string, sizeBytes: number): Promise<PausableMount> {
  const umount = requireTool('umount');
  const losetup = requireTool('losetup');
  const work = await mkdtemp(join(tmpdir(), 'gannet-pausable-'));
  const fuseDir = join(work, 'fuse');
  await mkdir(fuseDir);
  const controlPath = join(work, 'pause.sock');
  const fuseFile = join(fuseDir, 'disk');
  const nbdfuse = spawn(
    requireTool('nbdfuse'),
    ['-P', join(work, 'nbdfuse.pid'), fuseFile, '--command', requireTool('nbdkit'), '-s', '--exit-with-parent', '--filter=pause', 'memory', String(sizeBytes), `pause-control=${controlPath}`],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  nbdfuse.stderr!.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
  const exited = new Promise<string>((resolve) => nbdfuse.once('exit', (code, signal) => resolve(`nbdfuse exited (${code ?? signal}): ${stderr}`)));
  let loop: string | undefined;
  let control: ReturnType<typeof pauseControl> | undefined;
  let fuseMounted = false;
  let mounted = false;
  let paused = false;
  const resume = async () => {
    if (!paused) return;
    await control!.command('r');
    paused = false;
  };
  let unmounting: Promise<void> | undefined;
  const unmount = () => (unmounting ??= teardown());
  const teardown = async () => {
    await resume();
    control?.close();
    if (mounted) await runOk(umount, [dir]);
    mounted = false;
    if (loop !== undefined) await runOk(losetup, ['-d', loop]);
    loop = undefined;
    if (fuseMounted) await runOk(umount, [fuseDir]);
    fuseMounted = false;
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<'late'>((resolve) => {
      timer = setTimeout(() => resolve('late'), fuseReadyTimeoutMs);
    });
    if ((await Promise.race([exited, late])) === 'late') nbdfuse.kill('SIGKILL');
    clearTimeout(timer);
    await exited;
    await rm(work, { recursive: true, force: true });
  };
  onCleanup(resume, { beforeKill: true });
  onCleanup(unmount);
  await fileAppears(work, 'nbdfuse.pid', exited, fuseReadyTimeoutMs);
  fuseMounted = true;
  control = pauseControl(controlPath);
  loop = (await runOk(losetup, ['--find', '--show', fuseFile])).stdout.trim();
  await runOk(requireTool('mkfs.ext4'), ['-q', loop]);
  await runOk(requireTool('mount'), [loop, dir]);
  mounted = true;
  await rm(join(dir, 'lost+found'), { recursive: true, force: true });
  return {
    dir,
    unmount,
    async pause() {
      await control!.command('p');
      paused = true;
    },
    resume,
  };
}
