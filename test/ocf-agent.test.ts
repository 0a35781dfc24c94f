/**
 * Goal: the Pacemaker resource agent ocf:gannet:volume (packages/server/ocf/volume) does what its
 * meta-data and the OCF API promise against a real daemon: its meta-data is valid for resource-agents'
 * DTD and schema; validate-all names a bad parameter (6) or a missing gannet (5); monitor answers 7
 * for a volume absent or not started, 0 for a started secondary, 8 for a primary, 9 for a fenced
 * primary and 1 for a volume in error or a daemon gone under a started instance; a split brain fails
 * the primary and no action of the cluster demotes it, while the failed-over secondary goes on and is
 * promoted once the operator has resolved the other side; the promotion score it sets follows the volume (a consistent
 * replica, a resync under way, the disk); promote and demote move the volume between the roles, and a
 * demote loses no acknowledged write; `ocf-tester` passes; and the package ships the agent where
 * `gannet ocf-path` says.
 *
 * Method: real daemons on free loopback ports (two, replicating, for the primary's codes), the agent run
 * as Pacemaker runs it (an action as its argument, parameters as OCF_RESKEY_* variables), its started
 * marks in a temporary HA_RSCTMP. Pacemaker's crm_attribute needs a running cluster, so the promotion
 * scores are read from a recording crm_attribute placed in HA_SBIN_DIR, where resource-agents'
 * ocf_promotion_score looks for it. xmllint checks the meta-data; ocf-tester drives a whole life cycle.
 */
import { chmod, mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { subscribe, type EventStream } from './helpers/events.js';
import {
  api,
  assertQemuOk,
  clientFlags,
  gannet,
  gannetBin,
  makeTempDir,
  primaryConfig,
  qemuIo,
  repoRoot,
  requireTool,
  run,
  startDaemon,
  stopAll,
  type DaemonHandle,
} from './helpers/daemon.js';
import { describeResult, runCommand, type CommandResult } from './helpers/process.js';

const agentPath = join(repoRoot, 'packages/server/ocf/volume');
const ocfRoot = '/usr/lib/ocf';
/** Where resource-agents keeps ra-api-1.dtd and metadata.rng, as ocf-tester validates with them. */
const raSchemaDir = '/usr/share/resource-agents';
const MiB = 1024 * 1024;
const volumeBytes = 16 * MiB;
const eventWaitMs = 30_000;
/** ocf-tester runs some forty actions, each a CLI call or two (node starting), and four promotions. */
const ocfTesterTimeoutMs = 120_000;
/** OCF exit codes (OCF resource agent API, Pacemaker's promotable extensions). */
const ocf = { success: 0, generic: 1, installed: 5, configured: 6, notRunning: 7, runningPromoted: 8, failedPromoted: 9 } as const;
/** The agent's promotion scores (SCORE_* in the agent). */
const score = { disk: 10000, replica: 100 } as const;
/** An operation timeout that leaves the agent's wait for the peer (the timeout less 10 s) 3 s. */
const shortTimeoutMs = 13_000;
/** Nothing listens on port 1 of loopback. */
const deadPeer = '127.0.0.1:1';
/** A recurring monitor's interval; a probe is a monitor with interval 0. */
const monitorIntervalMs = '10000';

interface AgentTarget {
  control: { host: string; port: number };
  dataDir: string;
}

interface RunActionOptions {
  probe?: boolean;
  env?: Record<string, string>;
}

interface Agent {
  /** Runs one action; `probe` runs monitor as Pacemaker's probe (interval 0); `env` adds to its environment. */
  run(action: string, options?: RunActionOptions): Promise<CommandResult>;
  /** The arguments of every crm_attribute call so far, one string each. */
  scoreCalls(): Promise<string[]>;
  /** The last promotion score set: a number, 'deleted', or undefined when none was set. */
  lastScore(): Promise<number | 'deleted' | undefined>;
}

/** A recording crm_attribute in a fresh directory, to be HA_SBIN_DIR. */
async function recordingSbin(): Promise<string> {
  const dir = await makeTempDir('gannet-ocf-sbin-');
  const script = join(dir, 'crm_attribute');
  await writeFile(script, '#!/bin/sh\necho "$*" >> "$(dirname "$0")/calls"\n');
  await chmod(script, 0o755);
  return dir;
}

/**
 * The agent sources resource-agents' ocf-shellfuncs; that package also installs ocf-tester, whose
 * absence requireTool reports with the package to install.
 */
function requireResourceAgents(): string {
  return requireTool('ocf-tester');
}

async function agentFor(target: AgentTarget, volume: string, parameters: Record<string, string> = {}): Promise<Agent> {
  requireResourceAgents();
  const sbin = await recordingSbin();
  const rsctmp = await makeTempDir('gannet-ocf-rsctmp-');
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    OCF_ROOT: ocfRoot,
    OCF_RA_VERSION_MAJOR: '1',
    OCF_RA_VERSION_MINOR: '1',
    OCF_RESOURCE_INSTANCE: `gannet-${volume}`,
    OCF_RESKEY_CRM_meta_promotable: 'true',
    OCF_RESKEY_CRM_meta_clone_max: '2',
    HA_RSCTMP: rsctmp,
    HA_SBIN_DIR: sbin,
    OCF_RESKEY_volume: volume,
    OCF_RESKEY_api: `${target.control.host}:${target.control.port}`,
    OCF_RESKEY_data_dir: target.dataDir,
    OCF_RESKEY_gannet: gannetBin,
    ...Object.fromEntries(Object.entries(parameters).map(([key, value]) => [`OCF_RESKEY_${key}`, value])),
  };
  const scoreCalls = async () => {
    try {
      return (await readFile(join(sbin, 'calls'), 'utf8')).split('\n').filter((line) => line !== '');
    } catch {
      return [];
    }
  };
  return {
    run: (action, options = {}) =>
      runCommand(agentPath, [action], { env: { ...env, OCF_RESKEY_CRM_meta_interval: options.probe ? '0' : monitorIntervalMs, ...options.env } }),
    scoreCalls,
    async lastScore() {
      const last = (await scoreCalls()).at(-1);
      if (last === undefined) return undefined;
      if (/(^| )-D( |$)/.test(last)) return 'deleted';
      const value = / -v (\d+)/.exec(last);
      if (value === null) throw new Error(`crm_attribute called with neither -v nor -D: ${last}`);
      return Number(value[1]);
    },
  };
}

/** Runs `action` and expects `code`, showing the agent's output when it differs. */
async function expectCode(agent: Agent, action: string, code: number, options: RunActionOptions = {}): Promise<CommandResult> {
  const result = await agent.run(action, options);
  expect(result.status, describeResult(`${action}${options.probe ? ' (probe)' : ''}`, result)).toBe(code);
  return result;
}

async function statusOf(daemon: DaemonHandle, volume: string): Promise<Record<string, any>> {
  const result = await gannet(['status', volume, '--json', ...clientFlags(daemon)]);
  expect(result.status, result.stderr).toBe(0);
  return JSON.parse(result.stdout);
}

/** A primary daemon replicating `vm` to a secondary daemon, as in daemon-replication.test.ts. */
async function startPair(secondaryArgs: string[] = []): Promise<{ primary: DaemonHandle; secondary: DaemonHandle }> {
  const secondary = await startDaemon({ volumes: [`vm:${volumeBytes}`], args: secondaryArgs });
  const config = await primaryConfig(secondary, { volumeBytes });
  const primary = await startDaemon({ volumes: [], args: ['--config', config] });
  return { primary, secondary };
}

/**
 * A daemon whose secondary volume `vm` can be promoted, and the daemon it then replicates to. The first
 * one's own --peer is a dead address (its token file holds the second's token): the agent's `peer`
 * parameter must name the second for the promotion to reach it.
 */
async function startPromotable(): Promise<{ local: DaemonHandle; peer: DaemonHandle }> {
  const peer = await startDaemon({ volumes: [`vm:${volumeBytes}`] });
  const tokenFile = join(await makeTempDir(), 'peer.token');
  await writeFile(tokenFile, `${peer.token}\n`, { mode: 0o600 });
  const local = await startDaemon({ volumes: [`vm:${volumeBytes}`], args: ['--peer', deadPeer, '--peer-token-file', tokenFile] });
  return { local, peer };
}

async function reachState(daemon: DaemonHandle, events: EventStream, state: string): Promise<void> {
  if ((await statusOf(daemon, 'vm')).state === state) return;
  await events.next((event) => event.event === 'state' && event.data.state === state, eventWaitMs);
}

describe('ocf:gannet:volume', () => {
  afterEach(stopAll);

  it('meta-data is OCF 1.1, valid for resource-agents (ra-api-1.dtd, metadata.rng), with every action and parameter', async () => {
    const xmllint = requireTool('xmllint');
    requireResourceAgents();
    // No parameters at all: Pacemaker and pcs ask for the meta-data before any resource exists.
    const metaData = await runCommand(agentPath, ['meta-data'], { env: { PATH: process.env.PATH, OCF_ROOT: ocfRoot } });
    expect(metaData.status, describeResult('meta-data', metaData)).toBe(0);
    const xml = metaData.stdout;
    const dtd = await runCommand(xmllint, ['--noout', '--valid', '-'], { cwd: raSchemaDir, input: xml });
    expect(dtd.status, describeResult('xmllint --valid', dtd)).toBe(0);
    const rng = await runCommand(xmllint, ['--noout', '--relaxng', join(raSchemaDir, 'metadata.rng'), '-'], { input: xml });
    expect(rng.status, describeResult('xmllint --relaxng', rng)).toBe(0);

    expect(xml).toMatch(/<resource-agent name="volume" version="[^"]+">\s*<version>1\.1<\/version>/);
    const actions = [...xml.matchAll(/<action [^>]*\/>/g)].map(([element]) => {
      const role = / role="([^"]+)"/.exec(element)?.[1];
      return `${/ name="([^"]+)"/.exec(element)?.[1]}${role === undefined ? '' : `:${role}`}`;
    });
    expect(actions.sort()).toEqual(
      ['demote', 'meta-data', 'monitor:Promoted', 'monitor:Unpromoted', 'notify', 'promote', 'start', 'stop', 'validate-all'].sort(),
    );
    const parameters = [...xml.matchAll(/<parameter name="([^"]+)"/g)].map((match) => match[1]);
    expect(parameters.sort()).toEqual(['api', 'data_dir', 'failover_to', 'force_promote', 'gannet', 'peer', 'token_file', 'volume']);
    expect(xml).toContain('<parameter name="volume" unique="1" required="1">');
  });

  it('is POSIX sh that /bin/sh parses and shellcheck passes', async () => {
    // Debian's /bin/sh, which the agent's #! line names, is dash: no bash extensions.
    const parse = await runCommand('/bin/sh', ['-n', agentPath]);
    expect(parse.status, describeResult('sh -n', parse)).toBe(0);
    // SC1091: ocf-shellfuncs is sourced from a path known only at run time. SC2086: the OCF_* exit codes are numbers.
    const lint = await runCommand(requireTool('shellcheck'), ['--shell=sh', '--severity=style', '--exclude=SC1091,SC2086', agentPath]);
    expect(lint.status, describeResult('shellcheck', lint)).toBe(0);
  });

  it('validate-all names a missing or malformed parameter (6) and a missing gannet (5)', async () => {
    const target = { control: { host: '127.0.0.1', port: 1 }, dataDir: await makeTempDir() };
    const cases: [Record<string, string>, number, string][] = [
      [{ volume: '' }, ocf.configured, 'the volume parameter is required'],
      [{ volume: 'no spaces' }, ocf.configured, 'volume: "no spaces"'],
      [{ api: 'nowhere' }, ocf.configured, 'api: expected HOST:PORT'],
      [{ failover_to: 'sideways' }, ocf.configured, 'failover_to: expected secondary, checkpoint or primary'],
      [{ peer: 'node1=10.0.0.1:10810 node2=' }, ocf.configured, 'peer: expected HOST:PORT'],
      [{ force_promote: 'maybe' }, ocf.configured, 'force_promote: expected a boolean'],
      [{ gannet: '/nonexistent/gannet' }, ocf.installed, "Setup problem: couldn't find command: /nonexistent/gannet"],
      [{ api: 'http://127.0.0.1:10810/', peer: 'node1=10.0.0.1:10810 node2=10.0.0.2:10810', failover_to: 'primary' }, ocf.success, ''],
      [{ api: '/run/gannet/control.sock', peer: '10.0.0.2:10810' }, ocf.success, ''],
    ];
    for (const [parameters, code, reason] of cases) {
      const agent = await agentFor(target, 'vol0', parameters);
      const result = await expectCode(agent, 'validate-all', code);
      if (reason !== '') expect(result.stderr).toContain(`ocf-exit-reason:${reason}`);
    }
  });

  it('monitor: 7 absent or not started, 0 started, 7 stopped; 1 for a volume in error or a daemon gone; scores follow the replica', async () => {
    const dataDir = await makeTempDir();
    // A volume directory without its volume.json: the daemon serves it as an error (ERECORD).
    await mkdir(join(dataDir, 'volumes', 'broken'), { recursive: true });
    const socket = join(dataDir, 'control.sock');
    const daemon = await startDaemon({ dataDir, volumes: [`vol0:${volumeBytes}`], args: ['--control-socket', socket] });
    const agent = await agentFor(daemon, 'vol0');
    const overSocket = await agentFor(daemon, 'vol0', { api: socket });
    await expectCode(overSocket, 'start', ocf.success);
    await expectCode(overSocket, 'monitor', ocf.success);
    await expectCode(overSocket, 'stop', ocf.success);

    await expectCode(agent, 'monitor', ocf.notRunning, { probe: true });
    await expectCode(agent, 'monitor', ocf.notRunning);
    expect(await agent.lastScore()).toBeUndefined();
    await expectCode(agent, 'start', ocf.success);
    await expectCode(agent, 'monitor', ocf.success);
    expect(await agent.lastScore()).toBe(score.replica);

    // A resync under way: the replica is part old, part new, and must not be promoted. A notification
    // after a promotion elsewhere says so at once; other notifications leave the score alone.
    expect((await api(daemon, 'PUT', '/v1/volumes/vol0/inconsistent', { inconsistent: true })).status).toBe(200);
    const notification = (type: string, operation: string) => ({
      env: { OCF_RESKEY_CRM_meta_notify_type: type, OCF_RESKEY_CRM_meta_notify_operation: operation },
    });
    await expectCode(agent, 'notify', ocf.success, notification('pre', 'promote'));
    expect(await agent.lastScore()).toBe(score.replica);
    await expectCode(agent, 'notify', ocf.success, notification('post', 'promote'));
    expect(await agent.lastScore()).toBe('deleted');
    await expectCode(agent, 'monitor', ocf.success);
    expect(await agent.lastScore()).toBe('deleted');
    expect((await api(daemon, 'PUT', '/v1/volumes/vol0/inconsistent', { inconsistent: false })).status).toBe(200);
    await expectCode(agent, 'monitor', ocf.success);
    expect(await agent.lastScore()).toBe(score.replica);

    await expectCode(agent, 'start', ocf.success);
    await expectCode(agent, 'stop', ocf.success);
    expect(await agent.lastScore()).toBe('deleted');
    await expectCode(agent, 'monitor', ocf.notRunning);
    await expectCode(agent, 'stop', ocf.success);
    // Stopping an instance leaves the daemon's volume alone: it stays a replica.
    expect(await statusOf(daemon, 'vol0')).toMatchObject({ role: 'secondary', state: 'replicating' });

    // The token from token_file rather than data_dir; a wrong one is a failure, not a stopped volume.
    const tokenDir = await makeTempDir();
    await writeFile(join(tokenDir, 'right.token'), `${daemon.token}\n`);
    await writeFile(join(tokenDir, 'wrong.token'), `${'cd'.repeat(32)}\n`);
    const byTokenFile = await agentFor({ control: daemon.control, dataDir: '/nonexistent' }, 'vol0', { token_file: join(tokenDir, 'right.token') });
    await expectCode(byTokenFile, 'start', ocf.success);
    await expectCode(byTokenFile, 'monitor', ocf.success);
    await expectCode(byTokenFile, 'stop', ocf.success);
    const wrongToken = await agentFor(daemon, 'vol0', { token_file: join(tokenDir, 'wrong.token') });
    expect((await expectCode(wrongToken, 'monitor', ocf.generic, { probe: true })).stderr).toContain('401 unauthorized');

    const missing = await agentFor(daemon, 'missing');
    await expectCode(missing, 'monitor', ocf.notRunning, { probe: true });
    expect((await expectCode(missing, 'start', ocf.installed)).stderr).toContain('has no volume missing');
    await expectCode(missing, 'stop', ocf.success);

    const broken = await agentFor(daemon, 'broken');
    expect((await expectCode(broken, 'monitor', ocf.generic, { probe: true })).stderr).toMatch(/ocf-exit-reason:volume broken is in error: .*volume\.json is missing/);
    await expectCode(broken, 'start', ocf.generic);
    await expectCode(broken, 'stop', ocf.success);

    await expectCode(agent, 'start', ocf.success);
    await daemon.stop();
    expect((await expectCode(agent, 'monitor', ocf.generic)).stderr).toContain('the gannet daemon went away');
    await expectCode(agent, 'stop', ocf.success);
    await expectCode(agent, 'monitor', ocf.notRunning);
    await expectCode(agent, 'monitor', ocf.notRunning, { probe: true });
  });

  it('monitor: 8 for a replicating primary, 9 once its secondary failed over (fenced), then demoted at once; the failed-over secondary takes the score of the disk', async () => {
    requireTool('qemu-io');
    const { primary, secondary } = await startPair();
    const events = await subscribe(primary, 'vm');
    await reachState(primary, events, 'replicating');
    const onPrimary = await agentFor(primary, 'vm');
    const onSecondary = await agentFor(secondary, 'vm');

    // A primary is promoted whether or not this node's instance was started: a probe never hides it.
    await expectCode(onPrimary, 'monitor', ocf.runningPromoted, { probe: true });
    await expectCode(onPrimary, 'start', ocf.success);
    await expectCode(onPrimary, 'monitor', ocf.runningPromoted);
    expect(await onPrimary.lastScore()).toBe(score.disk);
    await expectCode(onSecondary, 'start', ocf.success);
    await expectCode(onSecondary, 'monitor', ocf.success);
    expect(await onSecondary.lastScore()).toBe(score.replica);

    const failover = await gannet(['failover', 'vm', '--to', 'secondary', ...clientFlags(secondary)]);
    expect(failover.status, failover.stderr).toBe(0);
    await expectCode(onSecondary, 'monitor', ocf.success);
    expect(await onSecondary.lastScore()).toBe(score.disk);

    // The stale primary learns it at its next write.
    await qemuIo(primary, 'vm', ['write -P 0x42 0 64k']);
    await reachState(primary, events, 'fenced');
    expect((await expectCode(onPrimary, 'monitor', ocf.failedPromoted)).stderr).toContain('ocf-exit-reason:volume vm is primary and fenced');
    expect(await onPrimary.lastScore()).toBe('deleted');
    // Pacemaker's recovery of a failed promoted instance: its disk is the stale side, demoted at once.
    await expectCode(onPrimary, 'demote', ocf.success);
    expect(await statusOf(primary, 'vm')).toMatchObject({ role: 'secondary' });
    await events.close();
  });

  it('demote refuses while the peer lacks writes of the primary, and keeps it primary', async () => {
    requireTool('qemu-io');
    const { primary, secondary } = await startPair();
    const events = await subscribe(primary, 'vm');
    await reachState(primary, events, 'replicating');
    await secondary.stop();
    await reachState(primary, events, 'degraded');
    assertQemuOk(await qemuIo(primary, 'vm', ['write -P 0x44 0 64k', 'flush']), 'write on the degraded primary');
    // A short operation timeout: the wait for the peer ends a few seconds in.
    const agent = await agentFor(primary, 'vm', { CRM_meta_timeout: String(shortTimeoutMs) });
    await expectCode(agent, 'start', ocf.success);
    const refused = await expectCode(agent, 'demote', ocf.generic);
    expect(refused.stderr).toMatch(/ocf-exit-reason:volume vm is degraded and its peer lacks 65536 bytes \(.*, link: .*cannot reach the gannet daemon.*\): not demoted, which would discard them/);
    expect(await statusOf(primary, 'vm')).toMatchObject({ role: 'primary', state: 'degraded' });
    await expectCode(agent, 'stop', ocf.generic);
    await expectCode(agent, 'monitor', ocf.runningPromoted);
    await events.close();
  });

  it('split brain: the primary fails (9) and no action of the cluster demotes it; the failed-over secondary goes on, and is promoted once the operator resolved the other side', async () => {
    requireTool('qemu-io');
    const { primary, secondary } = await startPair();
    const controlPort = secondary.control.port;
    const primaryEvents = await subscribe(primary, 'vm');
    await reachState(primary, primaryEvents, 'replicating');
    const onPrimary = await agentFor(primary, 'vm');
    await expectCode(onPrimary, 'start', ocf.success);

    // Both sides write since they split: the primary while its secondary is away, the secondary by
    // failing over on a control port the primary does not know. Then it comes back where the primary
    // looks for it, with the primary as its own peer for a promotion.
    await secondary.stop();
    await reachState(primary, primaryEvents, 'degraded');
    assertQemuOk(await qemuIo(primary, 'vm', ['write -P 0x33 0 64k', 'flush']), 'write on the degraded primary');
    const hidden = await startDaemon({ dataDir: secondary.dataDir, volumes: [`vm:${volumeBytes}`] });
    const failover = await gannet(['failover', 'vm', '--to', 'secondary', ...clientFlags(hidden)]);
    expect(failover.status, failover.stderr).toBe(0);
    assertQemuOk(await qemuIo(hidden, 'vm/secondary', ['write -P 0x77 1M 64k', 'flush']), 'write on the failed-over secondary');
    await hidden.stop();
    const tokenFile = join(await makeTempDir(), 'primary.token');
    await writeFile(tokenFile, `${primary.token}\n`, { mode: 0o600 });
    const primaryAddress = `${primary.control.host}:${primary.control.port}`;
    const back = await startDaemon({
      dataDir: secondary.dataDir,
      volumes: [`vm:${volumeBytes}`],
      args: ['--control', `127.0.0.1:${controlPort}`, '--peer', primaryAddress, '--peer-token-file', tokenFile],
    });
    await reachState(primary, primaryEvents, 'split-brain');
    expect(await statusOf(back, 'vm')).toMatchObject({ role: 'secondary', state: 'split-brain', splitBrain: expect.any(Object) });

    expect((await expectCode(onPrimary, 'monitor', ocf.failedPromoted)).stderr).toContain('ocf-exit-reason:volume vm is in split brain: choose the survivor');
    expect(await onPrimary.lastScore()).toBe('deleted');
    // Neither side is made the one whose writes are dropped by the cluster: that is the operator's choice.
    expect((await expectCode(onPrimary, 'demote', ocf.generic)).stderr).toContain('gannet resolve vm --discard-local');
    await expectCode(onPrimary, 'stop', ocf.generic);
    expect(await statusOf(primary, 'vm')).toMatchObject({ role: 'primary', state: 'split-brain' });
    const onSecondary = await agentFor(back, 'vm');
    await expectCode(onSecondary, 'monitor', ocf.notRunning, { probe: true });
    await expectCode(onSecondary, 'start', ocf.success);
    await expectCode(onSecondary, 'monitor', ocf.success);
    expect(await onSecondary.lastScore()).toBe(score.disk);

    // The operator drops the primary's side; the cluster then promotes the survivor, which resyncs it.
    const resolved = await gannet(['resolve', 'vm', '--discard-local', ...clientFlags(primary)]);
    expect(resolved.status, resolved.stderr).toBe(0);
    await expectCode(onPrimary, 'monitor', ocf.success);
    expect(await onPrimary.lastScore()).toBe('deleted');
    const backEvents = await subscribe(back, 'vm');
    await expectCode(onSecondary, 'promote', ocf.success);
    await reachState(back, backEvents, 'replicating');
    await expectCode(onSecondary, 'monitor', ocf.runningPromoted);
    await expectCode(onPrimary, 'monitor', ocf.success);
    const survivorDisk = await readFile(join(back.dataDir, 'volumes', 'vm', 'disk.img'));
    expect(survivorDisk.subarray(MiB, MiB + 64 * 1024).every((byte) => byte === 0x77), "the survivor's write").toBe(true);
    await primaryEvents.close();
    await backEvents.close();
  });

  it('promote makes the volume primary and attaches the peer its parameter names for another node; demote makes it secondary again', async () => {
    const { local, peer } = await startPromotable();
    const peerAddress = `${peer.control.host}:${peer.control.port}`;
    // One entry per node: this node's (uname -n, as ocf_local_nodename says outside a cluster) must be skipped.
    const agent = await agentFor(local, 'vm', { peer: `${hostname()}=${deadPeer} other-node=${peerAddress}` });
    const events = await subscribe(local, 'vm');

    await expectCode(agent, 'start', ocf.success);
    await expectCode(agent, 'monitor', ocf.success);
    await expectCode(agent, 'promote', ocf.success);
    expect(await statusOf(local, 'vm')).toMatchObject({ role: 'primary', link: { peer: peerAddress } });
    await reachState(local, events, 'replicating');
    await expectCode(agent, 'monitor', ocf.runningPromoted);
    expect(await agent.lastScore()).toBe(score.disk);
    await expectCode(agent, 'promote', ocf.success);
    expect(await statusOf(peer, 'vm')).toMatchObject({ role: 'secondary', state: 'replicating' });

    // Written on the primary and not checkpointed: the peer holds it only in memory until demote
    // checkpoints it and waits for it to reach the peer's disk.
    assertQemuOk(await qemuIo(local, 'vm', ['write -P 0x5a 0 1M', 'flush']), 'write on the primary');
    await expectCode(agent, 'demote', ocf.success);
    expect(await statusOf(local, 'vm')).toMatchObject({ role: 'secondary' });
    const peerDisk = await readFile(join(peer.dataDir, 'volumes', 'vm', 'disk.img'));
    expect(peerDisk.subarray(0, MiB).every((byte) => byte === 0x5a), "the demoted primary's last write is on the peer's disk").toBe(true);
    await expectCode(agent, 'monitor', ocf.success);
    // A demoted primary's disk is a stale copy until a primary resyncs it: never chosen, and promoted
    // again only by force.
    expect(await agent.lastScore()).toBe('deleted');
    await expectCode(agent, 'demote', ocf.success);
    expect((await expectCode(agent, 'promote', ocf.generic)).stderr).toMatch(/ocf-exit-reason:gannet promote vm --peer \S+ : gannet: refused \(409 conflict\)/);
    const forced = await agentFor(local, 'vm', { peer: peerAddress, force_promote: 'true' });
    await expectCode(forced, 'promote', ocf.success);
    await expectCode(forced, 'monitor', ocf.runningPromoted);
    await expectCode(forced, 'stop', ocf.success);
    await expectCode(forced, 'monitor', ocf.notRunning);
    expect(await statusOf(local, 'vm')).toMatchObject({ role: 'secondary' });
    await events.close();
  });

  it('promote with failover_to=primary keeps the primary VM\'s writes since the last checkpoint', async () => {
    requireTool('qemu-io');
    // The secondary's own peer, for its volume once promoted, is a dead address: the promotion is what counts here.
    const tokenFile = join(await makeTempDir(), 'peer.token');
    await writeFile(tokenFile, `${'ab'.repeat(32)}\n`, { mode: 0o600 });
    const { primary, secondary } = await startPair(['--peer', deadPeer, '--peer-token-file', tokenFile]);
    const events = await subscribe(primary, 'vm');
    await reachState(primary, events, 'replicating');
    // Acknowledged in ack mode peer once in the secondary's buffer: no checkpoint made it durable.
    assertQemuOk(await qemuIo(primary, 'vm', ['write -P 0x61 0 1M', 'flush']), 'write on the primary');
    await primary.stop('SIGKILL');

    const agent = await agentFor(secondary, 'vm', { failover_to: 'primary' });
    await expectCode(agent, 'start', ocf.success);
    await expectCode(agent, 'promote', ocf.success);
    await expectCode(agent, 'monitor', ocf.runningPromoted);
    expect(await statusOf(secondary, 'vm')).toMatchObject({ role: 'primary' });
    assertQemuOk(await qemuIo(secondary, 'vm', ['read -P 0x61 0 1M']), "the primary VM's write on the promoted disk");
    await events.close();
  });

  it('passes ocf-tester against a running daemon, and leaves the volume secondary', async () => {
    const ocfTester = requireResourceAgents();
    const { local, peer } = await startPromotable();
    const rsctmp = await makeTempDir('gannet-ocf-rsctmp-');
    const parameters = {
      volume: 'vm',
      api: `${local.control.host}:${local.control.port}`,
      data_dir: local.dataDir,
      gannet: gannetBin,
      peer: `${peer.control.host}:${peer.control.port}`,
      // ocf-tester promotes again right after a demote, which the daemon refuses without force.
      force_promote: 'true',
    };
    const result = await runCommand(
      ocfTester,
      ['-v', '-n', 'gannet-vm', ...Object.entries(parameters).flatMap(([key, value]) => ['-o', `${key}=${value}`]), agentPath],
      { env: { ...process.env, OCF_ROOT: ocfRoot, HA_RSCTMP: rsctmp }, timeoutMs: ocfTesterTimeoutMs },
    );
    expect(result.status, describeResult('ocf-tester', result)).toBe(0);
    expect(result.stdout).toContain(`${agentPath} passed all tests`);
    // Its last steps stop the resource: the volume is a secondary again, and reads as stopped.
    expect(await statusOf(local, 'vm')).toMatchObject({ role: 'secondary' });
    const agent = await agentFor(local, 'vm');
    await expectCode(agent, 'monitor', ocf.notRunning);
  }, ocfTesterTimeoutMs + 30_000);

  it('gannet ocf-path prints the agent, which the package ships executable', async () => {
    const printed = await gannet(['ocf-path']);
    expect(printed.status, printed.stderr).toBe(0);
    expect(printed.stdout.trim()).toBe(agentPath);
    expect((await stat(agentPath)).mode & 0o777).toBe(0o755);
    const packed = await run('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: join(repoRoot, 'packages/server') });
    expect(packed.status, packed.stderr).toBe(0);
    const files = (JSON.parse(packed.stdout) as { files: { path: string; mode: number }[] }[])[0].files;
    expect(files.find((file) => file.path === 'ocf/volume')).toMatchObject({ mode: 0o755 });
  });
});
