"""A loopback endpoint process for benchmarks: source, sink and echo on one port.

Each connection starts with one command line:
  SOURCE <n>\\n  the endpoint sends n bytes, then closes
  SINK <n>\\n    the endpoint reads n bytes, then answers OK\\n
  ECHO\\n        the endpoint echoes everything until EOF
Run: python -m bench.endpoint  (prints the port on stdout, serves until killed).
"""

from __future__ import annotations

import asyncio
import sys

BLOCK = bytes(range(256)) * 1024  # 256 KiB


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        command = (await reader.readline()).split()
        if command[:1] == [b"SOURCE"]:
            remaining = int(command[1])
            view = memoryview(BLOCK)
            while remaining > 0:
                piece = view[: min(len(BLOCK), remaining)]
                writer.write(piece)
                remaining -= len(piece)
                await writer.drain()
        elif command[:1] == [b"SINK"]:
            remaining = int(command[1])
            while remaining > 0:
                data = await reader.read(min(remaining, 1 << 20))
                if not data:
                    break
                remaining -= len(data)
            writer.write(b"OK\n")
            await writer.drain()
        elif command[:1] == [b"ECHO"]:
            while data := await reader.read(1 << 18):
                writer.write(data)
                await writer.drain()
    except (ConnectionError, IndexError, ValueError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=1 << 20, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
