import { AbstractBlockDevice, defaultBlockSizes, type Capabilities, type Extent, type ZeroRequest } from '@gannet/block-device';

export type ViewRole = 'primary' | 'secondary';

/**
 * `noHole`: zeroes that must stay allocated in the backing file (WRITE_ZEROES with NO_HOLE); trim and
 * other zeroes may become holes. Meaningless for data writes.
 */
export interface ViewWriteOptions {
  readonly fua: boolean;
  readonly noHole: boolean;
}

/**
 * What a view needs from its volume, whatever the strategy. The public verbs of the view (the base
 * class) have checked the request already: in range, not empty, allowed by `capabilities`.
 */
export interface ViewHost {
  capabilities(role: ViewRole): Capabilities;
  read(role: ViewRole, buf: Uint8Array, offset: number): Promise<void>;
  /** `src` null writes zeroes (trim and write-zeroes). */
  write(role: ViewRole, src: Uint8Array | null, offset: number, length: number, options: ViewWriteOptions): Promise<void>;
  flush(role: ViewRole): Promise<void>;
  extents(role: ViewRole, offset: number, length: number): Promise<Extent[]>;
  cache(role: ViewRole, offset: number, length: number): Promise<void>;
}

const plain: ViewWriteOptions = Object.freeze({ fua: false, noHole: false });
const fua: ViewWriteOptions = Object.freeze({ fua: true, noHole: false });

/**
 * One view of a replicated volume as a BlockDevice, for every strategy: the primary view (what the PVM's
 * forwarded writes see) or the secondary view (the SVM's disk). Trim is a zero that may leave a hole.
 * Closing a view only stops it taking requests: the volume owns the buffers and the files, and closes
 * them in its own close().
 */
export class VolumeView extends AbstractBlockDevice {
  readonly role: ViewRole;
  private readonly host: ViewHost;

  constructor(role: ViewRole, size: number, blockBytes: number, host: ViewHost) {
    super(size, Object.freeze({ minimum: 1, preferred: blockBytes, maximum: defaultBlockSizes.maximum }));
    this.role = role;
    this.host = host;
  }

  get capabilities(): Capabilities {
    return this.host.capabilities(this.role);
  }

  protected _read(buf: Uint8Array, offset: number): Promise<void> {
    return this.host.read(this.role, buf, offset);
  }

  protected _write(data: Uint8Array, offset: number, withFua: boolean): Promise<void> {
    return this.host.write(this.role, data, offset, data.length, withFua ? fua : plain);
  }

  protected override _flush(): Promise<void> {
    return this.host.flush(this.role);
  }

  protected override _trim(offset: number, length: number, withFua: boolean): Promise<void> {
    return this.host.write(this.role, null, offset, length, withFua ? fua : plain);
  }

  protected override _zero(offset: number, length: number, request: ZeroRequest): Promise<void> {
    return this.host.write(this.role, null, offset, length, { fua: request.fua, noHole: request.noHole });
  }

  protected override _extents(offset: number, length: number): Promise<Extent[]> {
    return this.host.extents(this.role, offset, length);
  }

  protected override _cache(offset: number, length: number): Promise<void> {
    return this.host.cache(this.role, offset, length);
  }
}

/** What the disk baselines (colo, passthrough) declare: real flush and FUA, zeroes written, no allocation map. */
export const diskViewCapabilities: Capabilities = Object.freeze({
  readOnly: false,
  flush: true,
  fua: true,
  trim: true,
  zero: true,
  fastZero: false,
  cache: false,
  multiConn: true,
  extents: false,
});
