import {
  BlockDeviceError,
  checkRange,
  defaultBlockSizes,
  type BlockDevice,
  type BlockSizes,
  type Capabilities,
  type Extent,
  type WriteOptions,
  type ZeroOptions,
} from 'nbd-server-js';

export type ViewRole = 'primary' | 'secondary';

/** How a view behaves now: buffered while replicating, a plain disk (or read-only) after failover. */
export type ViewMode = 'buffered' | 'plain' | 'read-only';

/**
 * `noHole`: zeroes that must stay allocated in the backing file (WRITE_ZEROES with NO_HOLE); trim and
 * other zeroes may become holes. Meaningless for data writes.
 */
export interface ViewWriteOptions {
  readonly fua: boolean;
  readonly noHole: boolean;
}

/** What a view needs from its volume; the volume passes closures, so none of this is public API. */
export interface ViewHost {
  mode(role: ViewRole): ViewMode;
  read(role: ViewRole, buf: Uint8Array, offset: number): Promise<void>;
  /** `src` null writes zeroes (trim and write-zeroes). */
  write(role: ViewRole, src: Uint8Array | null, offset: number, length: number, options: ViewWriteOptions): Promise<void>;
  flush(role: ViewRole): Promise<void>;
  extents(role: ViewRole, offset: number, length: number): Promise<Extent[]>;
  /** Rejects when the volume is closed; cache has nothing else to do (buffers are memory). */
  ready(role: ViewRole): Promise<void>;
}

/**
 * One view of a replicated volume as a BlockDevice: primary = P over C over B, secondary = S over C over B.
 * Public verbs check their input, then hand trusted arguments to the volume (Level's put/_put split).
 * Closing a view does nothing: the volume owns the buffers and the file, and closes them in close().
 */
export class VolumeView implements BlockDevice {
  readonly role: ViewRole;
  readonly size: number;
  readonly blockSizes: BlockSizes;
  private readonly host: ViewHost;

  constructor(role: ViewRole, size: number, blockBytes: number, host: ViewHost) {
    this.role = role;
    this.size = size;
    this.blockSizes = Object.freeze({ minimum: 1, preferred: blockBytes, maximum: defaultBlockSizes.maximum });
    this.host = host;
  }

  /** fastZero only while buffered: a zero is then a marker; on the plain disk it writes zeroes. */
  get capabilities(): Capabilities {
    const mode = this.host.mode(this.role);
    return {
      readOnly: mode === 'read-only',
      flush: true,
      fua: true,
      trim: true,
      zero: true,
      fastZero: mode === 'buffered',
      cache: true,
      multiConn: true,
      extents: true,
    };
  }

  read(buf: Uint8Array, offset: number): Promise<void> {
    try {
      checkRange(this.size, offset, buf.length, 'read');
    } catch (err) {
      return Promise.reject(err);
    }
    return this.host.read(this.role, buf, offset);
  }

  write(data: Uint8Array, offset: number, options?: WriteOptions): Promise<void> {
    try {
      checkRange(this.size, offset, data.length, 'write');
    } catch (err) {
      return Promise.reject(err);
    }
    return this.host.write(this.role, data, offset, data.length, { fua: options?.fua === true, noHole: false });
  }

  flush(): Promise<void> {
    return this.host.flush(this.role);
  }

  trim(offset: number, length: number, options?: WriteOptions): Promise<void> {
    try {
      checkRange(this.size, offset, length, 'trim');
    } catch (err) {
      return Promise.reject(err);
    }
    return this.host.write(this.role, null, offset, length, { fua: options?.fua === true, noHole: false });
  }

  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    try {
      checkRange(this.size, offset, length, 'zero');
    } catch (err) {
      return Promise.reject(err);
    }
    if (options?.fastZero === true && this.host.mode(this.role) === 'plain') {
      return Promise.reject(new BlockDeviceError('ENOTSUP', 'fast zero is not available on the failed-over disk'));
    }
    return this.host.write(this.role, null, offset, length, { fua: options?.fua === true, noHole: options?.noHole === true });
  }

  cache(offset: number, length: number): Promise<void> {
    try {
      checkRange(this.size, offset, length, 'cache');
    } catch (err) {
      return Promise.reject(err);
    }
    return this.host.ready(this.role);
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    try {
      checkRange(this.size, offset, length, 'extents');
    } catch (err) {
      return Promise.reject(err);
    }
    return this.host.extents(this.role, offset, length);
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}
