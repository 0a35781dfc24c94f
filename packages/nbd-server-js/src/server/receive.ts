/**
 * Receiving into buffers the server chooses. By default Node reads a socket into a fresh 64 KiB buffer
 * per read and emits it as a stream chunk; a 1 MiB WRITE then costs sixteen allocations, sixteen
 * events and a copy of every byte into the request's payload, which made the main thread, not the
 * network, the limit on large writes. Node's `onread` socket option instead lets the caller name the
 * buffer for each read, so the kernel copies a large payload straight into its final place.
 *
 * `net.Server` has no way to pass `onread` for accepted sockets. The accepted socket is created paused
 * (`pauseOnConnect`), and its handle is moved into a new `Socket` built with `onread`. That touches
 * `_handle`, which Node does not document; when the handle does not look as expected, the caller keeps
 * the plain socket and its 'data' events, so a future Node loses speed, not correctness.
 */
import { Socket } from 'node:net';

export interface Receiver {
  /** Where the next read should land; called after every read and once at the start. */
  buffer(): Buffer;
  /** `n` bytes arrived at the start of `buf`, the buffer the last `buffer()` returned. */
  received(n: number, buf: Buffer): void;
}

interface StreamHandle {
  readStart(): number;
  readStop(): number;
  useUserBuffer(buf: Uint8Array): void;
}

function isStreamHandle(h: unknown): h is StreamHandle {
  if (typeof h !== 'object' || h === null) return false;
  const s = h as Partial<StreamHandle>;
  return typeof s.readStart === 'function' && typeof s.readStop === 'function' && typeof s.useUserBuffer === 'function';
}

/**
 * Rebuilds a paused accepted socket so that its reads go through `receiver`, or returns null (and
 * leaves `raw` untouched) when this Node's socket internals are not the expected ones.
 */
export function adoptWithReceiver(raw: Socket, receiver: Receiver): Socket | null {
  const internal = raw as unknown as { _handle: unknown };
  const handle = internal._handle;
  if (!(raw instanceof Socket) || !isStreamHandle(handle)) return null;
  internal._handle = null;
  const socket = new Socket({
    handle,
    readable: true,
    writable: true,
    onread: { buffer: () => receiver.buffer(), callback: (n: number, buf: Uint8Array) => receiver.received(n, buf as Buffer) },
  } as ConstructorParameters<typeof Socket>[0]);
  // The listening server counts the connection through the socket's `_server` (for `getConnections`,
  // `maxConnections` and the `close` callback): that moves to the new socket, so destroying the
  // handle-less husk changes nothing.
  const from = raw as unknown as { _server: unknown; server: unknown };
  const to = socket as unknown as { _server: unknown; server: unknown };
  to._server = from._server;
  to.server = from.server;
  from._server = null;
  from.server = null;
  raw.destroy();
  return socket;
}
