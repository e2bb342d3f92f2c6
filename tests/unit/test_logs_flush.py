"""The access log's flush: a lone line goes out as it is, a short write is completed."""

from __future__ import annotations

import os

import gevent
import pytest

from transocks.core import logs


@pytest.fixture
def access_file(tmp_path):
    path = tmp_path / "access.log"
    yield path
    logs.setup("test", "-", "info", "off")


def test_short_writes_are_completed_in_order(access_file, monkeypatch):
    """The kernel may take part of a write (a pipe, a signal): the rest follows, nothing twice."""
    logs.setup("test", "-", "info", str(access_file))
    real_write = os.write
    monkeypatch.setattr(logs.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))

    def lines(first, n):
        for i in range(first, first + n):
            logs.access({"n": i, "pad": "x" * i})
        gevent.sleep(0)

    gevent.spawn(lines, 0, 1).join()  # a lone line
    gevent.spawn(lines, 1, 30).join()
    got = access_file.read_text().splitlines()
    assert [int(line.split("n=")[1].split()[0]) for line in got] == list(range(31))
    assert all(line.endswith(f"pad={'x' * i}" if i else 'pad=""') for i, line in enumerate(got))
