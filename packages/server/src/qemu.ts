/**
 * The QEMU command-line pieces printed at startup, shaped after QEMU's docs/COLO-FT.txt and
 * docs/block-replication.txt, with gannet's exports where COLO puts the secondary QEMU's NBD server:
 *
 * - primary host: the PVM's disk is a quorum (read-pattern=fifo, vote-threshold=1) whose child 0 is the
 *   local image; once the secondary is up, a `replication` node in primary mode with an `nbd` child that
 *   points at NAME/primary is added to the quorum with x-blockdev-change, and replication is started,
 *   so every PVM write is forwarded to gannet. A replication node that was never started fails every
 *   write with EIO, and the quorum hides that from the guest (vote-threshold=1 is met by the local
 *   image): nothing reaches NAME/primary. COLO starts replication as part of its migration into COLO
 *   state; without COLO, `xen-set-replication` starts it (despite its name it is in every QEMU built
 *   with replication, Debian's included);
 * - secondary host: the SVM's disk is NAME/secondary itself; gannet plays the part of the secondary
 *   QEMU's replication driver (active and hidden disks), so that side needs no replication node.
 */

export type NbdEndpoint = { host: string; port: number } | { path: string };

/** `file.server.*` options of QEMU's nbd block driver for an endpoint. */
function serverOptions(endpoint: NbdEndpoint, prefix: string): string {
  if ('path' in endpoint) return `${prefix}server.type=unix,${prefix}server.path=${endpoint.path}`;
  return `${prefix}server.type=inet,${prefix}server.host=${endpoint.host},${prefix}server.port=${endpoint.port}`;
}

/** The options of a raw disk on an NBD export, as `-drive`/`--image-opts` take them. */
export function nbdDriveOptions(endpoint: NbdEndpoint, exportName: string): string {
  return `driver=raw,file.driver=nbd,${serverOptions(endpoint, 'file.')},file.export=${exportName}`;
}

export interface QemuLines {
  /** The PVM's -drive: quorum over its local image. */
  primaryDrive: string;
  /**
   * QMP commands that attach NAME/primary to the quorum once the secondary is up, the last one starting
   * replication (leave it out under COLO, whose migration starts it).
   */
  primaryQmp: string[];
  /** The SVM's -drive. */
  secondaryDrive: string;
}

export function qemuLines(volume: string, endpoint: NbdEndpoint): QemuLines {
  const quorumId = `colo-${volume}`;
  const nodeName = `gannet-${volume}`;
  const replication =
    `drive_add -n buddy driver=replication,mode=primary,file.driver=nbd,${serverOptions(endpoint, 'file.')},` +
    `file.export=${volume}/primary,node-name=${nodeName}`;
  return {
    primaryDrive:
      `-drive if=virtio,id=${quorumId},driver=quorum,read-pattern=fifo,vote-threshold=1,` +
      `children.0.file.filename=PVM_IMAGE,children.0.driver=raw`,
    primaryQmp: [
      JSON.stringify({ execute: 'human-monitor-command', arguments: { 'command-line': replication } }),
      JSON.stringify({ execute: 'x-blockdev-change', arguments: { parent: quorumId, node: nodeName } }),
      JSON.stringify({ execute: 'xen-set-replication', arguments: { enable: true, primary: true } }),
    ],
    secondaryDrive: `-drive if=virtio,id=${quorumId},cache=none,${nbdDriveOptions(endpoint, `${volume}/secondary`)}`,
  };
}
