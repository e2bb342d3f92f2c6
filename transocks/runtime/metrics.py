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

prometheus_client is imported only when metrics are on (`preload`, in the
master before it drops privileges: afterwards it may no longer read the
library's files), so a daemon without `metrics_listen` never loads it.

What stays and what goes, so the directory follows the fleet: a dead
worker's live gauges leave with it, its counters and histograms are added
into one file of the departed (`*_gone.db`) and its own files removed, so
recycling workers for months does not grow the directory.  App-declared
gauges (a member's health) are the set the app reports now: a worker
rewrites its file of them whenever the set changes, so a member that left
discovery leaves the scrape.  Counters stay: they are totals.
"""

from __future__ import annotations

import bisect
import glob
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
    refusals by reason, a pool member's dials); `gauges` the current values
    of app-declared gauges (a member's health), as a whole: the Exporter
    empties it and the `refresh` callbacks fill it from the app's own state
    right before each flush, so a key no callback sets any more is gone.
    `report` gives the app's part of the status (the members) sent to the
    master.
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


def preload() -> None:
    """Import every part of prometheus_client that `enable`, the master's scrape and the
    workers' Exporter use, while the files are still readable (before the privilege drop)."""
    import prometheus_client  # noqa: F401
    import prometheus_client.exposition  # noqa: F401
    import prometheus_client.mmap_dict  # noqa: F401
    import prometheus_client.multiprocess  # noqa: F401
    import prometheus_client.values  # noqa: F401


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
        self._Counter = Counter
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
        self.gauges = GaugeSet(os.environ[ENV], prefix, stats)

    def _family(self, name: str) -> Any:
        metric = self.families.get(name)
        if metric is None:
            _kind, labels, help = self.stats.families[name]
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
        s.gauges.clear()
        for fn in s.refresh:
            fn()
        for key, n in s.events.items():
            d = n - self.last_events.get(key, 0)
            if d > 0:
                self._family(key[0]).labels(*key[1]).inc(d)
            self.last_events[key] = n
        self.gauges.write(s.gauges)
        self.active.set(s.active)
        self.fds.set(open_fds())


class GaugeSet:
    """A worker's app-declared gauges as one file that holds exactly the current set.

    prometheus_client keeps every label set it was ever given in the
    worker's file, so a member that left discovery would stay at its last
    value for the worker's whole life.  Here a changed set (a member came or
    went) is written beside the file and renamed over it (a scrape reads one
    or the other, whole); changed values of the same set are written in
    place, 16 bytes each, as prometheus_client writes its own.  Measured with
    5,000 members (2 busy cores): a rewrite 150-230 ms, once per discovery
    change; a value changed in place, or no change, under a millisecond.
    Mode `livemin`: a member is up when every live worker sees it up, and a
    dead worker's file leaves with it (`mark_process_dead`).
    """

    MODE = "livemin"

    def __init__(self, path: str, prefix: str, stats: ConnectionStats) -> None:
        self.path = path
        self.prefix = prefix
        self.stats = stats
        self.written: dict[tuple[str, Labels], float] = {}
        self._keys: dict[tuple[str, Labels], str] = {}  # mmap keys, built once per gauge
        self._table: Any = None  # the open file, for changes in place
        self._pid = 0

    def _key(self, gauge: tuple[str, Labels]) -> str:
        key = self._keys.get(gauge)
        if key is None:
            from prometheus_client.mmap_dict import mmap_key

            name, labels = gauge
            _kind, names, help = self.stats.families[name]
            metric = f"{self.prefix}_{name}"
            key = self._keys[gauge] = mmap_key(metric, metric, list(names), list(labels), help)
        return key

    def write(self, gauges: dict[tuple[str, Labels], float]) -> None:
        if os.getpid() != self._pid:  # a new process: nothing of it is written yet
            self._pid, self._table, self.written = os.getpid(), None, {}
        if gauges == self.written and (gauges or self._table is None):
            return
        if self._table is not None and gauges.keys() == self.written.keys():
            for gauge, v in gauges.items():
                if self.written[gauge] != v:
                    self._table.write_value(self._key(gauge), v, 0.0)
        else:
            self._rewrite(gauges)
        self.written = dict(gauges)

    def _rewrite(self, gauges: dict[tuple[str, Labels], float]) -> None:
        from prometheus_client.mmap_dict import MmapedDict

        final = os.path.join(self.path, f"gauge_{self.MODE}_{self._pid}.db")
        if self._table is not None:
            self._table.close()
            self._table = None
        self._keys = {g: k for g, k in self._keys.items() if g in gauges}
        if not gauges:
            if os.path.exists(final):
                os.unlink(final)
            return
        tmp = os.path.join(self.path, f".gauge_{self.MODE}_{self._pid}.new")  # not *.db: no scrape reads it
        if os.path.exists(tmp):
            os.unlink(tmp)
        table = MmapedDict(tmp)
        try:
            for gauge, v in gauges.items():
                table.write_value(self._key(gauge), v, 0.0)
        finally:
            table.close()
        os.replace(tmp, final)
        self._table = MmapedDict(final)


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # listdir's own
    except OSError:
        return 0


def _written(files: list[str]) -> list[str]:
    """The files a scrape can read: a worker makes its file empty and then sizes it, so
    one caught in between (0 bytes, no header) is skipped until its next scrape."""
    out = []
    for f in files:
        try:
            if os.path.getsize(f) >= 8:
                out.append(f)
        except OSError:
            pass  # removed since the listing (a departed worker's)
    return out


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

        class Scrape(multiprocess.MultiProcessCollector):
            def collect(self) -> Any:
                return self.merge(_written(glob.glob(os.path.join(path, "*.db"))), accumulate=True)

        Scrape(self.registry, path=path)

    def worker_gone(self, pid: int) -> None:
        """Its live gauges leave the sums; its counters and histograms are added into the
        departed's files (totals never go backwards) and its own files removed.

        Runs on the master's loop, like the scrape, so a scrape never sees a file
        half merged or a name listed and then missing."""
        self._multiprocess.mark_process_dead(pid, self.path)
        from prometheus_client.mmap_dict import MmapedDict

        for f in glob.glob(os.path.join(self.path, f"*_{pid}.db")):
            kind = os.path.basename(f).split("_")[0]
            if kind in ("counter", "histogram", "summary"):
                values = list(MmapedDict.read_all_values_from_file(f))
                gone = MmapedDict(os.path.join(self.path, f"{kind}_gone.db"))
                try:
                    for key, value, _ts, _pos in values:
                        gone.write_value(key, gone.read_value(key)[0] + value, 0.0)
                finally:
                    gone.close()
            # Other gauge modes would be per pid; none is declared here.
            os.unlink(f)
        half_written = os.path.join(self.path, f".gauge_{GaugeSet.MODE}_{pid}.new")  # died in a rewrite
        if os.path.exists(half_written):
            os.unlink(half_written)

    def scrape(self, nworkers: int) -> bytes:
        from prometheus_client import generate_latest

        self.workers.set(nworkers)
        self.fds.set(open_fds())
        return generate_latest(self.registry)
