"""The transocks daemon: settings, logging and the transparent handler on the pre-fork runtime."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence

from ..core import logs
from ..core.config import Command, Config, ConfigError
from ..core.namecheck import NameCheck
from ..core.netutil import Endpoint
from ..runtime import capabilities, control
from ..runtime.listeners import PrepareListener
from ..runtime.master import main as run_daemon
from ..runtime.metrics import ConnectionStats
from . import doctor, firewall, methods, udp
from .exits.balance import Pool
from .exits.config import DEFAULT_POOL, DIRECT, REJECT, PoolSpec
from .exits.member import HealthPolicy
from .exits.metrics import report_members
from .exits.registry import DialSettings, Exits
from .handler import LoopGuard, TransparentHandler
from .health import Discovery, HealthChecker
from .limits import SourceLimits
from .route import Router, udp_without_exit
from .settings import SETTINGS
from .sniff import Sniffer
from .upstream import parse_proxy_url

DEFAULT_CONFIG = "/etc/transocks/transocks.conf"
DESCRIPTION = (
    "Transparent SOCKS/HTTP-CONNECT redirector: connections that iptables/nftables REDIRECT\n"
    "(or TPROXY, see --tproxy) here are sent to their original destination through the\n"
    "upstream proxy."
)


class TransocksApp:
    name = "transocks"

    def __init__(self) -> None:
        self.serving: tuple[Router, LoopGuard] | None = None  # in a worker: what its TCP handler routes with

    def config(self) -> Config:
        rules = Command("rules", "[--apply|--remove] [--format auto|iptables|nft] [--from IFACE] [SETTINGS]",
                        "print, apply or remove the firewall rules this configuration needs", self.rules)
        check = Command("doctor", "[--target HOST:PORT] [SETTINGS]",
                        "check configuration, daemon, rules, upstream and a canary connection, one line per step",
                        self.doctor)
        status = Command("status", "[--json] [SETTINGS]",
                         "ask the running master (control_socket) about its workers and upstream members",
                         self.status)
        demo = Command("demo", "[--pause SECONDS] (as root)", "the whole chain in network namespaces of its own, step by step", self.demo)
        return Config(self.name, SETTINGS, "TRANSOCKS", DEFAULT_CONFIG, DESCRIPTION, validate=validate,
                      commands=[rules, check, status, demo])

    def load_config(self, argv: Sequence[str]) -> Config:
        cfg = self.config().load(argv)
        if cfg.check_config:
            print(describe_exits(cfg))
        return cfg

    def rules(self, argv: Sequence[str]) -> int:
        return firewall.rules_command(argv, self.load_config)

    def doctor(self, argv: Sequence[str]) -> int:
        return doctor.doctor_command(argv, self.load_config)

    def status(self, argv: Sequence[str]) -> int:
        return control.status_command(self.name, argv, self.config().load, next(s.default for s in SETTINGS if s.name == "control_socket"))

    def demo(self, argv: Sequence[str]) -> int:
        from ..demo import (
            demo_command,  # the demo is an entry point on top, not part of the daemon
        )

        return demo_command(argv)

    def setup_logging(self, cfg: Config) -> None:
        logs.setup(self.name, cfg.error_log, cfg.log_level, cfg.access_log, cfg.access_log_format)
        if not cfg.verify_names and cfg.sniff_ports:
            logging.getLogger("transocks").warning(
                "verify_names = false: sniffed names are trusted as sent; a client can forge its way through "
                "domain= routes and send_domain")
        if cfg.udp:  # here: once at start and at each reload, in the master
            for line in udp_without_exit(cfg.proxy_url, cfg.pool, cfg.route):
                logging.getLogger("transocks").warning("%s", line)

    def listen(self, cfg: Config) -> list[Endpoint]:
        if cfg.tproxy:
            methods.tproxy.check_listen(cfg.listen)
        return list(cfg.listen)

    def prepare_listener(self, cfg: Config) -> PrepareListener | None:
        return methods.method(cfg.tproxy).prepare_listener

    def listen_datagram(self, cfg: Config) -> list[Endpoint]:
        """With udp = true, a UDP socket per worker slot on each listen address (TPROXY's on-port)."""
        return list(cfg.listen) if cfg.udp else []

    def prepare_datagram(self, cfg: Config) -> PrepareListener | None:
        return udp.prepare_listener

    def worker_capabilities(self, cfg: Config) -> tuple[int, ...]:
        """UDP replies leave from transparent sockets the workers make, bound on the destination's address
        and port: IP_TRANSPARENT needs CAP_NET_RAW, a port below 1024 (DNS, NTP) CAP_NET_BIND_SERVICE."""
        return (capabilities.CAP_NET_RAW, capabilities.CAP_NET_BIND_SERVICE) if cfg.udp else ()

    def serve_datagrams(self, cfg: Config, sockets: list[socket.socket], counters: ConnectionStats) -> udp.UdpService:
        """In the worker, after make_handler: UDP flows routed by the same router, exits and health."""
        assert self.serving is not None
        router, guard = self.serving
        settings = udp.UdpSettings(cfg.udp_idle_timeout, cfg.udp_max_sessions,
                                   (cfg.connect_timeout + cfg.handshake_timeout) or 10.0)
        return udp.UdpService(sockets, router, settings, counters, guard)

    def make_handler(self, cfg: Config) -> tuple[Callable[[socket.socket, tuple], None], ConnectionStats]:
        """In the worker: the exits, their checks and discovery (greenlets of this worker's hub), the handler."""
        exits = Exits(DialSettings(cfg.connect_timeout, cfg.handshake_timeout, cfg.socks5_pipelining, cfg.upstream_fastopen),
                      HealthPolicy(cfg.rise, cfg.fall))
        router = make_router(cfg, exits)
        guard = LoopGuard(cfg.listen)
        self.serving = (router, guard)
        discovery = Discovery(exits, cfg.resolve_interval, lambda: guard.set_upstreams(exits.endpoints()))
        discovery.resolve_all()
        guard.set_upstreams(exits.endpoints())
        discovery.start()
        HealthChecker(exits, cfg.health_interval, cfg.health_timeout, cfg.health_target,
                      router.reachable("udp") if cfg.udp else ()).start()
        counters = ConnectionStats()
        report_members(exits, counters, cfg.udp)
        sniffer = Sniffer(frozenset(cfg.sniff_ports), cfg.sniff_timeout) if cfg.sniff_ports and cfg.sniff_timeout else None
        handler = TransparentHandler(router, guard, cfg.idle_timeout, cfg.half_close_timeout, counters,
                                     method=methods.method(cfg.tproxy), sniffer=sniffer,
                                     limits=SourceLimits.configured(cfg.max_conns_per_source,
                                                                    cfg.conn_rate_per_source,
                                                                    cfg.conn_burst_per_source),
                                     names=NameCheck(cfg.name_cache_ttl, cfg.name_check_timeout) if cfg.verify_names else None)
        return handler, counters


def make_router(cfg: Config, exits: Exits) -> Router:
    """The default pool, `direct`, the named pools, and the rules pointing at them."""
    targets: dict[str, Pool | str] = {
        DEFAULT_POOL: exits.pool(DEFAULT_POOL, cfg.proxy_url, cfg.balance, cfg.send_domain, cfg.retries),
        DIRECT: exits.pool(DIRECT, [parse_proxy_url("direct://")], checked=False),
        REJECT: REJECT,
    }
    for spec in cfg.pool:
        targets[spec.name] = exits.pool(spec.name, spec.urls, spec.balance, spec.send_domain, cfg.retries)
    return Router([(rule, targets[rule.target]) for rule in cfg.route], targets[DEFAULT_POOL])


def validate(cfg: Config) -> None:
    """Pool names once each; every route target exists.  Errors name the file and line."""
    names = {DEFAULT_POOL, DIRECT, REJECT}
    for spec, where in zip(cfg.pool, cfg.item_sources["pool"]):
        if spec.name in names:
            raise ConfigError(f"{where}: pool {spec.name!r} is defined twice")
        names.add(spec.name)
    for rule, where in zip(cfg.route, cfg.item_sources["route"]):
        if rule.target not in names:
            raise ConfigError(f"{where}: route {rule}: no pool named {rule.target!r} "
                              f"(pools: {', '.join(sorted(names))})")
    if not cfg.proxy_url:
        raise ConfigError("proxy_url: the default pool needs at least one member")


def describe_exits(cfg: Config) -> str:
    """For --check-config: the pools and the rules in the order they are tried."""
    default = PoolSpec(DEFAULT_POOL, tuple(cfg.proxy_url), cfg.balance, cfg.send_domain)
    lines = [f"pool {spec}" for spec in (default, *cfg.pool)]
    for i, (rule, where) in enumerate(zip(cfg.route, cfg.item_sources["route"]), 1):
        lines.append(f"route {i}: {rule}    # {where}")
    lines.append(f"route {len(cfg.route) + 1}: (anything else) -> {DEFAULT_POOL}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return run_daemon(TransocksApp(), argv)
