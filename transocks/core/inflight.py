"""The registry of a handler's connections in flight, and who owns a client socket when.

See `InFlight`.  Handlers of both daemons keep their dials and relays here; the
worker's graceful stop and TERM reset them through `abort_all`.
"""

from __future__ import annotations

import logging
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any

from gevent import GreenletExit
from gevent.hub import Waiter, get_hub

from . import outcome
from .counters import Counters
from .netutil import close_quietly
from .relay import Relay

log = logging.getLogger("transocks")


class _Registries(threading.local):
    """Every registry of this worker thread (tests run hubs in several threads), for abort_all."""

    def __init__(self) -> None:
        self.all: weakref.WeakSet[InFlight] = weakref.WeakSet()


_registries = _Registries()


class InFlight:
    """The registry of one handler's connections in flight on callbacks: dials under
    way and relays, kept visible to the runtime, and the one list of who owns a
    client socket.

    A relay (and the dial before it) runs on callbacks and its connection's
    greenlet is done: a parked greenlet would cost ~7 KiB per idle connection,
    the relay alone ~2 KiB.  The runtime still has to see the connections: a
    graceful stop waits until no registry is `busy()` (told by `on_idle`), the
    graceful timeout and TERM reset them all (`abort_all`).  A handler whose
    greenlet has to wait for its connections can park in `stand_in()`.

    Who closes a client socket, one owner at a time:
      1. the worker's accept loop (`runtime.worker`), until the handler is called;
      2. the handler, in the accept callback and then, if it must wait (a sniff, a name's
         lookup), in a greenlet, until it hands the connection on: a refusal resets
         it (`close_with_reset`), anything else lets it go here (`let_go`);
      3. a dial under way (`hold`): the dial's end (`_opened`) owns it next, and
         relays it or refuses it as in 2;
      4. a relay (`start`): its end closes both sockets here (`_done` -> `let_go`).
    """

    def __init__(self, on_done: Callable[[Relay], None], counters: Counters) -> None:
        self.on_done = on_done  # called in the hub for each relay that ends; its sockets close after
        self.counters = counters
        self.relays: set[Relay] = set()
        self.dials: set[Any] = set()  # dials under way (anything with abort(detail, outcome)), see hold()
        self._keeping = False  # a greenlet is parked in stand_in()
        self._waiter: Waiter | None = None  # what it waits on
        _registries.all.add(self)

    def abort(self, detail: str) -> int:
        """Reset every dial and relay of the set (outcome shutdown); returns how many."""
        running = [*self.dials, *self.relays]
        for r in running:
            r.abort(detail, outcome.SHUTDOWN)
        return len(running)

    def hold(self, dial: Any) -> None:
        """Count a dial under way as one of the set until `settle(dial)`."""
        self.dials.add(dial)

    def settle(self, dial: Any) -> None:
        """The dial has ended (its owner relays or refuses next)."""
        self.dials.discard(dial)
        self._wake_if_idle()

    def start(self, r: Relay) -> None:
        """Start r as one of the set; once this returns, the set closes its sockets and
        counts it out of `counters.active` when it ends."""
        self.relays.add(r)
        r.closes = True
        try:
            r.start(self._done)
        except BaseException:
            self.relays.discard(r)
            raise

    def stand_in(self) -> None:
        """Park the calling greenlet while dials or relays run, standing in for them all
        (unless another already does)."""
        if self._keeping:
            return
        self._keeping = True
        try:
            while self.relays or self.dials:
                self._waiter = Waiter()
                self._waiter.get()
        except GreenletExit:
            self._waiter = None
            self.abort("worker stopped before the connection ended")
            raise
        finally:
            self._keeping = False
            self._waiter = None

    def let_go(self, client: socket.socket | None, upstream: socket.socket | None) -> None:
        """Close a connection's sockets and count it out (also for one that never relayed)."""
        close_quietly(upstream)
        close_quietly(client)
        self.counters.active -= 1

    def _done(self, r: Relay) -> None:
        """Runs inside relay callbacks and aborts: it must not raise."""
        self.relays.discard(r)
        try:
            self.on_done(r)
        except Exception:
            log.exception("logging the end of a relay failed")
        finally:
            self.let_go(*r.socks)
            self._wake_if_idle()

    def _wake_if_idle(self) -> None:
        if not self.relays and not self.dials:
            if self._waiter is not None:
                waiter, self._waiter = self._waiter, None
                get_hub().loop.run_callback(waiter.switch, None)
            if on_idle is not None:
                get_hub().loop.run_callback(on_idle)  # later: a dial that ended may start its relay


on_idle: Callable[[], None] | None = None
"""Called (in a later callback) when a registry's last dial or relay has ended: a worker
sets it while it stops gracefully, to leave once none is `busy()`."""


def busy() -> bool:
    """Dials or relays still run in some registry of this thread."""
    return any(registry.relays or registry.dials for registry in list(_registries.all))


def abort_all(detail: str) -> int:
    """Reset every dial and relay of every registry in this thread (a worker stopping
    now), each ending with outcome shutdown; returns how many."""
    return sum(registry.abort(detail) for registry in list(_registries.all))
