import { MemoryDevice, NbdClient, NbdServer } from 'nbd-server-js';

export async function serveMemory(): Promise<string> {
  // Serve a 64 MiB in-memory disk on a free loopback port.
  const server = new NbdServer();
  server.addExport('scratch', new MemoryDevice(64 * 1024 * 1024));
  const address = await server.listen({ host: '127.0.0.1', port: 0 });

  // Attach to it over NBD; the client is itself a BlockDevice.
  const client = await NbdClient.connect(address, { exportName: 'scratch' });
  try {
    await client.write(Buffer.from('hello, block device'), 4096, { fua: true });
    const back = await client.readBytes(4096, 19);
    return back.toString();
  } finally {
    await client.close();
    await server.close();
  }
}
