"""The worker's accept loop with a handler that serves connections in the accept callback
(`inline`): a dial out of descriptors stops the burst it came in, and the connections open
then cap what is taken on until some end or the cap lifts."""

from __future__ import annotations

import errno
import os
import socket

import gevent

from tests.unit.test_dial import wait_until
from transocks.core.counters import Counters
from transocks.runtime import worker as worker_mod


class _Cfg:
    max_connections = 100


class _Exhausting:
    """An inline handler that keeps each client open (a relay), except that the dial of
    connection number `fail_at` finds no descriptor: it pauses accepts through the worker's
    hook, as `nio.new_socket` does, and the client is reset."""

    def __init__(self, worker: worker_mod.Worker, fail_at: int) -> None:
        self.worker = worker
        self.fail_at = fail_at
        self.seen = 0
        self.open: list[socket.socket] = []

    def inline(self, client: socket.socket, peer: tuple) -> None:
        self.seen += 1
        counters = self.worker.counters
        counters.active += 1
        if self.seen == self.fail_at:
            self.worker._dial_exhausted(OSError(errno.EMFILE, os.strerror(errno.EMFILE)))
            client.close()
            counters.active -= 1
            return
        self.open.append(client)

    def end_one(self) -> None:
        self.open.pop().close()
        self.worker.counters.active -= 1


def test_a_dial_out_of_descriptors_ends_the_burst_and_caps_accepts_at_the_open_connections(monkeypatch):
    monkeypatch.setattr(worker_mod, "FD_CAP_HOLD", 3.0)  # long enough for the steps below under load
    ctrl, _master = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener = socket.create_server(("127.0.0.1", 0), backlog=32)
    listener.setblocking(False)
    w = worker_mod.Worker(None, _Cfg(), 1, 1, 1, [], ctrl, os.getppid())
    w.counters = Counters()
    handler = _Exhausting(w, fail_at=4)
    w.inline = handler.inline
    w.acceptors = [worker_mod.Acceptor(w, listener, 16)]
    clients = [socket.create_connection(listener.getsockname()) for _ in range(10)]
    try:
        w.resume_accepting()
        wait_until(lambda: handler.seen >= 4)
        gevent.sleep(0.2)  # the back-off (0.05 s) has passed: the cap holds the queue
        assert handler.seen == 4 and len(handler.open) == 3 and w.cap == 3
        handler.end_one()
        wait_until(lambda: handler.seen == 5)  # one ended: room for one more
        gevent.sleep(0.1)
        assert handler.seen == 5 and len(handler.open) == 3
        wait_until(lambda: handler.seen == 10, 10)  # the cap lifted
        assert w.cap == _Cfg.max_connections
    finally:
        w.pause_accepting()
        for s in [*clients, *handler.open, listener, ctrl, _master]:
            s.close()
