"""Members in the metrics and in `status`."""

from __future__ import annotations

from ...runtime.metrics import ConnectionStats
from .member import Member
from .registry import Exits


def member_views(exits: Exits) -> list[tuple[str, Member]]:
    """(pool name, member) for every member of every pool, for metrics and status."""
    return [(p.name, m) for p in exits.pools for m in p.members]


def report_members(exits: Exits, stats: ConnectionStats, udp: bool = False) -> None:
    """Give this worker's members to the metrics (refreshed each heartbeat) and to the status;
    with `udp`, the UDP state of each SOCKS5 member too (what its UDP ASSOCIATE checks say)."""
    stats.declare("gauge", "upstream_up", ("pool", "member"), "1 when every worker sees the member healthy")
    if udp:
        stats.declare("gauge", "upstream_udp_up", ("pool", "member"),
                      "1 when every worker sees the SOCKS5 member healthy for UDP flows (TCP and UDP ASSOCIATE)")
    stats.declare("counter", "upstream_dials", ("pool", "member"), "tunnels tried through the member")
    stats.declare("counter", "upstream_failures", ("pool", "member"), "tries that failed at the member")

    def refresh() -> None:
        for pool, m in member_views(exits):
            labels = (pool, str(m))
            stats.gauges[("upstream_up", labels)] = 1.0 if m.up else 0.0
            stats.events[("upstream_dials", labels)] = m.dials
            stats.events[("upstream_failures", labels)] = m.failures
            if udp and m.associates:
                stats.gauges[("upstream_udp_up", labels)] = 1.0 if m.usable("udp") else 0.0

    def report() -> list[dict]:
        return [{"pool": pool, "member": str(m), "up": m.up, "active": m.active, "dials": m.dials,
                 "failures": m.failures, "last_error": m.last_error[:200]} for pool, m in member_views(exits)]

    stats.refresh.append(refresh)
    stats.report = report
