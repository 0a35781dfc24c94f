/**
 * NBD URIs as libnbd and qemu parse them (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md):
 * the export name is the path after the first '/', percent-encoded, so names containing '/' survive.
 */
export type ListenAddress = { readonly host: string; readonly port: number } | { readonly path: string };

function encodeSocketPath(path: string): string {
  return path.replace(/[^A-Za-z0-9/._~-]/g, (c) => encodeURIComponent(c));
}

/** `tls` gives the `nbds` schemes, with which libnbd and qemu insist on TLS. */
export function nbdUri(addr: ListenAddress, exportName: string, options: { tls?: boolean } = {}): string {
  const name = encodeURIComponent(exportName);
  const scheme = options.tls ? 'nbds' : 'nbd';
  if ('path' in addr) return `${scheme}+unix:///${name}?socket=${encodeSocketPath(addr.path)}`;
  const host = addr.host.includes(':') ? `[${addr.host}]` : addr.host;
  return `${scheme}://${host}:${addr.port}/${name}`;
}
