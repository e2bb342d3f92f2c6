"""A stand-in daemon on the pre-fork runtime, for tests of the runtime alone.

Run as ``python -m tests.lab.standin [runtime flags]``.  Each connection gets
one line back: ``<worker pid> <generation>``; then it is held until the peer
closes.  When the file named by STANDIN_FAIL exists, new workers fail to boot
(their handler cannot be made), which is how tests make a reload or a
recycled worker's successor fail; STANDIN_BOOT_DELAY (seconds) slows every
worker's boot; STANDIN_EXIT_AFTER (seconds) makes every worker exit that long
after it boots (a crash loop); STANDIN_LEAK (a number) makes every connection
leave that many descriptors open for good, as a leaking worker would.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Sequence

import gevent

from transocks.core import logs, nio
from transocks.core.config import Config
from transocks.core.counters import Counters
from transocks.runtime.master import serve
from transocks.runtime.settings import runtime_settings


class StandinApp:
    name = "standin"

    def load_config(self, argv: Sequence[str]) -> Config:
        return Config(self.name, runtime_settings(["127.0.0.1:18931"]), "STANDIN", "/nonexistent").load(argv)

    def setup_logging(self, cfg: Config) -> None:
        logs.setup(self.name, cfg.error_log, cfg.log_level, cfg.access_log)

    def listen(self, cfg: Config) -> list:
        return list(cfg.listen)

    def prepare_listener(self, cfg: Config) -> None:
        return None

    def make_handler(self, cfg: Config):
        flag = os.environ.get("STANDIN_FAIL")
        if flag and os.path.exists(flag):
            raise RuntimeError("standin: fail flag is set")
        time.sleep(float(os.environ.get("STANDIN_BOOT_DELAY", "0")))  # a slow boot (signals land in it)
        exit_after = os.environ.get("STANDIN_EXIT_AFTER")
        if exit_after:
            gevent.spawn_later(float(exit_after), os._exit, 0)
        counters = Counters()
        generation = os.environ.get("STANDIN_GEN", "?")
        leak = int(os.environ.get("STANDIN_LEAK", "0"))
        leaked: list[int] = []

        def handle(conn: socket.socket, peer: tuple) -> None:
            counters.active += 1
            counters.total += 1
            leaked.extend(os.open(os.devnull, os.O_RDONLY) for _ in range(leak))
            try:
                nio.sendall(conn, f"{os.getpid()} {generation}\n".encode())
                while nio.recv_some(conn):
                    pass
            except OSError:
                pass
            finally:
                counters.active -= 1
                conn.close()

        return handle, counters


if __name__ == "__main__":
    sys.exit(serve(StandinApp(), sys.argv[1:]))
