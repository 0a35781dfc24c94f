/**
 * Goal: the CLI as libnbd's Python binding (what nbdsh runs) sees it — negotiated features, block sizes,
 * every write-side command with data read back, BLOCK_STATUS, errno values for out-of-range and
 * read-only requests (strict mode off, so libnbd sends them instead of refusing client-side), and
 * multi-conn visibility between two connections.
 * Method: run /usr/bin/python3 with an inline script using `import nbd`; the script prints one JSON
 * object on its last stdout line, and the assertions here are on that object.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startNbdCli } from './helpers/nbd-cli.js';
import { removeTmpDirs, requireTool, runOk, stopAllProcesses, systemPython } from './helpers/process.js';

const MiB = 1024 * 1024;

/** Shared prelude: connects `h` to argv[1] with base:allocation, and a helper to catch an nbd.Error. */
const prelude = `
import errno, json, sys
import nbd
uri = sys.argv[1]
def connect():
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h
def err_of(f):
    try:
        f()
        return 'ok'
    except nbd.Error as e:
        return e.errno
def extents(h, count, offset, flags=0):
    out = []
    def cb(ctx, off, entries, err):
        if ctx == nbd.CONTEXT_BASE_ALLOCATION:
            out.append({'offset': off, 'entries': list(entries)})
        return 0
    h.block_status(count, offset, cb, flags)
    return out
`;

async function py<T>(uri: string, body: string): Promise<T> {
  const r = await runOk(systemPython, ['-c', `${prelude}\n${body}`, uri], { timeoutMs: 30_000 });
  const lines = r.stdout.trim().split('\n');
  return JSON.parse(lines[lines.length - 1]) as T;
}

beforeAll(() => {
  requireTool('python3-nbd');
  requireTool('nbdsh');
});
afterEach(stopAllProcesses);
afterAll(removeTmpDirs);

describe('libnbd (python) against a memory disk', () => {
  it('negotiates structured replies, base:allocation, block sizes and the can_* flags', async () => {
    const cli = await startNbdCli({ memory: 8 * MiB });
    const r = await py<Record<string, unknown>>(
      cli.uri,
      `
h = connect()
print(json.dumps({
  'size': h.get_size(),
  'structured': h.get_structured_replies_negotiated(),
  'protocol': h.get_protocol(),
  'base_allocation': h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),
  'min': h.get_block_size(nbd.SIZE_MINIMUM),
  'pref': h.get_block_size(nbd.SIZE_PREFERRED),
  'max': h.get_block_size(nbd.SIZE_MAXIMUM),
  'flush': h.can_flush(), 'fua': h.can_fua(), 'trim': h.can_trim(), 'zero': h.can_zero(),
  'multi_conn': h.can_multi_conn(), 'df': h.can_df(), 'read_only': h.is_read_only(),
}))
h.shutdown()
`,
    );
    expect(r).toMatchObject({
      size: 8 * MiB,
      structured: true,
      protocol: 'newstyle-fixed',
      base_allocation: true,
      flush: true,
      fua: true,
      trim: true,
      zero: true,
      multi_conn: true,
      df: true,
      read_only: false,
    });
    const min = r.min as number;
    const pref = r.pref as number;
    const max = r.max as number;
    expect(min).toBeGreaterThanOrEqual(1);
    expect(min).toBeLessThanOrEqual(64 * 1024);
    expect(pref).toBeGreaterThanOrEqual(512);
    expect(max).toBeGreaterThanOrEqual(pref);
  });

  it('FUA write, zero, trim, flush and block_status read back correctly', async () => {
    const cli = await startNbdCli({ memory: 8 * MiB });
    const r = await py<Record<string, unknown>>(
      cli.uri,
      `
h = connect()
a = bytes((i * 7 + 3) & 255 for i in range(65536))
h.pwrite(a, 1048576, nbd.CMD_FLAG_FUA)
h.pwrite(b'\\x5a' * 131072, 2097152)
h.zero(65536, 2097152 + 4096)
h.pwrite(b'\\x33' * 1048576, 4194304)
h.trim(1048576, 4194304)
h.flush()
h2 = connect()
out = {
  'fua_ok': h2.pread(65536, 1048576) == a,
  'zeroed': h2.pread(65536, 2097152 + 4096) == bytes(65536),
  'around_zero': h2.pread(4096, 2097152) == b'\\x5a' * 4096 and h2.pread(131072 - 69632, 2097152 + 69632) == b'\\x5a' * (131072 - 69632),
  'trimmed': h2.pread(1048576, 4194304) == bytes(1048576),
  'unwritten': h2.pread(4096, 0) == bytes(4096),
  'bs_data': extents(h2, 65536, 1048576, nbd.CMD_FLAG_REQ_ONE),
  'bs_hole': extents(h2, 1048576, 6291456),
  'bs_full': extents(h2, 8388608, 0),
}
h.shutdown(); h2.shutdown()
print(json.dumps(out))
`,
    );
    expect(r.fua_ok).toBe(true);
    expect(r.zeroed).toBe(true);
    expect(r.around_zero).toBe(true);
    expect(r.trimmed).toBe(true);
    expect(r.unwritten).toBe(true);

    // REQ_ONE: exactly one extent, no longer than asked, and written data is not a hole.
    const one = r.bs_data as { offset: number; entries: number[] }[];
    expect(one).toHaveLength(1);
    expect(one[0].offset).toBe(MiB);
    expect(one[0].entries).toHaveLength(2);
    expect(one[0].entries[0]).toBeGreaterThan(0);
    expect(one[0].entries[0]).toBeLessThanOrEqual(65536);
    expect(one[0].entries[1] & 1).toBe(0);

    // Never written: reads as zero (flag 2).
    const hole = r.bs_hole as { offset: number; entries: number[] }[];
    expect(hole).toHaveLength(1);
    expect(hole[0].entries[1] & 2).toBe(2);

    // The whole disk: extents in order, all but the last inside the request, covering the data range.
    const full = (r.bs_full as { offset: number; entries: number[] }[])[0];
    let at = 0;
    const entries = full.entries;
    for (let i = 0; i < entries.length; i += 2) {
      expect(entries[i]).toBeGreaterThan(0);
      if (at <= MiB && MiB < at + entries[i]) expect(entries[i + 1] & 1, 'written data reported as a hole').toBe(0);
      at += entries[i];
    }
    expect(at).toBeLessThanOrEqual(8 * MiB);
  });

  it('answers requests past the end with ENOSPC for writes and EINVAL for reads', async () => {
    const cli = await startNbdCli({ memory: MiB + 512 + 3 });
    const size = MiB + 512 + 3;
    const r = await py<Record<string, string>>(
      cli.uri,
      `
h = connect()
h.set_strict_mode(0)
size = h.get_size()
out = {
  'write': err_of(lambda: h.pwrite(b'x' * 512, size - 100)),
  'write_far': err_of(lambda: h.pwrite(b'x' * 512, 1 << 40)),
  'zero': err_of(lambda: h.zero(512, size)),
  'read': err_of(lambda: h.pread(512, size - 100)),
  'read_far': err_of(lambda: h.pread(1, 1 << 50)),
  'trim': err_of(lambda: h.trim(512, size)),
  'block_status': err_of(lambda: extents(h, 512, size + 1)),
  'bad_flag': err_of(lambda: h.pwrite(b'x', 0, 1 << 15)),
  'last_byte_write': err_of(lambda: h.pwrite(b'\\xee', size - 1)),
  'last_byte': h.pread(1, size - 1).hex(),
  'untouched': h.pread(1, size - 2).hex(),
}
h.shutdown()
print(json.dumps(out))
`,
    );
    expect(size).toBe(1049091);
    expect(r).toEqual({
      write: 'ENOSPC',
      write_far: 'ENOSPC',
      zero: 'ENOSPC',
      read: 'EINVAL',
      read_far: 'EINVAL',
      trim: 'EINVAL',
      block_status: 'EINVAL',
      bad_flag: 'EINVAL',
      last_byte_write: 'ok',
      last_byte: 'ee',
      untouched: '00',
    });
  });

  it('two connections see each other\'s flushed and FUA writes (multi-conn)', async () => {
    const cli = await startNbdCli({ memory: 4 * MiB });
    const r = await py<Record<string, boolean>>(
      cli.uri,
      `
h1 = connect(); h2 = connect()
out = {'multi_conn': h1.can_multi_conn() and h2.can_multi_conn()}
h1.pwrite(b'\\x01' * 4096, 0); h1.flush()
out['h2_sees_flushed'] = h2.pread(4096, 0) == b'\\x01' * 4096
h2.pwrite(b'\\x02' * 4096, 8192, nbd.CMD_FLAG_FUA)
out['h1_sees_fua'] = h1.pread(4096, 8192) == b'\\x02' * 4096
h2.pwrite(b'\\x03' * 4096, 0); h2.flush()
out['h1_sees_overwrite'] = h1.pread(4096, 0) == b'\\x03' * 4096
h1.shutdown(); h2.shutdown()
print(json.dumps(out))
`,
    );
    expect(r).toEqual({ multi_conn: true, h2_sees_flushed: true, h1_sees_fua: true, h1_sees_overwrite: true });
  });

  it('nbdsh itself runs against the export', async () => {
    const cli = await startNbdCli({ memory: 2 * MiB });
    const env = { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ''}` };
    const r = await runOk(
      'nbdsh',
      ['-u', cli.uri, '-c', "h.pwrite(b'abc', 7); h.flush(); print(h.get_size(), h.pread(5, 6).hex())"],
      { env },
    );
    expect(r.stdout.trim()).toBe(`${2 * MiB} 0061626300`);
  });
});

describe('libnbd (python) against a read-only export', () => {
  it('refuses write, zero and trim with EPERM and still reads', async () => {
    const cli = await startNbdCli({ memory: MiB, readOnly: true });
    const r = await py<Record<string, unknown>>(
      cli.uri,
      `
h = connect()
h.set_strict_mode(0)
out = {
  'read_only': h.is_read_only(),
  'write': err_of(lambda: h.pwrite(b'x' * 512, 0)),
  'zero': err_of(lambda: h.zero(512, 0)),
  'trim': err_of(lambda: h.trim(512, 0)),
  'read_after': h.pread(512, 0) == bytes(512),
  'flush': err_of(lambda: h.flush()) if h.can_flush() else 'ok',
}
h.shutdown()
print(json.dumps(out))
`,
    );
    expect(r).toEqual({ read_only: true, write: 'EPERM', zero: 'EPERM', trim: 'EPERM', read_after: true, flush: 'ok' });
  });
});
