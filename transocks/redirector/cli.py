"""The transocks daemon: settings, logging and the transparent handler on the pre-fork runtime."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Sequence

from ..core import logs
from ..core.config import Config
from ..core.counters import Counters
from ..core.netutil import Endpoint
from ..runtime.listeners import PrepareListener
from ..runtime.master import serve
from . import methods
from .handler import TransparentHandler
from .settings import SETTINGS
from .sniff import Sniffer
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
        if cfg.tproxy:
            methods.tproxy.check_listen(cfg.listen)
        return list(cfg.listen)

    def prepare_listener(self, cfg: Config) -> PrepareListener | None:
        return methods.method(cfg.tproxy).prepare_listener

    def make_handler(self, cfg: Config) -> tuple[Callable[[socket.socket, tuple], None], Counters]:
        dialer = make_dialer(cfg.proxy_url, cfg.connect_timeout, cfg.handshake_timeout, cfg.socks5_pipelining)
        counters = Counters()
        sniffer = Sniffer(frozenset(cfg.sniff_ports), cfg.sniff_timeout) if cfg.sniff_ports and cfg.sniff_timeout else None
        handler = TransparentHandler(dialer, cfg.listen, cfg.idle_timeout, cfg.half_close_timeout, counters,
                                     method=methods.method(cfg.tproxy), sniffer=sniffer, send_domain=cfg.send_domain)
        return handler, counters


def main(argv: Sequence[str] | None = None) -> int:
    return serve(TransocksApp(), sys.argv[1:] if argv is None else argv)
