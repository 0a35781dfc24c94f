/** Types of requirements.mjs, which stays plain JavaScript so that it runs before anything is built. */
export const systemPython: string;
export function findProgram(name: string, path?: string): string | undefined;
export function kernelReleases(): string[];
export function staticBusybox(): string | undefined;
export function packageOf(what: string): string;
