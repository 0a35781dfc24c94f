import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { escapeXml, strategyColors, strategyOrder, type MachineInfo } from './report.js';
import { coloRatioMin, nativeRatioMin, steadyRatioMin, type SustainedRow } from './sustained.js';

/**
 * The report of a sustained run: results.json (every row with its per-second series), report.md (the
 * table, then the series as text) and chart.svg (one line chart of per-second IOPS per row, a line per
 * strategy). A cliff is a shape over time, so the series is the result; the table only summarises it.
 */

export interface SustainedSettings {
  suite: 'sustained';
  durationS: number;
  checkpointMs: number[];
  volumeBytes: number;
  queueDepth: number;
  seed: number;
  fio: string;
  /** 1, 5 and 15 min load averages when the run started and when it ended: the machine is shared. */
  loadAverageStart: number[];
  loadAverageEnd: number[];
}

export interface SustainedReport {
  generatedAt: string;
  machine: MachineInfo;
  settings: SustainedSettings;
  rows: SustainedRow[];
}

const fixed = (value: number | null, digits: number): string =>
  value === null || !Number.isFinite(value) ? '-' : value.toFixed(digits);
const times = (value: number | null): string => (value === null || !Number.isFinite(value) ? '-' : `${value.toFixed(2)}x`);
const goal = (value: boolean | null): string => (value === null ? '-' : value ? 'pass' : 'FAIL');

export const sustainedTableHeader = [
  'Row',
  'Strategy',
  'IOPS min',
  'IOPS median',
  'IOPS max',
  'MB/s min',
  'MB/s median',
  'MB/s max',
  'slowest/fastest',
  'median vs native',
  'median vs COLO',
  'call p50 ms',
  'call p99 ms',
  'call max ms',
  `slowest >= ${steadyRatioMin}x fastest`,
  `>= ${nativeRatioMin}x native`,
  `>= ${coloRatioMin}x COLO`,
];

export function sustainedTable(rows: readonly SustainedRow[]): string {
  const lines = [
    `| ${sustainedTableHeader.join(' | ')} |`,
    `|${sustainedTableHeader.map((_, i) => (i < 2 ? ' --- ' : ' ---: ')).join('|')}|`,
  ];
  for (const r of rows) {
    lines.push(
      `| ${[
        r.row,
        r.strategy,
        fixed(r.iops.min, 0),
        fixed(r.iops.median, 0),
        fixed(r.iops.max, 0),
        fixed(r.mbPerSec.min, 1),
        fixed(r.mbPerSec.median, 1),
        fixed(r.mbPerSec.max, 1),
        fixed(r.slowestToFastest, 2),
        r.strategy === 'native' ? '-' : times(r.medianVsNative),
        r.strategy === 'colo' ? '-' : times(r.medianVsColo),
        fixed(r.cadenceCallMs.p50Ms, 2),
        fixed(r.cadenceCallMs.p99Ms, 2),
        fixed(r.cadenceCallMs.maxMs, 2),
        goal(r.goals.steady),
        goal(r.goals.atLeastNative),
        goal(r.goals.twiceColo),
      ].join(' | ')} |`,
    );
  }
  return lines.join('\n');
}

export function sustainedMarkdown(report: SustainedReport): string {
  const { machine: m, settings: s } = report;
  const load = (l: number[]) => l.map((x) => x.toFixed(2)).join(' / ');
  return [
    '# gannet benchmark: sustained writes under frequent checkpoints',
    '',
    `Generated ${report.generatedAt}. Each row ran ${s.durationS} s per strategy: one fio job (${s.fio}, nbd engine, ` +
      `QD${s.queueDepth}) into \`vol/primary\` of a fresh ${Math.round(s.volumeBytes / 2 ** 20)} MiB volume, ` +
      `seed ${s.seed}; checkpoint cadences ${s.checkpointMs.join(', ')} ms.`,
    '',
    `Machine: ${m.nproc} CPUs (${m.cpuModel}), ${m.memTotalGiB.toFixed(1)} GiB RAM, ${m.platform}, Node ${m.node}; ` +
      `data dir on ${m.dataDirFs}. Load average (1/5/15 min): ${load(s.loadAverageStart)} at the start, ${load(s.loadAverageEnd)} at the end.`,
    '',
    'Throughput is per second (fio, 1 s windows; a second with no completed write counts as 0). colo and gannet ' +
      'get `POST /v1/volumes/NAME/checkpoint` at the cadence; native (passthrough) gets an NBD FLUSH on its own ' +
      'connection instead, since its checkpoint does no I/O: a file server flushing as often. "call" is the round ' +
      'trip of that checkpoint or FLUSH. Goals: the slowest second at least half the fastest; the median ' +
      'at least native\'s; gannet at least twice COLO\'s.',
    '',
    sustainedTable(report.rows),
    '',
    '## Per-second IOPS',
    '',
    '```',
    ...report.rows.map((r) => `${r.row} ${r.strategy}: ${r.perSecond.iops.map((v) => Math.round(v)).join(' ')}`),
    '```',
    '',
  ].join('\n');
}

/** 1-2-5 steps: the smallest giving at most `ticksMax` intervals up to `max`. */
export function niceStep(max: number, ticksMax = 5): number {
  if (!(max > 0)) return 1;
  const raw = max / ticksMax;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * magnitude).find((step) => step >= raw)!;
}

const compact = (n: number): string => (n >= 1e6 ? `${n / 1e6}M` : n >= 1e3 ? `${n / 1e3}K` : String(n));

/**
 * One panel per row (profile and cadence), stacked: x = second of the run, y = IOPS from 0, a line
 * per strategy. Each line is a `<polyline data-row data-strategy>` with one point per second.
 */
export function sustainedChart(rows: readonly SustainedRow[]): string {
  const panels = [...new Set(rows.map((r) => r.row))];
  const strategies = strategyOrder.filter((s) => rows.some((r) => r.strategy === s));
  const left = 70;
  const plotWidth = 640;
  const plotHeight = 170;
  const panelHeight = plotHeight + 70;
  const top = 60;
  const width = left + plotWidth + 30;
  const height = top + panels.length * panelHeight + 10;
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="11">`,
    '<title>Per-second write IOPS under checkpoints, per row and strategy</title>',
    `<rect x="0" y="0" width="${width}" height="${height}" fill="#ffffff"/>`,
    `<text x="${left}" y="22" font-size="14" font-weight="bold">Per-second write IOPS (fio, QD32, vol/primary)</text>`,
  ];
  strategies.forEach((strategy, i) => {
    const x = left + i * 110;
    parts.push(
      `<rect x="${x}" y="34" width="16" height="4" fill="${strategyColors[strategy]}"/>`,
      `<text x="${x + 22}" y="40" fill="#111">${strategy}</text>`,
    );
  });
  panels.forEach((panel, p) => {
    const series = rows.filter((r) => r.row === panel);
    const seconds = Math.max(...series.map((r) => r.perSecond.iops.length));
    const peak = Math.max(0, ...series.flatMap((r) => r.perSecond.iops));
    const step = niceStep(peak);
    const yMax = Math.max(step, Math.ceil(peak / step) * step);
    const y0 = top + p * panelHeight + 30;
    const y = (value: number) => y0 + plotHeight - (value / yMax) * plotHeight;
    // Second s (1-based) is the window ending at s, drawn at its end.
    const x = (second: number) => left + (seconds <= 1 ? plotWidth : ((second - 1) / (seconds - 1)) * plotWidth);
    const first = series[0];
    parts.push(
      `<text x="${left}" y="${y0 - 10}" font-weight="bold" fill="#111">${escapeXml(
        `${first.profile}, checkpoint every ${first.checkpointMs} ms${series.some((r) => r.strategy === 'native') ? ' (native: NBD FLUSH)' : ''}`,
      )}</text>`,
    );
    for (let tick = 0; tick <= yMax; tick += step) {
      parts.push(
        `<line x1="${left}" y1="${y(tick).toFixed(1)}" x2="${left + plotWidth}" y2="${y(tick).toFixed(1)}" stroke="#ddd" stroke-width="1"/>`,
        `<text x="${left - 6}" y="${(y(tick) + 4).toFixed(1)}" text-anchor="end" fill="#333">${compact(tick)}</text>`,
      );
    }
    const xStep = seconds > 20 ? 5 : seconds > 10 ? 2 : 1;
    for (let s = 1; s <= seconds; s++) {
      if (s !== 1 && s % xStep !== 0) continue;
      parts.push(`<text x="${x(s).toFixed(1)}" y="${y0 + plotHeight + 14}" text-anchor="middle" fill="#333">${s}</text>`);
    }
    parts.push(
      `<line x1="${left}" y1="${y0 + plotHeight}" x2="${left + plotWidth}" y2="${y0 + plotHeight}" stroke="#333"/>`,
      `<text x="${left + plotWidth}" y="${y0 + plotHeight + 28}" text-anchor="end" fill="#333">second</text>`,
    );
    for (const r of series) {
      const points = r.perSecond.iops.map((v, i) => `${x(i + 1).toFixed(1)},${y(v).toFixed(1)}`).join(' ');
      parts.push(
        `<polyline data-row="${escapeXml(r.row)}" data-strategy="${r.strategy}" fill="none" stroke="${strategyColors[r.strategy]}" stroke-width="1.5" points="${points}">` +
          `<title>${escapeXml(`${r.strategy} ${r.row}: IOPS min ${Math.round(r.iops.min)}, median ${Math.round(r.iops.median)}, max ${Math.round(r.iops.max)}`)}</title></polyline>`,
      );
    }
  });
  parts.push('</svg>');
  return `${parts.join('\n')}\n`;
}

export async function writeSustainedReport(dir: string, report: SustainedReport): Promise<{ json: string; markdown: string; svg: string }> {
  await mkdir(dir, { recursive: true });
  const files = { json: join(dir, 'results.json'), markdown: join(dir, 'report.md'), svg: join(dir, 'chart.svg') };
  await writeFile(files.json, `${JSON.stringify(report, null, 2)}\n`);
  await writeFile(files.markdown, sustainedMarkdown(report));
  await writeFile(files.svg, sustainedChart(report.rows));
  return files;
}
