"""The transocks daemon: settings, logging and the transparent handler on the pre-fork runtime."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Sequence

from ..core import logs
from ..core.config import Command, Config, ConfigError
from ..core.counters import Counters
from ..core.netutil import Endpoint
from ..runtime.listeners import PrepareListener
from ..runtime.master import serve
from . import doctor, firewall, methods
from .handler import TransparentHandler
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

    def config(self) -> Config:
        rules = Command("rules", "[--apply|--remove] [--format iptables|nft] [--from IFACE] [SETTINGS]",
                        "print, apply or remove the firewall rules this configuration needs", self.rules)
        check = Command("doctor", "[--target HOST:PORT] [SETTINGS]",
                        "check configuration, daemon, rules, upstream and a canary connection, one line per step",
                        self.doctor)
        return Config(self.name, SETTINGS, "TRANSOCKS", DEFAULT_CONFIG, DESCRIPTION, commands=[rules, check])

    def load_config(self, argv: Sequence[str]) -> Config:
        return self.config().load(argv)

    def rules(self, argv: Sequence[str]) -> int:
        return firewall.rules_command(argv, self.load_config)

    def doctor(self, argv: Sequence[str]) -> int:
        return doctor.doctor_command(argv, self.load_config)

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
        handler = TransparentHandler(dialer, cfg.listen, cfg.idle_timeout, cfg.half_close_timeout, counters,
                                     method=methods.method(cfg.tproxy))
        return handler, counters


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    app = TransocksApp()
    try:
        code = app.config().run_command(args)
    except ConfigError as exc:
        print(f"transocks: error: {exc}", file=sys.stderr)
        return 2
    return serve(app, args) if code is None else code
