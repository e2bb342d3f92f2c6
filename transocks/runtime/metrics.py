"""Prometheus metrics of a pre-fork daemon: cheap counts in the hot path, flushed once a second.

Why prometheus_client: its multiprocess mode is made for pre-fork servers
(each process writes its values to mmap'ed files in PROMETHEUS_MULTIPROC_DIR,
the scraper sums them; the files of dead workers stay, so totals never go
backwards when workers are replaced, recycled or reloaded) and its text
exposition is the reference one.  Writing our own aggregation and format
would be more code for the same output.

Why batches: a connection only bumps plain ints of `ConnectionStats` (a
dict entry, two additions); the worker's heartbeat (once a second) turns
the differences into prometheus_client values (`Exporter.flush`), so the
mmap writes and their lock cost one flush a second, not one per connection.

prometheus_client is imported only when metrics are on (the master sets
PROMETHEUS_MULTIPROC_DIR first, see `enable`), so a daemon without
`metrics_listen` never loads it.
"""

from __future__ import annotations

import bisect
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from ..core.counters import Counters

HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ENV = "PROMETHEUS_MULTIPROC_DIR"

Labels = tuple[str, ...]


class ConnectionStats(Counters):
    """A worker's counts, kept by the handler and read by the heartbeat.

    `events` holds cumulative counts of app-declared families (usocksd's
    refusals by reason, a pool member's dials); `gauges` the current value
    of app-declared gauges (a member's health).  `refresh` callbacks fill
    them from the app's own state right before each flush; `report` gives
    the app's part of the status (the members) sent to the master.
    """

    __slots__ = ("events", "families", "gauges", "handshake_sum", "handshakes", "outcomes", "received",
                 "refresh", "report", "sent")

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: dict[str, int] = {}
        self.sent = 0
        self.received = 0
        self.handshakes = [0] * (len(HANDSHAKE_BUCKETS) + 1)  # the last one is +Inf
        self.handshake_sum = 0.0
        self.families: dict[str, tuple[str, Labels, str]] = {}  # name -> (counter|gauge, label names, help)
        self.events: dict[tuple[str, Labels], int] = {}
        self.gauges: dict[tuple[str, Labels], float] = {}
        self.refresh: list[Callable[[], None]] = []
        self.report: Callable[[], list[dict[str, Any]]] | None = None

    def declare(self, kind: str, name: str, labels: Labels, help: str) -> None:
        self.families[name] = (kind, labels, help)

    def finished(self, name: str, sent: int = 0, received: int = 0) -> None:
        """One connection ended with outcome `name`."""
        self.outcomes[name] = self.outcomes.get(name, 0) + 1
        self.sent += sent
        self.received += received

    def opened(self, seconds: float) -> None:
        """One tunnel opened `seconds` after its accept."""
        self.handshakes[bisect.bisect_left(HANDSHAKE_BUCKETS, seconds)] += 1
        self.handshake_sum += seconds

    def count(self, family: str, labels: Labels, n: int = 1) -> None:
        key = (family, labels)
        self.events[key] = self.events.get(key, 0) + n


def enable(name: str) -> str:
    """In the master, before any worker forks: a fresh private directory for the values.

    It is made by this master (mode 0700, after the privilege drop, so the
    workers can write it) and removed by `disable`; an upgrade's new master
    makes its own.
    """
    path = tempfile.mkdtemp(prefix=f"{name}-metrics-")
    os.environ[ENV] = path
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # in case prometheus_client was loaded before ENV was set
    return path


def disable(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Exporter:
    """A worker's prometheus_client metrics, fed from its ConnectionStats once a second."""

    def __init__(self, prefix: str, stats: ConnectionStats) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.stats = stats
        self.prefix = prefix
        self._Counter, self._Gauge = Counter, Gauge
        reg = None  # values go to the files; the scraper reads them with its own registry
        self.connections = Counter(f"{prefix}_connections", "connections that ended, by outcome", ["outcome"],
                                   registry=reg)
        self.active = Gauge(f"{prefix}_connections_active", "connections open now", multiprocess_mode="livesum",
                            registry=reg)
        self.bytes = Counter(f"{prefix}_bytes", "bytes relayed (counted when a connection ends): sent is client to "
                             "destination, received the other way", ["direction"], registry=reg)
        self.handshake = Histogram(f"{prefix}_handshake_seconds", "accept to tunnel open",
                                   buckets=HANDSHAKE_BUCKETS, registry=reg)
        self.fds = Gauge(f"{prefix}_open_fds", "open file descriptors of the master and the workers",
                         multiprocess_mode="livesum", registry=reg)
        self.families: dict[str, Any] = {}
        self.last_outcomes: dict[str, int] = {}
        self.last_bytes = (0, 0)
        self.last_handshakes = [0] * len(stats.handshakes)
        self.last_handshake_sum = 0.0
        self.last_events: dict[tuple[str, Labels], int] = {}

    def _family(self, name: str) -> Any:
        metric = self.families.get(name)
        if metric is None:
            kind, labels, help = self.stats.families[name]
            if kind == "gauge":
                # A member is up when every worker sees it up: the lowest of the live workers' values.
                metric = self._Gauge(f"{self.prefix}_{name}", help, list(labels), multiprocess_mode="livemin",
                                     registry=None)
            else:
                metric = self._Counter(f"{self.prefix}_{name}", help, list(labels), registry=None)
            self.families[name] = metric
        return metric

    def flush(self) -> None:
        s = self.stats
        for name, n in s.outcomes.items():
            d = n - self.last_outcomes.get(name, 0)
            if d:
                self.connections.labels(name).inc(d)
                self.last_outcomes[name] = n
        sent, received = self.last_bytes
        if s.sent != sent:
            self.bytes.labels("sent").inc(s.sent - sent)
        if s.received != received:
            self.bytes.labels("received").inc(s.received - received)
        self.last_bytes = (s.sent, s.received)
        # Histogram internals (per-bucket values, cumulated at scrape): one inc per bucket a second.
        for i, n in enumerate(s.handshakes):
            d = n - self.last_handshakes[i]
            if d:
                self.handshake._buckets[i].inc(d)
                self.last_handshakes[i] = n
        if s.handshake_sum != self.last_handshake_sum:
            self.handshake._sum.inc(s.handshake_sum - self.last_handshake_sum)
            self.last_handshake_sum = s.handshake_sum
        for fn in s.refresh:
            fn()
        for key, n in s.events.items():
            d = n - self.last_events.get(key, 0)
            if d > 0:
                self._family(key[0]).labels(*key[1]).inc(d)
            self.last_events[key] = n
        for (name, labels), v in s.gauges.items():
            self._family(name).labels(*labels).set(v)
        self.active.set(s.active)
        self.fds.set(open_fds())


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # listdir's own
    except OSError:
        return 0


class MasterMetrics:
    """The master's own values (restarts, reloads, its fds) and the scrape of everything."""

    def __init__(self, prefix: str, path: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, multiprocess

        self.path = path
        self._multiprocess = multiprocess
        self.restarts = Counter(f"{prefix}_worker_restarts", "workers replaced after they died, hung or were recycled",
                                ["reason"], registry=None)
        self.reloads = Counter(f"{prefix}_reloads", "HUP reloads, by result", ["result"], registry=None)
        self.workers = Gauge(f"{prefix}_workers", "worker processes alive", multiprocess_mode="livesum",
                             registry=None)
        self.fds = Gauge(f"{prefix}_open_fds", "open file descriptors of the master and the workers",
                         multiprocess_mode="livesum", registry=None)
        for r in ("died", "recycled", "hung"):
            self.restarts.labels(r)
        for r in ("ok", "failed"):
            self.reloads.labels(r)
        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry, path=path)

    def worker_gone(self, pid: int) -> None:
        """Its live gauges leave the sums; its counters stay (totals never go backwards)."""
        self._multiprocess.mark_process_dead(pid, self.path)

    def scrape(self, nworkers: int) -> bytes:
        from prometheus_client import generate_latest

        self.workers.set(nworkers)
        self.fds.set(open_fds())
        return generate_latest(self.registry)
