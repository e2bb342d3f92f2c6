"""`transocks doctor` in the lab's client namespace: every step holds on a working set-up,
and each broken piece makes its own step fail (exit status 1) with what to do."""

from __future__ import annotations

import pytest

from tests.lab.netns import INET_V4, TEST_PORT
from tests.lab.rulesets import transocks

pytestmark = pytest.mark.netns

TARGET = f"{INET_V4}:{TEST_PORT}"
STEPS = ["configuration", "daemon", "redirect rules", "upstream", "canary"]


def doctor(lab, *args: str) -> tuple[int, dict[str, str]]:
    res = transocks(lab, lab.client, "doctor", *args, check=False)
    lines = res.stdout.splitlines()
    steps = {line[6:].split(":", 1)[0]: line for line in lines}
    assert list(steps) == STEPS, res.stdout + res.stderr
    return res.returncode, steps


@pytest.fixture
def running(lab, upstreams, daemon, tmp_path):
    """transocks with an access-log file, and its rules applied; removed at the end."""
    log = tmp_path / "access.log"
    d = daemon(["--proxy-url", upstreams.dante.url, "--access-log", str(log), "--pidfile", str(tmp_path / "pid")],
               redirect=False)
    settings = d.argv[3:]
    transocks(lab, lab.client, "rules", "--apply", *settings)
    yield d, settings
    transocks(lab, lab.client, "rules", "--remove", check=False)


def test_all_steps_hold(lab, running):
    _, settings = running
    code, steps = doctor(lab, "--target", TARGET, *settings)
    assert code == 0, "\n".join(steps.values())
    assert all(line.startswith("ok  ") for line in steps.values())
    assert f"pid {running[0].pid}" in steps["daemon"] and "accepting on [::1]:1081" in steps["daemon"]
    assert "upstream excluded" in steps["redirect rules"]
    assert f"CONNECT to {TARGET} granted" in steps["upstream"]
    assert "via transocks on 127.0.0.1:1081" in steps["canary"] and "bytes back" in steps["canary"]
    assert "access log: outcome=" in steps["canary"]


def test_without_rules_the_rules_and_canary_fail(lab, running):
    _, settings = running
    transocks(lab, lab.client, "rules", "--remove")
    code, steps = doctor(lab, "--target", TARGET, *settings)
    assert code == 1
    assert steps["redirect rules"].startswith("FAIL") and "transocks rules --apply" in steps["redirect rules"]
    assert steps["canary"].startswith("FAIL") and "went straight out" in steps["canary"]
    assert steps["daemon"].startswith("ok") and steps["upstream"].startswith("ok")


def test_upstream_not_excluded_is_a_loop(lab, running):
    """Rules applied for another upstream: the real one's connection would be diverted back."""
    _, settings = running
    i = settings.index("--proxy-url")  # proxy_url adds up: replace the real member, do not add one
    other = [*settings[:i], "--proxy-url", "socks5://198.51.100.99:1080", *settings[i + 2:]]
    transocks(lab, lab.client, "rules", "--apply", *other)
    code, steps = doctor(lab, "--target", TARGET, *settings)
    assert code == 1
    assert steps["redirect rules"].startswith("FAIL") and "is not excluded" in steps["redirect rules"]
    assert steps["upstream"].startswith("FAIL") and "redirect loop" in steps["upstream"]


def test_unreachable_upstream_and_stopped_daemon(lab, running):
    d, settings = running
    i = settings.index("--proxy-url")
    unreachable = [*settings[:i], "--proxy-url", "socks5://192.0.2.1:1099", *settings[i + 2:]]
    code, steps = doctor(lab, "--target", TARGET, *unreachable)
    assert code == 1 and steps["upstream"].startswith("FAIL") and "Connection refused" in steps["upstream"]
    d.stop()
    code, steps = doctor(lab, "--target", TARGET, *settings)
    assert code == 1 and steps["daemon"].startswith("FAIL")
    assert "pidfile" in steps["daemon"] or "nothing accepts" in steps["daemon"]
    assert steps["canary"].startswith("FAIL")


def test_bad_configuration_stops_at_the_first_step(lab):
    res = transocks(lab, lab.client, "doctor", "--listen", "nonsense", check=False)
    assert res.returncode == 1
    assert res.stdout.startswith("FAIL  configuration:") and len(res.stdout.splitlines()) == 1
