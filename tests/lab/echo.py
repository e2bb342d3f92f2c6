"""A plain TCP echo server for the "Internet" namespace (asyncio, one process).

Run as ``python echo.py --bind ADDR [--bind ADDR ...] --port P``.  Unlike
servers.py (a thread per connection) it holds thousands of idle connections
cheaply, which is what the benchmark's held-connection load needs.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import socket


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def _serve(binds: list[str], port: int) -> None:
    servers = []
    for host in binds:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        servers.append(await asyncio.start_server(_echo, host, port, family=family,
                                                  backlog=4096, reuse_address=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    """Echo every byte back until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", action="append", required=True, help="address (repeatable)")
    parser.add_argument("--port", type=int, default=7007)
    args = parser.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_serve(args.bind, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
