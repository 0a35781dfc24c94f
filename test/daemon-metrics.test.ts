/**
 * Goal: the daemon's /metrics text stays valid Prometheus exposition whatever the label values, including
 * the parts gannet writes by hand at scrape time (the NBD latency histogram) rather than through prom-client.
 *
 * Method: a Metrics instance fed NBD request events whose export and command names hold a backslash, a
 * double quote and a newline; the text is parsed with the exposition grammar and every label value must
 * read back as the original string.
 */
import { describe, expect, it } from 'vitest';
import { Metrics, escapeLabelValue } from '@gannet/server';
import type { RequestEvent } from 'nbd-server-js';

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

const unescapes: Record<string, string> = { '\\\\': '\\', '\\"': '"', '\\n': '\n' };

/** Parses the text format strictly: a line that does not follow the grammar throws. */
function parseExposition(text: string): Sample[] {
  const samples: Sample[] = [];
  const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*)\})? (\S+)$/;
  const label = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"/g;
  for (const row of text.split('\n')) {
    if (row === '' || /^# (HELP|TYPE) /.test(row)) continue;
    const match = line.exec(row);
    if (!match) throw new Error(`not a Prometheus text line: ${JSON.stringify(row)}`);
    const labels: Record<string, string> = {};
    for (const [, key, raw] of (match[2] ?? '').matchAll(label)) labels[key] = raw.replace(/\\[\\"n]/g, (escape) => unescapes[escape]);
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

function find(samples: Sample[], name: string, labels: Record<string, string>): Sample[] {
  return samples.filter((sample) => sample.name === name && Object.entries(labels).every(([key, value]) => sample.labels[key] === value));
}

describe('Prometheus label values', () => {
  it('escapes backslash, double quote and newline', () => {
    expect(escapeLabelValue('a\\b"c\nd')).toBe('a\\\\b\\"c\\nd');
    expect(escapeLabelValue('plain/export')).toBe('plain/export');
  });

  it('keeps /metrics parseable when export and command names hold " \\ and a newline', async () => {
    const metrics = new Metrics(() => 0);
    const exportName = 'vm"1\\disk\nprimary';
    const command = 'wri"te\\';
    const event = { exportName, command, bytes: 4096, durationNs: 2_000n } as unknown as RequestEvent;
    metrics.onRequest(event);
    metrics.onRequest(event);

    const samples = parseExposition(await metrics.text());
    expect(find(samples, 'gannet_nbd_requests_total', { export: exportName, command, result: 'ok' }).map((s) => s.value)).toEqual([2]);
    expect(find(samples, 'gannet_nbd_request_bytes_total', { export: exportName, command }).map((s) => s.value)).toEqual([8192]);
    expect(find(samples, 'gannet_nbd_request_duration_seconds_count', { command }).map((s) => s.value)).toEqual([2]);
    expect(find(samples, 'gannet_nbd_request_duration_seconds_bucket', { command, le: '+Inf' }).map((s) => s.value)).toEqual([2]);
    expect(find(samples, 'gannet_nbd_request_duration_seconds_sum', { command })).toHaveLength(1);
  });

  it('the parser refuses an unescaped quote', () => {
    expect(() => parseExposition('x{command="a"b"} 1\n')).toThrow(/not a Prometheus text line/);
  });
});
