import { randomUUID } from 'node:crypto';
import { Agent } from 'node:http';
import { isIP } from 'node:net';
import {
  digestBytes,
  digestChunkBytes,
  GannetError,
  generationSchema,
  PeerIsPrimaryError,
  SplitBrainError,
  type Generation,
  type Peer,
  type PeerInfo,
  type PeerSession,
  type VolumeState,
} from '@gannet/core';
import { NbdClient, type NbdAddress, type TlsClientCredentials } from 'nbd-server-js';
import type { Logger } from 'pino';
import { z } from 'zod';
import { callControl, RefusedError, type ControlEndpoint } from './client.js';
import { formatHostPort } from './defaults.js';

/**
 * The Peer seam (@gannet/core link.ts) over the network: the primary role's link to a secondary gannet
 * daemon. A session attaches through the peer's control API (POST /v1/volumes/NAME/peer, which fences
 * every earlier NBD connection to NAME/primary before it answers), then opens an NBD connection to
 * NAME/primary at an address the peer named; checkpoints, durable epochs and the inconsistent mark are
 * control API calls. Aborting a session destroys its NBD socket and its HTTP requests at once. Each
 * attach names the link and counts its attempts, so that an attach the peer reads late (it was hung when
 * the primary gave up on it) is refused instead of fencing a newer session.
 *
 * Control calls open a connection each (no keep-alive): a pooled socket to a peer that died, or that
 * closed it idle as the call went out, would fail a call for no fault of the peer. A few calls a second
 * at most, each one round trip more.
 */

/** A control call (attach, checkpoint, durable epoch, inconsistent mark) that takes longer fails. */
export const peerCallTimeoutMsDefault = 10_000;
/** Connecting to the peer's NBD export, TLS and handshake included. */
export const peerNbdConnectTimeoutMsDefault = 10_000;
export const peerTimeoutMsMin = 50;
export const peerTimeoutMsMax = 600_000;

export interface PeerLinkOptions {
  /** The peer daemon's control API. */
  readonly control: ControlEndpoint;
  readonly token: string;
  /** The volume's name on the peer. */
  readonly volume: string;
  /** NBD TLS client credentials, for a peer whose NBD is served over TLS (see nbd-server-js NbdClient). */
  readonly tls?: TlsClientCredentials;
  readonly logger: Logger;
  /** Default peerCallTimeoutMsDefault. */
  readonly callTimeoutMs?: number;
  /** Default peerNbdConnectTimeoutMsDefault. */
  readonly nbdConnectTimeoutMs?: number;
}

const timeoutMsSchema = z.number().int().min(peerTimeoutMsMin).max(peerTimeoutMsMax);
/** The plain fields of PeerLinkOptions (the credentials and the logger are the caller's objects). */
const optionsSchema = z.object({
  control: z.union([z.object({ host: z.string().min(1), port: z.number().int().min(1).max(65_535) }).strict(), z.object({ path: z.string().min(1) }).strict()]),
  token: z.string().min(1),
  volume: z.string().min(1),
  callTimeoutMs: timeoutMsSchema.default(peerCallTimeoutMsDefault),
  nbdConnectTimeoutMs: timeoutMsSchema.default(peerNbdConnectTimeoutMsDefault),
});

function parseOptions(options: PeerLinkOptions): z.output<typeof optionsSchema> {
  const { tls: _tls, logger: _logger, ...plain } = options;
  const parsed = optionsSchema.safeParse(plain);
  if (parsed.success) return parsed.data;
  const issue = parsed.error.issues[0];
  throw new GannetError('EOPTIONS', `invalid peer link options: ${issue.path.join('.') || 'options'}: ${issue.message}`, { cause: parsed.error });
}

const volumeStates = ['replicating', 'failing-over', 'failed-over', 'closed', 'halted'] as const satisfies readonly VolumeState[];
const rangeSchema = z.object({ offset: z.number().int().nonnegative(), length: z.number().int().positive() });
const nbdAddressSchema = z.union([z.object({ host: z.string().min(1), port: z.number().int().min(1).max(65_535) }), z.object({ path: z.string().min(1) })]);
/** What the peer answers, checked before it is trusted; fields a newer peer adds are ignored. */
const attachSchema = z.object({
  volumeId: z.string().min(1),
  instance: z.string().min(1),
  sizeBytes: z.number().int().positive(),
  state: z.enum(volumeStates),
  epoch: z.number().int().nonnegative(),
  durableEpoch: z.number().int().nonnegative(),
  tornRanges: z.array(rangeSchema),
  inconsistent: z.boolean(),
  /** Absent from a peer that keeps no generations: its data counts as unknown (a full digest sync). */
  generation: generationSchema.nullable().default(null),
  nbd: z.object({ export: z.string().min(1), addresses: z.array(nbdAddressSchema), tls: z.boolean() }),
});
const checkpointSchema = z.object({ epoch: z.number().int().nonnegative(), durableEpoch: z.number().int().nonnegative(), instance: z.string().min(1) });
const volumeSchema = z.object({ durableEpoch: z.number().int().nonnegative(), instance: z.string().min(1) });
const markSchema = z.object({ instance: z.string().min(1) });
const splitVolumeSchema = z.object({ generation: generationSchema });
const digestsSchema = z.object({
  instance: z.string().min(1),
  chunkBytes: z.literal(digestChunkBytes),
  digestBytes: z.literal(digestBytes),
  digests: z.base64(),
});

type PeerAttach = z.output<typeof attachSchema>;

export function describePeer(control: ControlEndpoint): string {
  return 'path' in control ? `unix:${control.path}` : formatHostPort(control);
}

const wildcardHosts = new Set(['0.0.0.0', '::', '']);

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || host.startsWith('127.');
}

/**
 * The address to reach the peer's NBD at, among those it listens on: a wildcard host stands for the host
 * the control API was reached at; one of the control endpoint's address family is preferred; a
 * loopback address is usable only when the control API is reached over loopback too, and a Unix socket
 * only when it is reached over a Unix socket. Null when none is usable from here.
 */
export function peerNbdAddress(addresses: readonly NbdAddress[], control: ControlEndpoint): NbdAddress | null {
  if ('path' in control) {
    const local = addresses.find((a): a is { path: string } => 'path' in a);
    if (local !== undefined) return local;
    const tcp = addresses.find((a): a is { host: string; port: number } => 'host' in a && (wildcardHosts.has(a.host) || isLoopback(a.host)));
    if (tcp === undefined) return null;
    return { host: wildcardHosts.has(tcp.host) ? (tcp.host === '::' ? '::1' : '127.0.0.1') : tcp.host, port: tcp.port };
  }
  const candidates: { host: string; port: number }[] = [];
  for (const a of addresses) {
    if ('path' in a) continue;
    const host = wildcardHosts.has(a.host) ? control.host : a.host;
    if (isLoopback(host) && !isLoopback(control.host)) continue;
    candidates.push({ host, port: a.port });
  }
  // isIP: 4 or 6, or 0 for a name (which the connect resolves, to either family).
  const family = isIP(control.host);
  return candidates.find((c) => family !== 0 && isIP(c.host) === family) ?? candidates[0] ?? null;
}

/**
 * A signal for one step of a session: aborted with the session, or once `ms` have passed. `done()`
 * releases the timer and the listener, which a session living for days would otherwise pile up.
 */
function stepSignal(session: AbortSignal, ms: number, late: string): { signal: AbortSignal; done(): void } {
  const stop = new AbortController();
  const onAbort = () => stop.abort(session.reason);
  session.addEventListener('abort', onAbort, { once: true });
  const timer = setTimeout(() => stop.abort(new Error(`${late} within ${ms} ms`)), ms);
  if (session.aborted) onAbort();
  return {
    signal: stop.signal,
    done() {
      clearTimeout(timer);
      session.removeEventListener('abort', onAbort);
    },
  };
}

function messageOf(error: unknown): string {
  if (error instanceof RefusedError) return `refused (${error.status} ${error.code}): ${error.message}`;
  return error instanceof Error ? error.message : String(error);
}

export function peerLink(options: PeerLinkOptions): Peer {
  const { control, token, volume, callTimeoutMs, nbdConnectTimeoutMs } = parseOptions(options);
  const address = describePeer(control);
  const agent = new Agent({ keepAlive: false });
  const volumePath = `/v1/volumes/${encodeURIComponent(volume)}`;
  const log = options.logger.child({ peer: address, volume });
  const linkId = randomUUID();
  let attempts = 0;

  /** One control call, ended by the session's abort or by the call's own deadline, whichever comes first. */
  async function call<T extends z.ZodType>(
    session: AbortSignal,
    what: string,
    method: 'GET' | 'POST' | 'PUT',
    path: string,
    schema: T,
    body?: unknown,
  ): Promise<z.output<T>> {
    const step = stepSignal(session, callTimeoutMs, 'no answer');
    let answer: unknown;
    try {
      answer = await callControl(control, token, method, path, body, { agent, signal: step.signal, timeoutMs: callTimeoutMs });
    } catch (error) {
      throw new GannetError('EPEER', `peer ${address}: ${what}: ${messageOf(error)}`, { cause: error });
    } finally {
      step.done();
    }
    const parsed = schema.safeParse(answer);
    if (!parsed.success) {
      const issue = parsed.error.issues[0];
      throw new GannetError('EPEER', `peer ${address}: ${what}: unexpected answer: ${issue.path.join('.') || 'body'}: ${issue.message}`);
    }
    return parsed.data;
  }

  async function openNbd(attach: PeerAttach, session: AbortSignal): Promise<NbdClient> {
    if (attach.nbd.tls && options.tls === undefined) {
      throw new GannetError('EPEER', `peer ${address}: its NBD requires TLS: give the link TLS client credentials`);
    }
    const target = peerNbdAddress(attach.nbd.addresses, control);
    if (target === null) {
      const listed = attach.nbd.addresses.map((a) => ('path' in a ? `unix:${a.path}` : formatHostPort(a))).join(', ') || 'nowhere';
      throw new GannetError('EPEER', `peer ${address}: its NBD listens on ${listed}, none of which is reachable from here: give its --nbd an address this host reaches`);
    }
    const where = 'path' in target ? `unix:${target.path}` : formatHostPort(target);
    const step = stepSignal(session, nbdConnectTimeoutMs, 'not connected');
    let client: NbdClient;
    try {
      client = await NbdClient.connect(target, { exportName: attach.nbd.export, signal: step.signal, ...(options.tls !== undefined && { tls: options.tls }) });
    } catch (error) {
      throw new GannetError('EPEER', `peer ${address}: NBD export ${attach.nbd.export} at ${where}: ${messageOf(error)}`, { cause: error });
    } finally {
      step.done();
    }
    if (client.size !== attach.sizeBytes) {
      client.destroy();
      throw new GannetError('EPEER', `peer ${address}: NBD export ${attach.nbd.export} is ${client.size} bytes, the peer said ${attach.sizeBytes}`);
    }
    return client;
  }

  return {
    address,
    async connect(generation: Generation): Promise<PeerSession> {
      const lifetime = new AbortController();
      const session = lifetime.signal;
      attempts += 1;
      let attach: PeerAttach;
      try {
        attach = await call(session, `attach volume ${volume}`, 'POST', `${volumePath}/peer`, attachSchema, { link: linkId, attempt: attempts, generation });
      } catch (error) {
        const refused = (error as { cause?: unknown }).cause;
        if (!(refused instanceof RefusedError) || (refused.reason !== 'ESPLITBRAIN' && refused.reason !== 'EPRIMARY')) throw error;
        // The refusal names no generation: the volume's status does (the split it recorded, or its own as a primary).
        const { generation: theirs } = await call(session, `read volume ${volume} after its refusal`, 'GET', volumePath, splitVolumeSchema);
        if (refused.reason === 'EPRIMARY') throw new PeerIsPrimaryError(`peer ${address}: ${refused.message}`, theirs);
        throw new SplitBrainError(`peer ${address}: ${refused.message}`, theirs, generation);
      }
      const device = await openNbd(attach, session);
      const info: PeerInfo = {
        volumeId: attach.volumeId,
        instance: attach.instance,
        sizeBytes: attach.sizeBytes,
        state: attach.state,
        epoch: attach.epoch,
        durableEpoch: attach.durableEpoch,
        tornRanges: attach.tornRanges,
        inconsistent: attach.inconsistent,
        generation: attach.generation,
      };
      log.info({ instance: info.instance, epoch: info.epoch, durableEpoch: info.durableEpoch, inconsistent: attach.inconsistent }, 'attached to the peer');
      const sameInstance = (instance: string): void => {
        if (instance !== info.instance) throw new GannetError('EPEER', `peer ${address}: volume ${volume} was reopened (instance ${instance}, attached to ${info.instance}): it lost what this session sent`);
      };
      return {
        info,
        device,
        // A peer daemon restarted since the attach answers for a new instance that never saw this
        // session's writes: its checkpoint or durable epoch must not count for them.
        checkpoint: async () => {
          const { epoch, durableEpoch, instance } = await call(session, 'checkpoint', 'POST', `${volumePath}/checkpoint`, checkpointSchema);
          sameInstance(instance);
          return { epoch, durableEpoch };
        },
        durableEpoch: async () => {
          const { durableEpoch, instance } = await call(session, 'durable epoch', 'GET', volumePath, volumeSchema);
          sameInstance(instance);
          return durableEpoch;
        },
        setInconsistent: async (inconsistent, adopt) => {
          const body = { inconsistent, ...(adopt !== undefined && { generation: adopt }) };
          const { instance } = await call(session, `mark ${inconsistent ? 'inconsistent' : 'consistent'}`, 'PUT', `${volumePath}/inconsistent`, markSchema, body);
          sameInstance(instance);
        },
        digests: async (offset, length) => {
          const answer = await call(session, `digests at ${offset}`, 'POST', `${volumePath}/digests`, digestsSchema, { offset, length });
          sameInstance(answer.instance);
          return Buffer.from(answer.digests, 'base64');
        },
        abort: () => {
          if (session.aborted) return;
          lifetime.abort(new Error('the session was aborted'));
          device.destroy();
          log.debug('session aborted');
        },
      };
    },
  };
}
