/**
 * A small Linux guest for QEMU, assembled from Debian packages: the kernel of the installed
 * linux-image package (/boot/vmlinuz-RELEASE), and an initramfs holding the static busybox, the modules
 * a virtio disk with ext4 needs (with their dependencies, from /lib/modules/RELEASE/modules.dep), and
 * the caller's init script.
 *
 * The initramfs is a newc cpio archive written here (no cpio or gzip needed; the kernel takes it
 * uncompressed), cached under node_modules/.cache/gannet-guest/ by a hash of everything in it, so a
 * kernel or busybox upgrade, or a changed script, builds a new one.
 */
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { kernelReleases, staticBusybox } from '../setup/requirements.mjs';
import { repoRoot } from './daemon.js';

/** What the guest loads: virtio over PCI, its disks, ext4; crc32c_generic for ext4's metadata checksums. */
export const guestModules = ['virtio_pci', 'virtio_blk', 'ext4', 'crc32c_generic'] as const;

export interface GuestPieces {
  release: string;
  kernel: string;
  initramfs: string;
}

/** The module files for `names` and everything they depend on, dependencies first; built-ins left out. */
export async function moduleClosure(release: string, names: readonly string[]): Promise<string[]> {
  const dir = join('/lib/modules', release);
  const dependencies = new Map<string, string[]>();
  for (const line of (await readFile(join(dir, 'modules.dep'), 'utf8')).split('\n')) {
    const [module, rest] = line.split(':');
    if (rest !== undefined) dependencies.set(module, rest.trim().split(/\s+/).filter((d) => d !== ''));
  }
  const builtin = new Set((await readFile(join(dir, 'modules.builtin'), 'utf8')).split('\n').map(moduleName));
  const byName = new Map([...dependencies.keys()].map((path) => [moduleName(path), path]));
  const ordered: string[] = [];
  const visit = (path: string) => {
    if (ordered.includes(path)) return;
    for (const dependency of dependencies.get(path) ?? []) visit(dependency);
    ordered.push(path);
  };
  for (const name of names) {
    if (builtin.has(name)) continue;
    const path = byName.get(name);
    if (path === undefined) throw new Error(`kernel ${release} has no module ${name} (neither in modules.dep nor built in)`);
    visit(path);
  }
  return ordered.map((path) => join(dir, path));
}

/** `kernel/fs/ext4/ext4.ko` → `ext4`; modules.dep names files, and `-` and `_` are the same in names. */
function moduleName(path: string): string {
  return (path.split('/').at(-1) ?? '').replace(/\.ko(\.\w+)?$/, '').replaceAll('-', '_');
}

interface CpioEntry {
  name: string;
  mode: number;
  data?: Buffer;
  /** For device nodes: [major, minor]. */
  rdev?: [number, number];
}

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFCHR = 0o020000;

/** An uncompressed newc ("070701") cpio archive, as the kernel unpacks into its initial rootfs. */
export function cpioNewc(entries: readonly CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let length = 0;
  const push = (buffer: Buffer) => {
    parts.push(buffer);
    length += buffer.length;
    const pad = (4 - (length % 4)) % 4;
    if (pad > 0) {
      parts.push(Buffer.alloc(pad));
      length += pad;
    }
  };
  const hex = (value: number) => value.toString(16).padStart(8, '0');
  [...entries, { name: 'TRAILER!!!', mode: 0 }].forEach((entry, index) => {
    const data = entry.data ?? Buffer.alloc(0);
    const [rdevMajor, rdevMinor] = entry.rdev ?? [0, 0];
    const fields = [index + 1, entry.mode, 0, 0, 1, 0, data.length, 0, 0, rdevMajor, rdevMinor, Buffer.byteLength(entry.name) + 1, 0];
    push(Buffer.concat([Buffer.from(`070701${fields.map(hex).join('')}`), Buffer.from(`${entry.name}\0`)]));
    if (data.length > 0) push(data);
  });
  return Buffer.concat(parts, length);
}

/**
 * The kernel and an initramfs whose /init is `initScript` (run by busybox sh, with busybox's applets
 * installed in /bin and the modules' file names, in load order, in /lib/modules/order).
 */
export async function guestPieces(initScript: string): Promise<GuestPieces> {
  const release = kernelReleases()[0];
  if (release === undefined) throw new Error('no readable /boot/vmlinuz-* with its /lib/modules: apt-get install linux-image-amd64');
  const busybox = staticBusybox();
  if (busybox === undefined) throw new Error('no statically linked busybox: apt-get install busybox-static');
  const modules = await moduleClosure(release, guestModules);
  const moduleFiles = await Promise.all(modules.map(async (path) => ({ name: path.split('/').at(-1)!, data: await readFile(path) })));
  const busyboxData = await readFile(busybox);

  const hash = createHash('sha256').update(release).update(busyboxData).update(initScript);
  for (const file of moduleFiles) hash.update(file.name).update(file.data);
  const cacheDir = join(repoRoot, 'node_modules/.cache/gannet-guest');
  const initramfs = join(cacheDir, `initramfs-${release}-${hash.digest('hex').slice(0, 16)}.cpio`);
  if (!existsSync(initramfs)) {
    const directory = (name: string): CpioEntry => ({ name, mode: S_IFDIR | 0o755 });
    const archive = cpioNewc([
      ...['bin', 'dev', 'proc', 'sys', 'mnt', 'tmp', 'lib', 'lib/modules'].map(directory),
      // The kernel opens /dev/console for init before anything could mount devtmpfs.
      { name: 'dev/console', mode: S_IFCHR | 0o600, rdev: [5, 1] },
      { name: 'bin/busybox', mode: S_IFREG | 0o755, data: busyboxData },
      { name: 'init', mode: S_IFREG | 0o755, data: Buffer.from(initScript) },
      ...moduleFiles.map((file) => ({ name: `lib/modules/${file.name}`, mode: S_IFREG | 0o644, data: file.data })),
      { name: 'lib/modules/order', mode: S_IFREG | 0o644, data: Buffer.from(moduleFiles.map((file) => `${file.name}\n`).join('')) },
    ]);
    await mkdir(cacheDir, { recursive: true });
    // Written aside and renamed, so a concurrent run never boots a half-written archive.
    const partial = `${initramfs}.${process.pid}.partial`;
    await writeFile(partial, archive);
    await rename(partial, initramfs);
    // Archives of older kernels, busyboxes or scripts are never used again.
    for (const name of await readdir(cacheDir)) {
      if (/^initramfs-.*\.cpio$/.test(name) && join(cacheDir, name) !== initramfs) await rm(join(cacheDir, name), { force: true });
    }
  }
  return { release, kernel: join('/boot', `vmlinuz-${release}`), initramfs };
}
