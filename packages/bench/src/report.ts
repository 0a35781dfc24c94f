import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

/**
 * The report of a harness run: results.json (one row per profile and strategy), report.md (a Markdown
 * table plus the machine and settings), chart.svg (grouped bars per profile, hand-written SVG).
 *
 * Relative figures, per profile: overheadVsNative = 1 - opsPerSec / native opsPerSec (the throughput
 * lost to replication, as the paper's "overhead compared to native"); speedupVsColo = opsPerSec / colo
 * opsPerSec. Null where the reference row is missing.
 */

export const strategyOrder = ['native', 'colo', 'gannet'] as const;
export type BenchStrategy = (typeof strategyOrder)[number];

export interface ResultRow {
  profile: string;
  strategy: BenchStrategy;
  /** How the streams reached the daemons (runner.ts): native, deployment or one-daemon. */
  topology: 'native' | 'deployment' | 'one-daemon';
  /**
   * Reads + writes per second: deployed, the PVM stream's; on one daemon, the slower of the two streams
   * (outputs are compared, so the slower VM paces both).
   */
  opsPerSec: number;
  mbPerSec: number;
  p50Us: number;
  p99Us: number;
  /** Median client-observed FLUSH latency. */
  flushMs: number | null;
  flushP99Ms: number | null;
  /** Background commit of a checkpoint to the backing file ('flushed' events), mean; null if none. */
  commitFlushMs: number | null;
  /** p99 of the checkpoint's foreground pause (the volume's 'checkpoint' event pauseMs). */
  checkpointPauseP99Ms: number | null;
  /** p99 of the control API's checkpoint round trip. */
  checkpointApiP99Ms: number | null;
  checkpoints: number;
  /** Peak VmRSS of the run's daemons together. */
  rssMiB: number | null;
  /**
   * CPU used during the timed run, in cores (CPU seconds per second): the daemon serving the SVM (native:
   * the passthrough daemon) and, deployed, the primary daemon.
   */
  cpuCores: { secondary: number | null; primary: number | null };
  overheadVsNative: number | null;
  speedupVsColo: number | null;
  streams: { primaryOpsPerSec: number; secondaryOpsPerSec: number | null };
  ops: number;
  flushes: number;
  durationS: number;
  /** ops/s of every run with --repeat (this row is the median one). */
  opsPerSecRuns?: number[];
}

export interface MachineInfo {
  nproc: number;
  cpuModel: string;
  memTotalGiB: number;
  node: string;
  platform: string;
  dataDirFs: string;
}

export interface BenchSettings {
  durationS: number;
  checkpointMs: number;
  volumeBytes: number;
  seed: number;
  repeat: number;
  quick: boolean;
  daemon: string;
  topology: 'deployment' | 'one-daemon';
  /** Deployment: the primary daemon's ack mode. */
  ackMode?: 'peer' | 'local';
}

/** The deployment's goal for the PVM stream: throughput lost against native, at most. */
export const overheadGoal = 0.05;

export interface BenchReport {
  generatedAt: string;
  machine: MachineInfo;
  settings: BenchSettings;
  rows: ResultRow[];
}

/** Fills in overheadVsNative and speedupVsColo from the native and colo rows of the same profile. */
export function addRelativeFigures(rows: ResultRow[]): ResultRow[] {
  for (const row of rows) {
    const native = rows.find((r) => r.profile === row.profile && r.strategy === 'native');
    const colo = rows.find((r) => r.profile === row.profile && r.strategy === 'colo');
    row.overheadVsNative = native && native.opsPerSec > 0 ? 1 - row.opsPerSec / native.opsPerSec : null;
    row.speedupVsColo = colo && colo.opsPerSec > 0 ? row.opsPerSec / colo.opsPerSec : null;
  }
  return rows;
}

const fixed = (value: number | null, digits: number): string =>
  value === null || !Number.isFinite(value) ? '-' : value.toFixed(digits);
const percent = (value: number | null): string => (value === null || !Number.isFinite(value) ? '-' : `${(value * 100).toFixed(1)}%`);
const times = (value: number | null): string => (value === null || !Number.isFinite(value) ? '-' : `${value.toFixed(2)}x`);

export const tableHeader = [
  'Profile',
  'Strategy',
  'ops/s',
  'MB/s',
  'p50 µs',
  'p99 µs',
  'flush p50 ms',
  'ckpt pause p99 ms',
  'commit ms',
  'RSS MiB',
  'CPU cores',
  'overhead vs native',
  'speedup vs COLO',
];

function cpuText(r: ResultRow): string {
  const { secondary, primary } = r.cpuCores;
  if (primary === null) return fixed(secondary, 2);
  return `${fixed(primary, 2)} + ${fixed(secondary, 2)}`;
}

/**
 * Per profile whose gannet row misses the overhead goal: what the PVM's requests cost against native's
 * and where the daemons' CPU went, so a miss names its cause (latency per request, the checkpoint
 * calls, or a core saturated).
 */
export function whereTheTimeGoes(rows: readonly ResultRow[], nproc: number): string[] {
  const lines: string[] = [];
  for (const row of rows) {
    if (row.strategy !== 'gannet' || row.overheadVsNative === null || row.overheadVsNative <= overheadGoal) continue;
    const native = rows.find((r) => r.profile === row.profile && r.strategy === 'native');
    if (native === undefined) continue;
    const cpu = row.cpuCores.primary === null
      ? `the daemon used ${fixed(row.cpuCores.secondary, 2)} cores`
      : `the primary daemon used ${fixed(row.cpuCores.primary, 2)} cores and the secondary ${fixed(row.cpuCores.secondary, 2)}`;
    lines.push(
      `- ${row.profile}: ${percent(row.overheadVsNative)} below native. A PVM request took p50 ${fixed(row.p50Us, 0)} µs / p99 ` +
        `${fixed(row.p99Us, 0)} µs against native's ${fixed(native.p50Us, 0)} / ${fixed(native.p99Us, 0)} µs` +
        `${row.flushMs === null ? '' : `, FLUSH p50 ${fixed(row.flushMs, 2)} ms against ${fixed(native.flushMs, 2)} ms`}; ` +
        `${cpu} (native's ${fixed(native.cpuCores.secondary, 2)}) of the machine's ${nproc}, beside both VM streams' clients; ` +
        `checkpoint call p99 ${fixed(row.checkpointApiP99Ms, 2)} ms over ${row.checkpoints} checkpoints` +
        `${row.streams.secondaryOpsPerSec === null ? '' : `; the SVM stream ran at ${fixed(row.streams.secondaryOpsPerSec, 0)} ops/s`}.`,
    );
  }
  return lines;
}

export function markdownTable(rows: readonly ResultRow[]): string {
  const lines = [`| ${tableHeader.join(' | ')} |`, `|${tableHeader.map((_, i) => (i < 2 ? ' --- ' : ' ---: ')).join('|')}|`];
  for (const r of rows) {
    lines.push(
      `| ${[
        r.profile,
        r.strategy,
        fixed(r.opsPerSec, 0),
        fixed(r.mbPerSec, 1),
        fixed(r.p50Us, 0),
        fixed(r.p99Us, 0),
        fixed(r.flushMs, 2),
        fixed(r.checkpointPauseP99Ms, 2),
        fixed(r.commitFlushMs, 1),
        fixed(r.rssMiB, 0),
        cpuText(r),
        r.strategy === 'native' ? '-' : percent(r.overheadVsNative),
        r.strategy === 'colo' ? '-' : times(r.speedupVsColo),
      ].join(' | ')} |`,
    );
  }
  return lines.join('\n');
}

export function markdownReport(report: BenchReport): string {
  const { machine: m, settings: s } = report;
  return [
    '# gannet benchmark: native vs COLO-style vs GANNET',
    '',
    `Generated ${report.generatedAt}. ${s.quick ? '**Quick run (smoke test): numbers are not meaningful.** ' : ''}` +
      `Each profile ran ${s.durationS} s per strategy on a ${Math.round(s.volumeBytes / 2 ** 20)} MiB volume, ` +
      `checkpoint every ${s.checkpointMs} ms (colo, gannet), seed ${s.seed}, ` +
      `${s.repeat > 1 ? `median of ${s.repeat} runs, ` : ''}daemon: ${s.daemon}.`,
    '',
    `Machine: ${m.nproc} CPUs (${m.cpuModel}), ${m.memTotalGiB.toFixed(1)} GiB RAM, ${m.platform}, Node ${m.node}; data dir on ${m.dataDirFs}.`,
    '',
    s.topology === 'deployment'
      ? 'native = one VM stream on a passthrough volume (a local file). colo, gannet = the deployment: a primary ' +
        'daemon serves the PVM stream from its own backing file and forwards every write to a secondary daemon ' +
        '(strategy colo or gannet), which serves the SVM stream (the same workload, at once) and takes the ' +
        `checkpoints the primary calls; ack mode ${s.ackMode ?? 'peer'}; ops/s is the PVM stream's. CPU cores: primary + secondary daemon. ` +
        `Overhead = PVM throughput lost against native (goal: at most ${overheadGoal * 100}%); speedup = ops/s over COLO-style's.`
      : 'native = passthrough volume, primary stream only. colo, gannet = the same stream into `vol/primary` and ' +
        '`vol/secondary` of one daemon at once (active-active); ops/s is the slower stream\'s. Overhead = throughput ' +
        'lost against native; speedup = ops/s over COLO\'s.',
    '',
    markdownTable(report.rows),
    '',
    ...whereTheTimeGoesSection(report),
  ].join('\n');
}

function whereTheTimeGoesSection(report: BenchReport): string[] {
  const lines = whereTheTimeGoes(report.rows, report.machine.nproc);
  return lines.length === 0 ? [] : ['## Where the time goes', '', ...lines, ''];
}

export const escapeXml = (text: string): string =>
  text.replace(/[<>&'"]/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', "'": '&apos;', '"': '&quot;' })[c]!);

export const strategyColors: Record<BenchStrategy, string> = { native: '#7f8c8d', colo: '#e67e22', gannet: '#2980b9' };

/** Bars above this (relative to native) are clipped, with a break mark, so one outlier does not flatten the rest. */
export const chartPercentMax = 400;

/**
 * Grouped bars: one group per profile, one bar per strategy, height = throughput relative to native
 * (native = 100%), so profiles of very different ops/s share one axis. Absent native: relative to the
 * group's largest bar. Every bar is labelled with its value.
 */
export function svgChart(rows: readonly ResultRow[]): string {
  const profiles = [...new Set(rows.map((r) => r.profile))];
  const strategies = strategyOrder.filter((s) => rows.some((r) => r.strategy === s));
  const bar = 26;
  const gap = 6;
  const groupGap = 34;
  const left = 60;
  const top = 50;
  const plotHeight = 260;
  const groupWidth = strategies.length * (bar + gap) - gap;
  const width = left + profiles.length * (groupWidth + groupGap) + 20;
  const height = top + plotHeight + 90;
  const relative = (r: ResultRow): number => {
    const group = rows.filter((x) => x.profile === r.profile);
    const base = group.find((x) => x.strategy === 'native')?.opsPerSec ?? Math.max(...group.map((x) => x.opsPerSec));
    return base > 0 ? (r.opsPerSec / base) * 100 : 0;
  };
  const highest = Math.min(chartPercentMax, Math.max(100, ...rows.map(relative)));
  const tickStep = highest <= 200 ? 25 : 50;
  const yMax = Math.ceil(highest / tickStep) * tickStep;
  const y = (value: number) => top + plotHeight - (Math.min(value, yMax) / yMax) * plotHeight;
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="11">`,
    `<title>Throughput relative to native, per profile</title>`,
    `<rect x="0" y="0" width="${width}" height="${height}" fill="#ffffff"/>`,
    `<text x="${left}" y="22" font-size="14" font-weight="bold">Throughput relative to native (ops/s, native = 100%)</text>`,
  ];
  for (let tick = 0; tick <= yMax; tick += tickStep) {
    parts.push(
      `<line x1="${left}" y1="${y(tick).toFixed(1)}" x2="${width - 20}" y2="${y(tick).toFixed(1)}" stroke="${tick === 100 ? '#555' : '#ddd'}" stroke-width="1"${tick === 100 ? ' stroke-dasharray="4 3"' : ''}/>`,
      `<text x="${left - 6}" y="${(y(tick) + 4).toFixed(1)}" text-anchor="end" fill="#333">${tick}%</text>`,
    );
  }
  profiles.forEach((profile, g) => {
    const x0 = left + groupGap / 2 + g * (groupWidth + groupGap);
    strategies.forEach((strategy, i) => {
      const row = rows.find((r) => r.profile === profile && r.strategy === strategy);
      if (!row) return;
      const value = relative(row);
      const x = x0 + i * (bar + gap);
      parts.push(
        `<rect x="${x.toFixed(1)}" y="${y(value).toFixed(1)}" width="${bar}" height="${(top + plotHeight - y(value)).toFixed(1)}" fill="${strategyColors[strategy]}">` +
          `<title>${escapeXml(`${profile} ${strategy}: ${Math.round(row.opsPerSec)} ops/s (${value.toFixed(1)}%)`)}</title></rect>`,
        `<text x="${(x + bar / 2).toFixed(1)}" y="${(y(value) - 4).toFixed(1)}" text-anchor="middle" font-size="9" fill="#333">${Math.round(value)}</text>`,
      );
      if (value > yMax) {
        parts.push(`<path d="M${x - 2} ${y(yMax) + 10} l${bar + 4} -6 m0 5 l-${bar + 4} 6" stroke="#ffffff" stroke-width="2" fill="none"/>`);
      }
    });
    parts.push(
      `<text x="${(x0 + groupWidth / 2).toFixed(1)}" y="${top + plotHeight + 16}" text-anchor="middle" fill="#111">${escapeXml(profile)}</text>`,
    );
  });
  parts.push(`<line x1="${left}" y1="${top + plotHeight}" x2="${width - 20}" y2="${top + plotHeight}" stroke="#333"/>`);
  strategies.forEach((strategy, i) => {
    const x = left + i * 110;
    const ly = top + plotHeight + 44;
    parts.push(
      `<rect x="${x}" y="${ly}" width="12" height="12" fill="${strategyColors[strategy]}"/>`,
      `<text x="${x + 18}" y="${ly + 10}" fill="#111">${strategy}</text>`,
    );
  });
  parts.push('</svg>');
  return `${parts.join('\n')}\n`;
}

export async function writeReport(dir: string, report: BenchReport): Promise<{ json: string; markdown: string; svg: string }> {
  await mkdir(dir, { recursive: true });
  const files = { json: join(dir, 'results.json'), markdown: join(dir, 'report.md'), svg: join(dir, 'chart.svg') };
  await writeFile(files.json, `${JSON.stringify(report, null, 2)}\n`);
  await writeFile(files.markdown, markdownReport(report));
  await writeFile(files.svg, svgChart(report.rows));
  return files;
}
