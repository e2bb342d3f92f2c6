"""The relay on loopback TCP pairs: both directions, half-close, resets, timeouts."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import threading

import gevent
import pytest

from transocks.core import outcome
from transocks.core.counters import Counters
from transocks.core.inflight import InFlight
from transocks.core.netutil import close_with_reset
from transocks.core.relay import Relay, relay


def tcp_pair():
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    a = socket.create_connection(lsock.getsockname())
    b, _ = lsock.accept()
    lsock.close()
    return a, b


@pytest.fixture
def chain():
    """outer_client <-> [client_side relay upstream_side] <-> outer_server; outer ends are blocking."""
    outer_client, client_side = tcp_pair()
    upstream_side, outer_server = tcp_pair()
    result = {}

    def run():
        result["r"] = relay(client_side, upstream_side, idle_timeout=result.get("idle", 0.0), half_close_timeout=result.get("hc", 60.0))

    yield outer_client, outer_server, result, run
    for s in (outer_client, outer_server, client_side, upstream_side):
        s.close()


def run_relay_in_thread(run):
    """Drive the gevent relay in its own thread (own hub) while the test uses blocking sockets."""
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def recv_all(sock):
    chunks = []
    while True:
        d = sock.recv(65536)
        if not d:
            return b"".join(chunks)
        chunks.append(d)


def test_bulk_both_ways_and_half_close(chain):
    outer_client, outer_server, result, run = chain
    t = run_relay_in_thread(run)
    upload = os.urandom(3 << 20)
    download = os.urandom(5 << 20)

    def server():
        got = recv_all(outer_server)  # ends when the client half-closes
        assert hashlib.sha256(got).digest() == hashlib.sha256(upload).digest()
        outer_server.sendall(download)
        outer_server.shutdown(socket.SHUT_WR)

    st = threading.Thread(target=server)
    st.start()
    outer_client.sendall(upload)
    outer_client.shutdown(socket.SHUT_WR)  # the client still receives the whole reply
    got = recv_all(outer_client)
    st.join(10)
    t.join(10)
    assert got == download
    r = result["r"]
    assert (r.outcome, r.sent, r.received) == (outcome.OK, len(upload), len(download))


def test_reset_is_passed_on(chain):
    outer_client, outer_server, result, run = chain
    t = run_relay_in_thread(run)
    outer_client.sendall(b"x")
    assert outer_server.recv(1) == b"x"
    outer_server.sendall(b"partial")
    assert outer_client.recv(7) == b"partial"
    close_with_reset(outer_server)
    with pytest.raises(ConnectionResetError):
        while outer_client.recv(100):
            pass
    t.join(5)
    assert result["r"].outcome == outcome.RESET


def test_idle_timeout(chain):
    outer_client, outer_server, result, run = chain
    result["idle"] = 0.3
    t = run_relay_in_thread(run)
    outer_client.sendall(b"ping")
    assert outer_server.recv(4) == b"ping"
    t.join(5)
    assert result["r"].outcome == outcome.IDLE_TIMEOUT
    with pytest.raises(ConnectionResetError):
        outer_client.recv(1)


def test_half_close_timeout(chain):
    outer_client, outer_server, result, run = chain
    result["hc"] = 0.3
    t = run_relay_in_thread(run)
    outer_client.shutdown(socket.SHUT_WR)
    assert outer_server.recv(1) == b""
    t.join(5)
    assert not t.is_alive()
    assert result["r"].outcome == outcome.IDLE_TIMEOUT
    assert "half-closed" in result["r"].detail


def test_many_relays_in_one_hub():
    """Several connections share the worker's buffer without mixing bytes."""
    pairs = []
    for _ in range(20):
        oc, cs = tcp_pair()
        us, os_ = tcp_pair()
        pairs.append((oc, cs, us, os_))

    def hub_main():
        gevent.joinall([gevent.spawn(relay, cs, us) for _, cs, us, _ in pairs])

    t = threading.Thread(target=hub_main, daemon=True)
    t.start()
    payloads = [os.urandom(200_000 + i) for i in range(len(pairs))]

    def one(i):
        oc, _, _, os_ = pairs[i]
        oc.sendall(payloads[i])
        oc.shutdown(socket.SHUT_WR)
        assert recv_all(os_) == payloads[i]
        os_.close()
        assert recv_all(oc) == b""

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(pairs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(20)
    t.join(10)
    assert not t.is_alive()
    for p in pairs:
        for s in p:
            s.close()


def _relay_set_lab(n):
    """n relayed chains driven by one InFlight registry in a thread's hub; the test holds the outer ends."""
    chains = [(tcp_pair(), tcp_pair()) for _ in range(n)]
    done = []
    state = {"looked": threading.Event()}

    def hub_main():
        rs = InFlight(lambda r: done.append(r.result), Counters())

        def handler(cs, us):
            rs.start(Relay(cs, us))
            rs.stand_in()

        greenlets = [gevent.spawn(handler, cs, us) for (_, cs), (us, _) in chains]
        state["keepers"] = greenlets
        gevent.sleep(0.2)
        state["started"] = [g.dead for g in greenlets]
        state["looked"].set()
        if state.get("kill"):
            gevent.killall(greenlets)
        gevent.joinall(greenlets, timeout=10)
        state["all_dead"] = all(g.dead for g in greenlets)

    return chains, done, state, hub_main


def test_relay_set_keeps_one_greenlet_until_the_last_relay_ends():
    """Only the first handler parks (the others return at once); it returns when all relays end."""
    chains, done, state, hub_main = _relay_set_lab(3)
    t = threading.Thread(target=hub_main, daemon=True)
    t.start()
    for (oc, _), (_, os_) in chains:
        oc.sendall(b"ping")
        assert os_.recv(4) == b"ping"
    assert state["looked"].wait(10)
    for (oc, _), (_, os_) in chains:
        oc.close()
        os_.close()
    t.join(15)
    assert state["started"] == [False, True, True]
    assert state["all_dead"]
    assert [r.outcome for r in done] == [outcome.OK] * 3


def test_killing_the_keeper_resets_every_relay():
    """The runtime's graceful timeout kills greenlets: relays without one must still be reset."""
    chains, done, state, hub_main = _relay_set_lab(2)
    state["kill"] = True
    t = threading.Thread(target=hub_main, daemon=True)
    t.start()
    t.join(15)
    assert state["all_dead"]
    assert sorted(r.outcome for r in done) == [outcome.SHUTDOWN] * 2
    assert all("worker stopped" in r.detail for r in done)
    for (oc, _), (_, os_) in chains:
        for s in (oc, os_):
            s.settimeout(5)
            with pytest.raises(ConnectionResetError):
                s.recv(1)


def test_bulk_transfer_copies_when_no_pipe_can_be_had(chain, monkeypatch):
    """Out of descriptors, pipe2 fails: the transfer must go on by copying, not be reset."""
    from transocks.core import relay as relay_mod

    def no_pipe():
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(relay_mod, "_take_pipe", no_pipe)
    outer_client, outer_server, result, run = chain
    outer_client.settimeout(10)
    t = run_relay_in_thread(run)
    download = os.urandom(8 << 20)

    def server():
        outer_server.sendall(download)
        outer_server.shutdown(socket.SHUT_WR)

    st = threading.Thread(target=server)
    st.start()
    outer_client.shutdown(socket.SHUT_WR)
    got = recv_all(outer_client)
    st.join(10)
    t.join(10)
    assert got == download
    assert result["r"].outcome == outcome.OK


def test_early_bytes_of_both_sides_go_first_and_watchers_are_taken_over():
    """Bytes read during the handshake (the client's sniffed request, the upstream's bytes
    behind its reply) are delivered before anything else, through watchers the sockets had."""
    outer_client, client_side = tcp_pair()
    upstream_side, outer_server = tcp_pair()
    result = {}

    def run():
        from gevent.hub import get_hub

        loop = get_hub().loop
        for s in (client_side, upstream_side):
            s.setblocking(False)
        watchers = (loop.io(client_side.fileno(), 2), loop.io(upstream_side.fileno(), 1))
        r = Relay(client_side, upstream_side, 0.0, 60.0, b"GET / ", b"220 hello\r\n", watchers)
        result["r"] = r.run()

    t = run_relay_in_thread(run)
    outer_server.sendall(b"more from the server")
    outer_client.sendall(b"HTTP/1.1")
    outer_client.shutdown(socket.SHUT_WR)
    outer_server.shutdown(socket.SHUT_WR)
    assert recv_all(outer_client) == b"220 hello\r\nmore from the server"
    assert recv_all(outer_server) == b"GET / HTTP/1.1"
    t.join(10)
    assert result["r"].outcome == outcome.OK
    for s in (outer_client, outer_server, client_side, upstream_side):
        s.close()
