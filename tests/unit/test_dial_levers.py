"""Issue 20's dial levers (perf-dial): what a new connection's dial no longer does.

Each test counts or compares what a lever changes (handshake objects, syscalls through a
socket subclass), so none depends on timing.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_wire_properties import SOCKS_PIECES, run_handshake, split
from transocks.core.config import AUTO
from transocks.core.netutil import Endpoint
from transocks.redirector.upstream import ProxyURL, make_dialer
from transocks.redirector.upstream.socks5 import InlineConnect, Stage

OK_REPLY = b"\x05\x00\x00\x01" + bytes([192, 0, 2, 1]) + b"\x04\x38"


def two_step_dialer(pipelining):
    return make_dialer(ProxyURL("socks5", "127.0.0.1", 1080), 1, 1, socks5_pipelining=pipelining)


def test_a_member_that_does_not_pipeline_gets_the_inline_check_too():
    """dante's way (greeting, method reply, request, reply) runs without a generator."""
    d = two_step_dialer(AUTO)
    h = d.handshake(Endpoint("203.0.113.10", 80), b"\x01" + bytes([203, 0, 113, 10]) + b"\x00\x50")
    assert isinstance(h, InlineConnect) and h.stage is Stage.METHOD
    ending, tail, sent = run_handshake(h, [b"\x05\x00", OK_REPLY + b"first"])
    assert (ending, tail) == ("open", b"first")
    assert sent == [b"\x05\x03\x00\x8a\x8b", b"\x05\x01\x00\x01\xcb\x00q\n\x00P"]
    assert h.slow is None  # both replies were checked inline
    assert not d.pipelines and not d.names


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([AUTO, False]),
       st.one_of(SOCKS_PIECES, st.sampled_from([b"\x05\x00" + OK_REPLY, b"\x05\x8a" + OK_REPLY, b"\x05\x8b" + OK_REPLY,
                                                b"\x05\x00" + OK_REPLY + b"tail", b"\x05\x00\x05\x05\x00\x01" + bytes(6),
                                                b"\x05\x00\x05\x00\x00\x04" + bytes(18), b"\x05\x02" + OK_REPLY,
                                                b"\x05\x00\x05\x00\x00\x03\x03abc\x00\x50"])),
       st.lists(st.integers(0, 10**6), max_size=6), st.sampled_from(["sni.example", "203.0.113.5"]))
def test_the_two_step_inline_check_ends_as_the_generator_does(pipelining, data, cuts, host):
    """Whatever a member that is not pipelined to answers, in any chunking: the inline
    handshake sends the same messages, ends the same way (tunnel bytes, or a failure of
    the same type and text) and leaves the dialer knowing the same as the generator."""
    dest = Endpoint(host, 443)
    chunks = split(data, cuts)
    fast_d, slow_d = two_step_dialer(pipelining), two_step_dialer(pipelining)
    fast = fast_d.handshake(dest)
    assert isinstance(fast, InlineConnect)
    a = run_handshake(fast, chunks)
    b = run_handshake(slow_d._handshake(dest, None, None, False), chunks)
    assert a[0] == b[0] and a[2] == b[2]
    if a[0] == "open":
        assert a[1] == b[1]
    else:
        assert type(a[1]) is type(b[1]) and str(a[1]) == str(b[1])
    assert (fast_d.pipelines, fast_d.names) == (slow_d.pipelines, slow_d.names)

