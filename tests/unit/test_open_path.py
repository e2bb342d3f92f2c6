"""Issue 20's open-path levers: what a new connection's dial and accept no longer do.

Each test counts the calls a lever removes (syscalls through a socket subclass,
handshake objects), so none depends on timing.
"""

from __future__ import annotations

import socket

import gevent
import gevent.event
import pytest
from gevent import socket as gsocket
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_dial import handler_for, silent_member, wait_until  # noqa: F401 (silent_member: a fixture)
from tests.unit.test_relay import tcp_pair
from tests.unit.test_wire_properties import SOCKS_PIECES, run_handshake, split
from transocks.core import logs, nio
from transocks.core.config import AUTO
from transocks.core.netutil import DEFAULT_USER_TIMEOUT, Endpoint, configure_user_timeout, set_keepalive
from transocks.redirector import handler as handler_mod
from transocks.redirector.flow import Flow
from transocks.redirector.upstream import ProxyURL, make_dialer
from transocks.redirector.upstream.dial import Dial
from transocks.redirector.upstream.socks5 import PipelinedConnect


class CountingSocket(socket.socket):
    """A real socket that records the options it is asked for and given."""

    calls: list[tuple] = []

    def getsockopt(self, *args):  # type: ignore[override]
        CountingSocket.calls.append(("get", *args[:2]))
        return super().getsockopt(*args)

    def setsockopt(self, *args):  # type: ignore[override]
        CountingSocket.calls.append(("set", *args[:2]))
        return super().setsockopt(*args)


@pytest.fixture
def counted(monkeypatch):
    CountingSocket.calls = []
    monkeypatch.setattr(nio, "new_socket", lambda family: CountingSocket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK))
    return CountingSocket.calls


def socks5_member(replies: bytes, pipelined: bool = False):
    """A SOCKS5 server on 127.0.0.1 that answers one connection with `replies` (after the
    greeting, and after the request unless `pipelined`) and records what it got."""
    lsock = gsocket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    got: list[bytes] = []

    def serve():
        conn, _ = lsock.accept()
        got.append(conn.recv(4096))
        if not pipelined:
            conn.sendall(replies[:2])
            got.append(conn.recv(4096))
            conn.sendall(replies[2:])
        else:
            conn.sendall(replies)
        gevent.sleep(0.5)
        conn.close()

    g = gevent.spawn(serve)
    return lsock, got, g


OK_REPLY = b"\x05\x00" + b"\x05\x00\x00\x01" + bytes([192, 0, 2, 1]) + b"\x04\x38"
DEST = Endpoint("203.0.113.10", 80)
WIRE = b"\x01" + bytes([203, 0, 113, 10]) + b"\x00\x50"


def test_the_first_send_proves_the_connect_without_so_error(counted):
    lsock, got, g = socks5_member(OK_REPLY)
    d = make_dialer(ProxyURL("socks5", "127.0.0.1", lsock.getsockname()[1]), 5, 5)
    stream = d.dial(DEST, WIRE)
    stream.close()
    lsock.close()
    g.kill()
    assert got[1] == b"\x05\x01\x00" + WIRE
    assert ("get", socket.SOL_SOCKET, socket.SO_ERROR) not in counted


def test_a_refusal_shown_by_the_first_send_moves_on_to_the_next_address(counted):
    lsock, got, g = socks5_member(OK_REPLY)
    port = lsock.getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: the connect is refused
    d = make_dialer(ProxyURL("socks5", "127.0.0.1", port), 5, 5)
    done = gevent.event.AsyncResult()
    dial = Dial(d, [(socket.AF_INET, ("127.0.0.1", refused_port)), (socket.AF_INET, ("127.0.0.1", port))],
                d.handshake(DEST, WIRE), done.set)
    dial.start()
    assert done.get(timeout=5) is dial and dial.error is None
    assert dial.addr == ("127.0.0.1", port)
    dial.stream().close()
    lsock.close()
    g.kill()
    assert ("get", socket.SOL_SOCKET, socket.SO_ERROR) not in counted


def test_a_dial_with_nothing_to_send_still_checks_its_connect(counted):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()
    d = make_dialer(ProxyURL("direct", "", 0), 5, 5)
    with pytest.raises(Exception) as exc:
        d.dial(Endpoint("127.0.0.1", refused_port))
    assert "refused" in str(exc.value)


def test_an_upstream_socket_gets_keepalive_without_the_count_a_user_timeout_overrides(counted):
    """Lever d: accepted sockets inherit every option from the listener (test_listeners);
    an upstream socket gets keepalive and the user timeout, and TCP_KEEPCNT only when no
    user timeout makes the kernel ignore it."""
    try:
        for seconds, count_set in ((DEFAULT_USER_TIMEOUT, False), (0.0, True)):
            configure_user_timeout(seconds)
            CountingSocket.calls.clear()
            with nio.new_socket(socket.AF_INET) as s:
                set_keepalive(s)
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 15
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == int(seconds * 1000)
                assert (("set", socket.IPPROTO_TCP, socket.TCP_KEEPCNT) in counted) is count_set
                assert len([c for c in counted if c[0] == "set"]) == 4
    finally:
        configure_user_timeout(DEFAULT_USER_TIMEOUT)


# --- lever a: a member that pipelines gets one pre-built message and an inline reply check ---

def test_a_member_that_pipelines_gets_one_message_and_no_generator():
    lsock, got, g = socks5_member(b"\x05\x8a" + OK_REPLY[2:] + b"server-first", pipelined=True)
    d = make_dialer(ProxyURL("socks5", "127.0.0.1", lsock.getsockname()[1]), 5, 5, socks5_pipelining=AUTO)
    d.pipelines = True  # as after a first handshake in which the member chose PIPELINED
    h = d.handshake(DEST, WIRE)
    assert isinstance(h, PipelinedConnect)
    done = gevent.event.AsyncResult()
    dial = Dial(d, d.target_addrs(None), h, done.set)
    dial.start()
    assert done.get(timeout=5) is dial and dial.error is None
    stream = dial.stream()
    assert stream.extra == b"server-first"
    stream.close()
    lsock.close()
    g.kill()
    assert got == [b"\x05\x03\x00\x8a\x8b" + b"\x05\x01\x00" + WIRE]  # greeting and request in one send
    assert h.slow is None  # the replies were checked inline
    assert d.pipelines and not d.names


def pipelined_dialer(pipelining):
    d = make_dialer(ProxyURL("socks5", "127.0.0.1", 1080), 1, 1, socks5_pipelining=pipelining)
    d.pipelines = True
    return d


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([AUTO, True]),
       st.one_of(SOCKS_PIECES, st.sampled_from([b"\x05\x8a" + OK_REPLY[2:], b"\x05\x03" + OK_REPLY[2:],
                                                b"\x05\x00" + OK_REPLY[2:] + b"tail", b"\x05\x8a\x05\x00\x00\x04" + bytes(18),
                                                b"\x05\x8a\x05\x00\x00\x03\x03abc\x00\x50"])),
       st.lists(st.integers(0, 10**6), max_size=6), st.sampled_from(["sni.example", "203.0.113.5"]))
def test_the_inline_check_ends_as_the_generator_does(pipelining, data, cuts, host):
    """Whatever a member answers, in any chunking: the pre-built exchange sends the same
    message, ends the same way (tunnel bytes, or a failure of the same type and text) and
    leaves the dialer knowing the same as the generator handshake it stands in for."""
    ends_as_the_generator(pipelined_dialer(pipelining), pipelined_dialer(pipelining), host, split(data, cuts), True)


def ends_as_the_generator(fast_d, slow_d, host: str, chunks: list[bytes], pipelined: bool) -> None:
    """fast_d's inline exchange and slow_d's generator handshake, given the same chunks:
    the same messages, the same end, the same learnt state."""
    dest = Endpoint(host, 443)
    fast = fast_d.handshake(dest)
    assert isinstance(fast, PipelinedConnect)
    a = run_handshake(fast, chunks)
    b = run_handshake(slow_d._handshake(dest, None, None, pipelined), chunks)
    assert a[0] == b[0] and a[2] == b[2]
    if a[0] == "open":
        assert a[1] == b[1]
    else:
        assert type(a[1]) is type(b[1]) and str(a[1]) == str(b[1])
    assert (fast_d.pipelines, fast_d.names) == (slow_d.pipelines, slow_d.names)


# --- lever c: the dial's watcher goes to the relay without libev re-adding its fd ---


class RecordingWatcher:
    """An io watcher that counts how often its events are set (each set makes libev
    re-register the fd at the next loop turn: an epoll_ctl ADD that fails with EEXIST
    when the fd is still registered)."""

    def __init__(self, w):
        self.__dict__["w"] = w
        self.__dict__["sets"] = 0

    @property
    def events(self):
        return self.w.events

    @events.setter
    def events(self, value):
        self.__dict__["sets"] += 1
        self.w.events = value

    def __getattr__(self, name):
        return getattr(self.w, name)


def test_a_watcher_handed_over_waiting_to_read_is_not_set_again():
    from gevent.hub import get_hub

    from transocks.core.relay import Relay

    a, b = tcp_pair()
    c, d = tcp_pair()
    loop = get_hub().loop
    w = loop.io(d.fileno(), nio.READ)
    w.start(lambda: None)  # as the dial's watcher waited for the CONNECT reply
    w.stop()
    rec = RecordingWatcher(w)
    r = Relay(b, d, watchers=(None, rec))
    ended = gevent.event.AsyncResult()
    r.start(ended.set)
    a.sendall(b"x")
    got = b""
    for _ in range(500):  # the relay runs in this thread's hub: wait cooperatively
        gevent.sleep(0.01)
        try:
            got = c.recv(1, socket.MSG_DONTWAIT)
            break
        except BlockingIOError:
            continue
    assert got == b"x"
    assert rec.sets == 0
    r.abort("test")
    for s in (a, b, c, d):
        s.close()


# --- lever f: the access-log line from one format string ---


def _handler_and_pool():
    from transocks.redirector.exits.member import HealthPolicy
    from transocks.redirector.exits.registry import DialSettings, Exits
    from transocks.redirector.handler import LoopGuard, TransparentHandler
    from transocks.redirector.route import Router
    from transocks.redirector.upstream import parse_proxy_url

    exits = Exits(DialSettings(5, 5), HealthPolicy(2, 3))
    pool = exits.pool("default", [parse_proxy_url("socks5://user@192.0.2.1:1080")])
    return TransparentHandler(Router([], pool), LoopGuard([Endpoint("127.0.0.1", 1081)]), 0.0, 5.0), pool


TEXT = st.text(st.characters(codec="utf-8"), max_size=30)


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.none(), TEXT), st.one_of(st.none(), TEXT), TEXT, st.integers(0, 3),
       st.sampled_from([Endpoint("192.0.2.2", 41234), Endpoint("2001:db8::2", 5)]), st.booleans())
def test_the_rendered_line_is_the_dict_line(tmp_path_factory, name, claimed, reason, tries, peer, opened):
    """The logfmt line the handler renders itself is, past its timestamp, the line the
    dict of the same connection gives (what JSON and tests' sinks get)."""
    h, pool = _handler_and_pool()
    conn = Flow(Endpoint("203.0.113.10", 443), peer)
    conn.name, conn.claimed, conn.tries = name or None, claimed or name or None, tries
    if opened:
        conn.pool, conn.member = pool, pool.members[0]
    path = tmp_path_factory.mktemp("log") / "access.log"
    logs.setup("transocks", "-", "info", str(path), "logfmt")
    elapsed = handler_mod._elapsed
    handler_mod._elapsed = lambda started: "0.500"  # both lines say the same duration
    try:
        assert logs.rendered()
        h._log(7, conn, 0.0, "ok", reason, 3, 4)
        logs.flush()
        rendered = path.read_text()
        got: list[dict] = []
        logs.capture_access(got.append)
        try:
            h._log(7, conn, 0.0, "ok", reason, 3, 4)
        finally:
            logs.capture_access(None)
    finally:
        handler_mod._elapsed = elapsed
        logs.setup("transocks", "-", "info", "off")
    (fields,) = got
    assert rendered.startswith("time=") and rendered.count("\n") == 1
    assert rendered.rstrip("\n").split(" ", 1)[1] == " ".join(f"{k}={logs.logfmt_value(v)}" for k, v in fields.items())


# --- lever g: start-up objects frozen, young objects collected less often ---


def test_a_worker_freezes_its_start_up_objects_and_collects_young_ones_less_often():
    import gc

    from transocks.runtime import worker

    threshold = gc.get_threshold()
    try:
        worker.tune_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (worker.GC_GEN0, *threshold[1:]) and worker.GC_GEN0 > 700
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


# --- lever e: no greenlet for a connection that waits for nothing ---


def test_a_connection_that_waits_for_nothing_is_served_inline(silent_member):
    """The accept callback routes and starts the dial itself and asks for no greenlet:
    the dials and relays run in callbacks, seen by the worker through the registry."""
    h = handler_for(silent_member)
    pairs = [tcp_pair() for _ in range(3)]
    for outer, inner in pairs:
        inner.setblocking(False)
    assert [h.inline(inner, outer.getsockname()) for outer, inner in pairs] == [None, None, None]
    assert len(h._in_flight.dials) == 3 and h.counters.active == 3
    assert h._in_flight.abort("worker stopped") == 3
    wait_until(lambda: h.counters.active == 0)
    for outer, _ in pairs:
        outer.close()


def test_a_sniffed_port_leaves_its_read_to_a_greenlet(silent_member):
    from transocks.redirector.sniff import Sniffer

    h = handler_for(silent_member)
    h.sniffer = Sniffer(frozenset({443}), 1.0)
    h.sniff_ports = h.sniffer.ports
    outer, inner = tcp_pair()
    inner.setblocking(False)
    rest = h.inline(inner, outer.getsockname())
    assert rest is not None and not h._in_flight.dials  # nothing read or dialed yet
    outer.close()
    rest()  # the client is gone: its sniff read finds nothing, and the connection ends
    wait_until(lambda: h.counters.active == 0, 10)
