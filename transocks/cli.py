"""The transocks daemon: settings, logging and the transparent handler on the pre-fork runtime."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Sequence

from . import logs
from .config import Config
from .handler import TransparentHandler
from .netutil import Endpoint
from .runtime.app import Counters
from .runtime.master import serve
from .settings import SETTINGS
from .upstream import make_dialer

DEFAULT_CONFIG = "/etc/transocks/transocks.conf"
DESCRIPTION = (
    "Transparent SOCKS/HTTP-CONNECT redirector: connections that iptables/nftables REDIRECT\n"
    "(or TPROXY, see --tproxy) here are sent to their original destination through the\n"
    "upstream proxy."
)


class TransocksApp:
    name = "transocks"

    def load_config(self, argv: Sequence[str]) -> Config:
        return Config(self.name, SETTINGS, "TRANSOCKS", DEFAULT_CONFIG, DESCRIPTION).load(argv)

    def setup_logging(self, cfg: Config) -> None:
        logs.setup(self.name, cfg.error_log, cfg.log_level, cfg.access_log, cfg.access_log_format)

    def listen(self, cfg: Config) -> list[Endpoint]:
        return list(cfg.listen)

    def transparent(self, cfg: Config) -> bool:
        return bool(cfg.tproxy)

    def make_handler(self, cfg: Config) -> tuple[Callable[[socket.socket, tuple], None], Counters]:
        dialer = make_dialer(cfg.proxy_url, cfg.connect_timeout, cfg.handshake_timeout, cfg.socks5_pipelining)
        counters = Counters()
        handler = TransparentHandler(dialer, cfg.listen, cfg.idle_timeout, cfg.half_close_timeout, counters,
                                     tproxy=cfg.tproxy)
        return handler, counters


def main(argv: Sequence[str] | None = None) -> int:
    return serve(TransocksApp(), sys.argv[1:] if argv is None else argv)
