"""The buffered access log: same lines as before, nothing lost at a flush, reopen or exit."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import gevent
import pytest
from hypothesis import given
from hypothesis import strategies as st

from transocks.core import logs


@pytest.fixture
def access_file(tmp_path):
    path = tmp_path / "access.log"
    yield path
    logs.setup("test", "-", "info", "off")


def test_logfmt_line_has_the_fields_in_order(access_file):
    logs.setup("test", "-", "info", str(access_file))
    logs.access({"id": "a.1", "client": "192.0.2.1:5", "reason": "has space", "empty": ""})
    logs.flush()
    line = access_file.read_text()
    assert re.fullmatch(r'time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z id=a\.1 client=192\.0\.2\.1:5 '
                        r'reason="has space" empty=""\n', line), line


@given(st.text())
def test_logfmt_quotes_exactly_what_would_break_the_line(value):
    """The regex quoting says the same as the per-character rule it replaced."""
    breaks = value == "" or any(c in value for c in ' ="\\') or any(ord(c) < 32 for c in value)
    shown = logs._logfmt_value(value)
    assert shown == (json.dumps(value) if breaks else value)


def test_json_line(access_file):
    logs.setup("test", "-", "info", str(access_file), "json")
    logs.access({"id": "a.2", "sent": 3})
    logs.flush()
    record = json.loads(access_file.read_text())
    assert list(record) == ["time", "id", "sent"] and record["sent"] == 3


def test_lines_of_one_loop_turn_go_out_in_one_write_and_keep_their_order(access_file, monkeypatch):
    logs.setup("test", "-", "info", str(access_file))
    writes = []
    real_write = os.write
    monkeypatch.setattr(logs.os, "write", lambda fd, data: writes.append(len(data)) or real_write(fd, data))

    def write_some():
        for i in range(100):
            logs.access({"n": i})
        assert access_file.read_text() == ""  # buffered until the loop turn ends
        gevent.sleep(0)

    gevent.spawn(write_some).join()
    assert [int(line.split("n=")[1]) for line in access_file.read_text().splitlines()] == list(range(100))
    assert len(writes) == 1


def test_reopen_writes_pending_lines_to_the_old_file_then_continues_in_a_new_one(access_file):
    logs.setup("test", "-", "info", str(access_file))
    rotated = access_file.with_suffix(".1")

    def run():
        logs.access({"n": 1})
        os.rename(access_file, rotated)
        logs.reopen()
        logs.access({"n": 2})
        logs.flush()

    gevent.spawn(run).join()
    assert rotated.read_text().count("n=1") == 1 and "n=2" not in rotated.read_text()
    assert access_file.read_text().count("n=2") == 1


def test_an_error_line_comes_after_the_access_lines_written_before_it(tmp_path):
    shared = tmp_path / "both.log"
    logs.setup("test", str(shared), "info", str(shared))
    try:
        def run():
            logs.access({"n": 1})
            logging.getLogger("transocks").warning("after the access line")
        gevent.spawn(run).join()
        lines = shared.read_text().splitlines()
        assert "n=1" in lines[0] and "after the access line" in lines[1]
    finally:
        logs.setup("test", "-", "info", "off")


def test_reopen_failure_keeps_the_old_file_and_raises(access_file):
    logs.setup("test", "-", "info", str(access_file))
    os.rename(access_file.parent, access_file.parent.with_name(access_file.parent.name + "-gone"))
    try:
        with pytest.raises(OSError):
            logs.reopen()
        logs.access({"n": 3})  # still writable: the old descriptor
        logs.flush()
    finally:
        os.rename(access_file.parent.with_name(access_file.parent.name + "-gone"), access_file.parent)
    assert "n=3" in access_file.read_text()


def test_lines_waiting_at_interpreter_exit_are_written(access_file):
    code = ("import gevent\nfrom transocks.core import logs\n"
            f"logs.setup('t', '-', 'info', {str(access_file)!r})\n"
            "def w():\n    logs.access({'n': 9})\n"
            "gevent.spawn(w).join()\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "n=9" in access_file.read_text()
