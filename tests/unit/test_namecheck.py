"""The name check both daemons trust: union over the window, shared lookups, timeouts, bounds."""

from __future__ import annotations

import socket

import gevent
import pytest

from transocks.core import namecheck
from transocks.core.namecheck import NameCheck, Verification


class Answers:
    """A resolver whose answers the test sets, counting lookups; `delay` makes it slow."""

    def __init__(self, **records: list[str]) -> None:
        self.records = {k.replace("_", "."): v for k, v in records.items()}
        self.calls = 0
        self.delay = 0.0

    def __call__(self, name: str) -> list[str]:
        self.calls += 1
        if self.delay:
            gevent.sleep(self.delay)
        if name not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.records[name])


def test_a_name_is_verified_only_for_its_own_addresses():
    dns = Answers(www_example=["198.51.100.7", "2001:db8::7"])
    check = NameCheck(60, 1, dns)
    assert check.check("www.example", "198.51.100.7") is Verification.VERIFIED
    assert check.check("WWW.example", "2001:db8::7") is Verification.VERIFIED  # names are case-blind
    assert check.check("www.example", "198.51.100.8") is Verification.UNVERIFIED
    assert check.check("nowhere.example", "198.51.100.7") is Verification.UNVERIFIED
    assert dns.calls == 2  # one lookup per name; the miss right after it asks again no sooner than RETRY_MISS


def test_ipv4_mapped_spellings_are_one_address():
    check = NameCheck(60, 1, Answers(www_example=["::ffff:198.51.100.7"]))
    assert check.check("www.example", "198.51.100.7") is Verification.VERIFIED
    assert check.check("www.example", "::ffff:198.51.100.7") is Verification.VERIFIED


def test_round_robin_answers_are_kept_as_a_union(monkeypatch):
    """A name answering {A}, then {B}: both stay verified within the window, so the check does not flap."""
    monkeypatch.setattr(namecheck, "RETRY_MISS", 0.0)
    dns = Answers(cdn_example=["203.0.113.1"])
    check = NameCheck(60, 1, dns)
    assert check.check("cdn.example", "203.0.113.1") is Verification.VERIFIED
    dns.records["cdn.example"] = ["203.0.113.2"]
    assert check.check("cdn.example", "203.0.113.2") is Verification.VERIFIED  # a miss looks again
    assert check.check("cdn.example", "203.0.113.1") is Verification.VERIFIED  # and keeps what it saw
    assert dns.calls == 2


def test_addresses_leave_the_union_after_the_window(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(namecheck.time, "monotonic", lambda: clock[0])
    dns = Answers(cdn_example=["203.0.113.1"])
    check = NameCheck(60, 1, dns)
    assert check.check("cdn.example", "203.0.113.1") is Verification.VERIFIED
    dns.records["cdn.example"] = ["203.0.113.2"]
    clock[0] += 61
    assert check.check("cdn.example", "203.0.113.1") is Verification.UNVERIFIED
    assert check.check("cdn.example", "203.0.113.2") is Verification.VERIFIED


def test_concurrent_checks_share_one_lookup():
    dns = Answers(www_example=["198.51.100.7"])
    dns.delay = 0.1
    check = NameCheck(60, 1, dns)
    jobs = [gevent.spawn(check.check, "www.example", "198.51.100.7") for _ in range(50)]
    gevent.joinall(jobs, timeout=5)
    assert [j.value for j in jobs] == [Verification.VERIFIED] * 50
    assert dns.calls == 1


def test_a_slow_lookup_is_unverified_then_serves_the_next_connection():
    dns = Answers(slow_example=["198.51.100.7"])
    dns.delay = 0.3
    check = NameCheck(60, 0.05, dns)
    assert check.check("slow.example", "198.51.100.7") is Verification.UNVERIFIED  # gave up after 50 ms
    gevent.sleep(0.4)  # the lookup went on
    assert check.cached("slow.example", "198.51.100.7") is Verification.VERIFIED
    assert dns.calls == 1


def test_the_table_is_bounded():
    dns = Answers(**{f"n{i}_example": ["198.51.100.7"] for i in range(20)})
    check = NameCheck(60, 1, dns, capacity=5)
    for i in range(20):
        check.check(f"n{i}.example", "198.51.100.7")
    assert len(check._names) == 5
    assert check.cached("n19.example", "198.51.100.7") is Verification.VERIFIED
    assert check.cached("n0.example", "198.51.100.7") is None  # forgotten, would be looked up again


@pytest.mark.parametrize("failure", [socket.gaierror(socket.EAI_AGAIN, "Temporary failure"), UnicodeError("label")])
def test_a_failing_resolver_is_unverified_not_an_error(failure):
    def broken(name: str) -> list[str]:
        raise failure

    check = NameCheck(60, 1, broken)
    assert check.check("www.example", "198.51.100.7") is Verification.UNVERIFIED
