"""`transocks demo` as a user runs it: a subprocess as root, to the end, interrupted, and killed.

What a run made is learnt from its own output (the prefix, the work directory,
the pids) and from the machine while it runs (every process whose working
directory is the work directory: the demo starts all of them there, and their
workers inherit it).  Afterwards none of it may remain: no namespace or
/etc/netns entry with the prefix, no work directory, no such process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from transocks import demo
from transocks.demo import tour

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 180.0


class DemoRun:
    """One `python -m transocks demo` with its output read line by line as it comes."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "transocks", "demo", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=env,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.procs: dict[int, float] = {}  # pid -> create_time of every process seen in the work dir

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float = RUN_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines:
                    m = re.search(pattern, line)
                    if m:
                        return m
                if not self.reader.is_alive() or time.monotonic() > deadline:
                    raise AssertionError(f"no line matching {pattern!r}; output:\n{self.text}")
                self.changed.wait(0.5)

    def wait(self) -> int:
        try:
            rc = self.proc.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"demo still running after {RUN_TIMEOUT}s:\n{self.text}") from None
        self.reader.join(10)
        return rc

    @property
    def prefix(self) -> str:
        return self.wait_line(r"prefix (tsdemo[0-9a-f]+)").group(1)

    @property
    def workdir(self) -> str:
        return self.wait_line(r"work dir +(/\S+)").group(1)

    def note_processes(self) -> None:
        """Record every process now running in the work directory (the daemons, their workers)."""
        workdir = self.workdir
        for p in psutil.process_iter(["cwd", "create_time"]):
            if (p.info["cwd"] or "").startswith(workdir):
                self.procs[p.pid] = p.info["create_time"]

    def assert_nothing_left(self) -> None:
        prefix, workdir = self.prefix, self.workdir
        started = {int(pid) for pid in re.findall(r"\(pid (\d+)\)", self.text)}
        assert started, self.text
        assert not [n for n in os.listdir("/run/netns") if n.startswith(prefix + "-")] \
            if os.path.isdir("/run/netns") else True
        assert not list(Path("/etc/netns").glob(f"{prefix}-*"))
        assert not list(Path(tempfile.gettempdir()).glob(f"{prefix}-*")) and not os.path.exists(workdir)
        assert not Path("/run/transocks-demo", prefix).exists()
        alive = []
        for p in psutil.process_iter(["cwd", "create_time", "status"]):
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            seen = self.procs.get(p.pid)
            if (p.info["cwd"] or "").startswith(workdir) or seen == p.info["create_time"] \
                    or (seen is None and p.pid in started):
                alive.append((p.pid, p.info["cwd"]))
        assert not alive, f"left running: {alive}\n{self.text}"


@pytest.mark.netns
def test_demo_runs_every_step_and_leaves_nothing() -> None:
    run = DemoRun()
    run.wait_line(r"^Step 1/3")
    run.note_processes()
    rc = run.wait()
    out = run.text
    assert rc == 0, out
    first = re.search(r"^  ok: served, through (edge \d)$", out, re.M)
    refused = re.search(r"^  ok: refused by name at the edge, the web server saw nothing$", out, re.M)
    stopped = re.search(r"^Step 3/3: (edge \d) stops, traffic goes on through (edge \d)$", out, re.M)
    last = re.findall(r"^  ok: served, through (edge \d)$", out, re.M)
    assert first and refused and stopped and len(last) == 2, out
    assert stopped.group(1) == first.group(1) and last[1] == stopped.group(2) != first.group(1), out
    # Each step shows the new access-log lines of transocks and of the edges.
    for step in re.split(r"^Step \d/3", out, flags=re.M)[1:]:
        assert re.search(r"transocks: +time=", step) and re.search(r"edge \d: +time=", step), step
    assert "All 3 steps succeeded." in out
    assert "removed everything it made" in out
    run.assert_nothing_left()


@pytest.mark.netns
@pytest.mark.parametrize("sig, after", [
    (signal.SIGINT, r"^  ok: served, through edge \d$"),  # Ctrl-C once the first step has shown its result
    (signal.SIGTERM, r"started +edge 1:"),                 # during the set-up, half of the chain running
], ids=["SIGINT-after-step-1", "SIGTERM-during-setup"])
def test_interrupted_demo_leaves_nothing(sig: int, after: str) -> None:
    run = DemoRun("--pause", "10")  # steps 2 and 3 took 50 ms: the signal came after the last
    run.wait_line(after)
    run.note_processes()
    os.kill(run.proc.pid, sig)
    rc = run.wait()
    assert rc == 128 + sig, run.text
    assert "interrupted" in run.text and "removed everything it made" in run.text, run.text
    assert "All 3 steps succeeded." not in run.text
    run.assert_nothing_left()


@pytest.mark.netns
def test_next_demo_removes_what_a_killed_one_left() -> None:
    """SIGKILL cannot be caught: the next run finds the dead run's marker and removes its leftovers."""
    killed = DemoRun()
    killed.wait_line(r"started +transocks")
    killed.note_processes()
    os.kill(killed.proc.pid, signal.SIGKILL)
    killed.wait()
    assert any(psutil.pid_exists(pid) for pid in killed.procs), "nothing left behind to test the reaping with"
    run = DemoRun()
    run.wait_line(r"^Step 1/3")
    run.note_processes()
    assert run.wait() == 0, run.text
    assert f"removed what an earlier, killed demo left ({killed.prefix}-*)" in run.text
    killed.assert_nothing_left()
    run.assert_nothing_left()


def test_demo_needs_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demo.os, "geteuid", lambda: 1000)
    assert demo.demo_command([]) == 2
    err = capsys.readouterr().err
    assert "transocks demo: needs root" in err and "Traceback" not in err


@pytest.mark.netns
def test_failed_step_exits_1_and_leaves_nothing(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A step that does not show what it should ends the demo with 1, after the same teardown."""
    def fail(self: tour.Tour) -> None:
        raise tour.StepFailed("the refusal was not shown (forced by the test)")

    monkeypatch.setattr(tour.Tour, "step_denied", fail)
    assert demo.demo_command([]) == 1
    out = capsys.readouterr().out
    assert "FAILED: the refusal was not shown" in out and "removed everything it made" in out, out
    assert "All 3 steps succeeded." not in out
    prefix = re.search(r"prefix (tsdemo[0-9a-f]+)", out).group(1)
    workdir = re.search(r"work dir +(/\S+)", out).group(1)
    assert not [n for n in os.listdir("/run/netns") if n.startswith(prefix + "-")]
    assert not list(Path("/etc/netns").glob(f"{prefix}-*")) and not os.path.exists(workdir)
    for pid in map(int, re.findall(r"\(pid (\d+)\)", out)):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
