import { run } from './daemon.js';

/**
 * A network namespace joined to the test's by a veth pair, for a daemon that must be cut off for real
 * (`ip link set HOST_END down`). The names carry the test's pid, so parallel runs do not collide; veth
 * names are at most 15 characters.
 */
export interface VethNamespace {
  readonly namespace: string;
  readonly hostEnd: string;
  readonly peerEnd: string;
  readonly hostAddress: string;
  readonly peerAddress: string;
}

export async function must(file: string, args: string[]): Promise<void> {
  const result = await run(file, args);
  if (result.status !== 0) throw new Error(`${file} ${args.join(' ')}: status ${result.status}\n${result.stderr}`);
}

/** `tag`: a letter or two naming the test file; `subnet`: the third octet of its 10.231.x.0/30. */
export function vethNamespace(tag: string, subnet: number): VethNamespace {
  const suffix = `${process.pid % 100_000}`;
  return {
    namespace: `gannet-${tag}${suffix}`,
    hostEnd: `g${tag}h${suffix}`,
    peerEnd: `g${tag}p${suffix}`,
    hostAddress: `10.231.${subnet}.1`,
    peerAddress: `10.231.${subnet}.2`,
  };
}

export async function createVethNamespace(ip: string, n: VethNamespace): Promise<void> {
  // A veth left by a run killed mid-way still holds the subnet: connects would go out through it and be
  // refused, which reads like a daemon bug. Say what is in the way instead.
  const subnet = n.hostAddress.slice(0, n.hostAddress.lastIndexOf('.') + 1);
  const taken = (await run(ip, ['-br', 'addr'])).stdout.split('\n').filter((line) => line.includes(` ${subnet}`));
  if (taken.length > 0) {
    throw new Error(`${subnet}0/30 is already in use (${taken.map((line) => line.trim()).join('; ')}): a veth left by an earlier test run? delete it (ip link del NAME) and run again`);
  }
  await must(ip, ['netns', 'add', n.namespace]);
  await must(ip, ['link', 'add', n.hostEnd, 'type', 'veth', 'peer', 'name', n.peerEnd]);
  await must(ip, ['link', 'set', n.peerEnd, 'netns', n.namespace]);
  await must(ip, ['addr', 'add', `${n.hostAddress}/30`, 'dev', n.hostEnd]);
  await must(ip, ['link', 'set', n.hostEnd, 'up']);
  await must(ip, ['-n', n.namespace, 'addr', 'add', `${n.peerAddress}/30`, 'dev', n.peerEnd]);
  await must(ip, ['-n', n.namespace, 'link', 'set', n.peerEnd, 'up']);
  await must(ip, ['-n', n.namespace, 'link', 'set', 'lo', 'up']);
}

/** Deleting the namespace deletes its veth end, and with it the pair. */
export async function deleteVethNamespace(ip: string, n: VethNamespace): Promise<void> {
  const listed = await run(ip, ['netns', 'list']);
  if (listed.stdout.split('\n').some((line) => line.split(' ')[0] === n.namespace)) await must(ip, ['netns', 'del', n.namespace]);
}
