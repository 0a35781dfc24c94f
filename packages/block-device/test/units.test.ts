/** The project's one size grammar (flags, config files, CLIs) and the shared zero buffer. */
import { describe, expect, it } from 'vitest';
import { GiB, KiB, MiB, PiB, TiB, parseSize, zeroChunkBytes, zeroes } from '../src/units.js';

describe('parseSize', () => {
  it('accepts plain bytes and binary suffixes, case-blind, with or without "iB" or "B"', () => {
    expect(parseSize('4096')).toBe(4096);
    expect(parseSize('4096B')).toBe(4096);
    expect(parseSize(' 64k ')).toBe(64 * KiB);
    expect(parseSize('64KiB')).toBe(64 * KiB);
    expect(parseSize('512M')).toBe(512 * MiB);
    expect(parseSize('1G')).toBe(GiB);
    expect(parseSize('1GiB')).toBe(GiB);
    expect(parseSize('2TB')).toBe(2 * TiB);
    expect(parseSize('1P')).toBe(PiB);
    expect(parseSize('0')).toBe(0);
  });

  it('refuses what is not a size, and sizes past a safe integer', () => {
    for (const bad of ['', '-1', '1.5G', '12Q', 'G', '1 G B', '0x10', '99999999P']) expect(parseSize(bad), bad).toBeUndefined();
  });
});

describe('zeroes', () => {
  it('hands out pieces of one shared zero buffer', () => {
    const whole = zeroes(zeroChunkBytes);
    const part = zeroes(100);
    expect(whole.length).toBe(zeroChunkBytes);
    expect(part.length).toBe(100);
    expect(part.buffer).toBe(whole.buffer);
    expect(whole.every((b) => b === 0)).toBe(true);
  });
});
