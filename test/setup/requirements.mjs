#!/usr/bin/env node
/**
 * Run by `pnpm test` before vitest: the tests drive real programs from Debian packages (NBD clients,
 * fio, QEMU, and the kernel, busybox and e2fsprogs that the Linux guest test is assembled from), and a
 * missing one must not surface as dozens of failing tests. As root with apt-get, the missing packages are
 * installed (saying which); otherwise the run stops at once with one message giving the install line.
 *
 * GANNET_SETUP_AS=user|root overrides the root check, so a test can run either path without privileges.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { accessSync, constants, existsSync, openSync, readSync, readdirSync, closeSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * Programs found through PATH, then the sbin directories: a user's PATH on Debian has no sbin, where
 * e2fsprogs puts mkfs.ext4, e2fsck and debugfs.
 */
const sbinDirs = ['/usr/sbin', '/sbin'];

/** What ocf:gannet:volume sources, as resource-agents' own agents do. */
export const ocfShellfuncs = '/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs';

/** libnbd's binding is a Debian package, so it lives in the system Python, not a pyenv/venv one. */
export const systemPython = '/usr/bin/python3';

/** The full path of `name`, or undefined when it is not installed. */
export function findProgram(name, path = process.env.PATH ?? '') {
  for (const dir of [...path.split(delimiter).filter((d) => d !== ''), ...sbinDirs]) {
    const candidate = join(dir, name);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not in this directory
    }
  }
  return undefined;
}

/** A kernel release whose image in /boot can be read and whose modules are installed, newest first. */
export function kernelReleases() {
  let names;
  try {
    names = readdirSync('/boot');
  } catch {
    return [];
  }
  return names
    .filter((name) => name.startsWith('vmlinuz-'))
    .map((name) => name.slice('vmlinuz-'.length))
    .filter((release) => {
      try {
        accessSync(join('/boot', `vmlinuz-${release}`), constants.R_OK);
        return existsSync(join('/lib/modules', release, 'modules.dep'));
      } catch {
        return false;
      }
    })
    .sort((a, b) => b.localeCompare(a, 'en', { numeric: true }));
}

/**
 * The statically linked busybox (package busybox-static), or undefined. Debian's plain `busybox`
 * package installs a dynamically linked one at the same path, which cannot run alone in an initramfs:
 * an ELF file with a PT_INTERP program header needs a dynamic loader.
 */
export function staticBusybox() {
  for (const candidate of ['/bin/busybox', '/usr/bin/busybox']) {
    if (existsSync(candidate) && isStaticElf(candidate)) return candidate;
  }
  return undefined;
}

function isStaticElf(file) {
  const fd = openSync(file, 'r');
  try {
    const header = Buffer.alloc(64);
    if (readSync(fd, header, 0, 64, 0) < 64 || header.readUInt32BE(0) !== 0x7f454c46 || header[4] !== 2) return false;
    const programHeaders = Number(header.readBigUInt64LE(32));
    const entryBytes = header.readUInt16LE(54);
    const count = header.readUInt16LE(56);
    const table = Buffer.alloc(entryBytes * count);
    readSync(fd, table, 0, table.length, programHeaders);
    const ptInterp = 3;
    for (let i = 0; i < count; i++) if (table.readUInt32LE(i * entryBytes) === ptInterp) return false;
    return true;
  } finally {
    closeSync(fd);
  }
}

function pythonHas(module) {
  try {
    execFileSync(systemPython, ['-c', `import ${module}`], { stdio: 'ignore', timeout: 10_000 });
    return true;
  } catch {
    return false;
  }
}

/**
 * What the tests need, by Debian package: each `what` names what is checked, `present` checks it. The
 * package list in the install line comes from here, so this is the one place to add a requirement.
 */
const requirements = [
  ...[
    ['qemu-utils', ['qemu-io', 'qemu-img']],
    ['libnbd-bin', ['nbdinfo', 'nbdcopy', 'nbdfuse']],
    ['python3-libnbd', ['nbdsh']],
    ['nbdkit', ['nbdkit']],
    ['gnutls-bin', ['certtool', 'psktool']],
    ['util-linux', ['prlimit']],
    ['mount', ['mount', 'umount', 'losetup']],
    ['iproute2', ['ip']],
    ['fio', ['fio']],
    ['qemu-system-x86', ['qemu-system-x86_64']],
    ['e2fsprogs', ['mkfs.ext4', 'e2fsck', 'debugfs']],
    ['resource-agents', ['ocf-tester']],
    ['libxml2-utils', ['xmllint']],
    ['shellcheck', ['shellcheck']],
  ].flatMap(([pkg, programs]) => programs.map((program) => ({ pkg, what: program, present: (path) => findProgram(program, path) !== undefined }))),
  { pkg: 'python3-libnbd', what: `python3 module nbd (${systemPython})`, present: () => pythonHas('nbd') },
  { pkg: 'resource-agents', what: `${ocfShellfuncs} (the OCF agents' shell library)`, present: () => existsSync(ocfShellfuncs) },
  { pkg: 'busybox-static', what: 'a statically linked /bin/busybox', present: () => staticBusybox() !== undefined },
  { pkg: 'linux-image-amd64', what: 'a readable /boot/vmlinuz-* with its /lib/modules', present: () => kernelReleases().length > 0 },
];

/** The Debian package that provides a program or check named in `requirements`. */
export function packageOf(what) {
  const requirement = requirements.find((r) => r.what === what);
  if (requirement === undefined) throw new Error(`no Debian package known for ${what}`);
  return requirement.pkg;
}

/** The requirements not met, under `path`. */
function missing(path = process.env.PATH ?? '') {
  return requirements.filter((requirement) => !requirement.present(path));
}

function packagesOf(unmet) {
  return [...new Set(unmet.map((requirement) => requirement.pkg))];
}

function installLine(packages, asRoot) {
  const sudo = asRoot ? '' : 'sudo ';
  return `${sudo}apt-get update && ${sudo}apt-get install -y --no-install-recommends ${packages.join(' ')}`;
}

function isRoot() {
  const forced = process.env.GANNET_SETUP_AS;
  if (forced === 'user' || forced === 'root') return forced === 'root';
  return process.getuid?.() === 0;
}

function listUnmet(unmet) {
  return unmet.map((requirement) => `${requirement.what} (${requirement.pkg})`).join(', ');
}

function main() {
  const unmet = missing();
  if (unmet.length === 0) return 0;
  const packages = packagesOf(unmet);
  const aptGet = findProgram('apt-get');
  const root = isRoot();
  if (!root || aptGet === undefined) {
    process.stderr.write(`gannet tests: missing ${listUnmet(unmet)}. Install with:\n  ${installLine(packages, root)}\n`);
    return 1;
  }
  process.stdout.write(`gannet tests: installing ${packages.join(' ')} with apt-get, for ${listUnmet(unmet)}\n`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  for (const args of [['update', '-q'], ['install', '-y', '-q', '--no-install-recommends', ...packages]]) {
    const result = spawnSync(aptGet, args, { stdio: 'inherit', env });
    if (result.status !== 0) {
      process.stderr.write(`gannet tests: apt-get ${args.join(' ')} failed (${result.status ?? result.signal})\n`);
      return 1;
    }
  }
  const still = missing();
  if (still.length > 0) {
    process.stderr.write(`gannet tests: still missing after apt-get install: ${listUnmet(still)}\n`);
    return 1;
  }
  return 0;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  // `--packages`: every Debian package the tests need, one line, for .ci/run's apt-get install.
  if (process.argv[2] === '--packages') process.stdout.write(`${packagesOf(requirements).join(' ')}\n`);
  else process.exitCode = main();
}
