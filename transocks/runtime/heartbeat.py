"""What a worker tells its master over their datagram socketpair, and how the master reads it.

Three kinds of datagram: ``ready`` once the worker accepts; ``hb ACTIVE TOTAL``
each second (the liveness the master's worker_timeout watches, always a few
bytes); and ``members JSON``, changes to the worker's view of the upstream
members, for `status`.

Why changes, in datagrams of at most CHUNK bytes: a pool discovered through
DNS may hold thousands of members.  The whole list each second was one
datagram of ~110 bytes a member: above 64 KiB the master's receive cut it
(status showed none), above ~208 KiB (the socket's send buffer) the send
failed.  Each ``members`` datagram is a self-contained set of upserts and
removals, so the master applies them in any grouping and never reassembles;
what the socket cannot take now (EAGAIN: at most ~10 datagrams wait in an
AF_UNIX queue) is simply still different from what the master has, and goes
with the next beat.  Measured with 5,000 members of one pool: the whole
list was 626 KB a second; now the first report is 316 KB in 10 datagrams
(one or two beats), and after that a beat sends only the members whose
counters moved: 0 bytes on an idle worker, whose beat costs ~9 ms of CPU
(6 of them the pool building its report, 3 the comparison; the JSON of the
whole list cost 6.5 ms more, and as much again to decode in the master).
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Iterator
from typing import Any

READY = b"ready"
BEAT = b"hb "
MEMBERS = b"members "
MAX_DATAGRAM = 65536  # what the master receives at once; CHUNK stays well below it
CHUNK = 32768

Key = tuple[str, str]  # (pool, member)
FIELDS = ("up", "active", "dials", "failures", "last_error")
_key = operator.itemgetter("pool", "member")
_values = operator.itemgetter(*FIELDS)


def beat(active: int, total: int) -> bytes:
    return b"hb %d %d" % (active, total)


class MemberDeltas:
    """The worker's side: what the master was told, and the datagrams that bring it up to date."""

    def __init__(self) -> None:
        self.told: dict[Key, tuple] = {}

    def pending(self, report: Iterable[dict[str, Any]]) -> Iterator[tuple[bytes, list[tuple[Key, tuple | None]]]]:
        """(datagram, changes it carries): call `sent(changes)` for each datagram the socket took."""
        told = self.told
        now = {_key(m): _values(m) for m in report}
        changes: list[tuple[Key, tuple | None]] = [(k, v) for k, v in now.items() if told.get(k) != v]
        if len(told) > len(now) - len(changes):  # some were removed
            changes += [(k, None) for k in told if k not in now]
        batch: list[tuple[Key, tuple | None]] = []
        parts: list[str] = []
        size = 0
        for key, value in changes:
            item = json.dumps([*key, *value] if value is not None else [*key], separators=(",", ":"))
            if parts and size + len(item) > CHUNK:
                yield _datagram(parts), batch
                batch, parts, size = [], [], 0
            batch.append((key, value))
            parts.append(item)
            size += len(item) + 1
        if parts:
            yield _datagram(parts), batch

    def sent(self, changes: list[tuple[Key, tuple | None]]) -> None:
        for key, value in changes:
            if value is None:
                self.told.pop(key, None)
            else:
                self.told[key] = value


def _datagram(items: list[str]) -> bytes:
    return MEMBERS + ("[" + ",".join(items) + "]").encode()


def apply(members: dict[Key, dict[str, Any]], payload: bytes) -> bool:
    """The master's side: apply one ``members`` datagram's payload; False (nothing changed) if unreadable."""
    try:
        items = json.loads(payload)
    except ValueError:
        return False
    if not isinstance(items, list):
        return False
    for item in items:
        if not isinstance(item, list) or len(item) not in (2, 2 + len(FIELDS)):
            continue
        key = (str(item[0]), str(item[1]))
        if len(item) == 2:
            members.pop(key, None)
        else:
            members[key] = {"pool": key[0], "member": key[1], **dict(zip(FIELDS, item[2:]))}
    return True
