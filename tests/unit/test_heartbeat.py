"""The heartbeat's member changes: any size arrives in datagrams the master can take, and what the
socket could not take goes with a later beat; the master's reading survives any bytes."""

from __future__ import annotations

import os
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from transocks.runtime import heartbeat
from transocks.runtime import worker as worker_mod


def member(i: int, dials: int = 0, up: bool = True, error: str = "") -> dict:
    return {"pool": "default", "member": f"socks5://[2001:db8:5000::{i:x}]:1080", "up": up, "active": 0,
            "dials": dials, "failures": 0, "last_error": error}


def deliver(deltas: heartbeat.MemberDeltas, master: dict, report: list[dict], room: int | None = None) -> int:
    """Send what the worker would (at most `room` datagrams: the socket's queue); returns how many went."""
    n = 0
    for datagram, changes in deltas.pending(report):
        if room is not None and n >= room:
            break
        assert len(datagram) <= heartbeat.MAX_DATAGRAM
        assert datagram.startswith(heartbeat.MEMBERS)
        assert heartbeat.apply(master, datagram[len(heartbeat.MEMBERS):])
        deltas.sent(changes)
        n += 1
    return n


def view(report: list[dict]) -> dict:
    return {(m["pool"], m["member"]): m for m in report}


def test_five_thousand_members_arrive_whole_in_small_datagrams():
    report = [member(i, error="x" * (i % 200)) for i in range(5000)]
    deltas, master = heartbeat.MemberDeltas(), {}
    beats = 0
    while deliver(deltas, master, report, room=6):  # what an AF_UNIX queue holds before EAGAIN
        beats += 1
    assert master == view(report)
    assert 2 <= beats <= 10
    report[17]["dials"] = 3
    del report[4000:]
    assert deliver(deltas, master, report) == 2  # one change and a thousand removals: 45 KB
    assert master == view(report)
    assert deliver(deltas, master, report) == 0  # nothing changed: nothing sent


reports = st.lists(
    st.lists(st.tuples(st.integers(0, 300), st.integers(0, 3), st.booleans(), st.text(max_size=300)),
             max_size=400).map(lambda ms: [member(i, d, u, e) for i, d, u, e in ms]),
    min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(reports, st.lists(st.integers(0, 3), min_size=6, max_size=6))
def test_any_reports_with_full_queues_converge(sequence, rooms):
    deltas, master = heartbeat.MemberDeltas(), {}
    for report, room in zip(sequence, rooms):
        report = list(view(report).values())  # one entry per member, as a worker reports
        deliver(deltas, master, report, room=room)
    deliver(deltas, master, report)
    assert master == view(report)


@given(st.binary(max_size=2000))
def test_any_bytes_leave_the_master_standing(payload):
    members: dict = {}
    heartbeat.apply(members, payload)
    for m in members.values():
        assert set(m) == {"pool", "member", *heartbeat.FIELDS}


class _Cfg:
    max_connections = 10


def _worker(ctrl):
    w = worker_mod.Worker(None, _Cfg(), 1, 1, 1, [], ctrl, os.getppid())
    gone = []
    w._master_gone = lambda: gone.append(True)
    return w, gone


def test_a_heartbeat_the_socket_refuses_is_not_the_master_gone():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    w, gone = _worker(ours)
    assert not w._send(b"x" * (1 << 20))  # EMSGSIZE: the master is still there
    while w._send(b"x" * 30000):  # until the master's queue is full: EAGAIN
        pass
    assert not gone
    theirs.close()
    w._send(b"hb 0 0")
    assert gone  # its end closed: gone
    ours.close()
