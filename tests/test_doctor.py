"""`transocks doctor` in the lab's client namespace: every step holds on a working set-up,
and each broken piece makes its own step fail (exit status 1) with what to do about that
piece (a name that does not resolve, an upstream that is down, rules that are missing); a
run never makes the daemon write a warning."""

from __future__ import annotations

import pytest

from tests.lab.names import hosts_overlay
from tests.lab.netns import INET_V4, TEST_PORT
from tests.lab.rulesets import transocks
from tests.test_datapath import wait_log
from tests.test_usocksd import gw_names, usocksd  # noqa: F401 (fixtures)

pytestmark = pytest.mark.netns

TARGET = f"{INET_V4}:{TEST_PORT}"
STEPS = ["configuration", "daemon", "redirect rules", "upstream", "canary"]


def doctor(lab, *args: str) -> tuple[int, dict[str, str]]:
    res = transocks(lab, lab.client, "doctor", *args, check=False)
    lines = res.stdout.splitlines()
    steps = {line[6:].split(":", 1)[0]: line for line in lines}
    assert list(steps) == STEPS, res.stdout + res.stderr
    return res.returncode, steps


def advice(line: str) -> str:
    """What a step line says to do ("" when it holds)."""
    return line.split("; do: ", 1)[1] if "; do: " in line else ""


def warnings_since(d, offset: int) -> list[str]:
    """The daemon's warning and error lines after `offset` characters of its log."""
    return [ln for ln in d.log_text()[offset:].splitlines() if " warning: " in ln or " error: " in ln]


def start_with_rules(lab, daemon, tmp_path, url: str, *extra: str):
    """transocks with an access-log file and a pidfile, and its rules applied."""
    d = daemon(["--proxy-url", url, "--access-log", str(tmp_path / "access.log"), "--pidfile", str(tmp_path / "pid"),
                *extra], redirect=False)
    settings = d.argv[3:]
    transocks(lab, lab.client, "rules", "--apply", *settings)
    return d, settings


@pytest.fixture
def running(lab, upstreams, daemon, tmp_path):
    """transocks with an access-log file, and its rules applied; removed at the end."""
    try:
        yield start_with_rules(lab, daemon, tmp_path, upstreams.dante.url)
    finally:
        transocks(lab, lab.client, "rules", "--remove", check=False)


def test_all_steps_hold(lab, running):
    _, settings = running
    code, steps = doctor(lab, "--target", TARGET, *settings)
    assert code == 0, "\n".join(steps.values())
    assert all(line.startswith("ok  ") for line in steps.values())
    assert f"pid {running[0].pid}" in steps["daemon"] and "listening on [::1]:1081" in steps["daemon"]
    assert "upstream excluded" in steps["redirect rules"]
    assert f"CONNECT to {TARGET} granted" in steps["upstream"]
    assert "via transocks on 127.0.0.1:1081" in steps["canary"] and "bytes back" in steps["canary"]
    assert "access log: outcome=" in steps["canary"]


def test_a_doctor_run_leaves_no_warning_in_the_daemons_log(lab, running):
    """The daemon step checks the listeners without connecting to them: a connection that was
    not redirected is what transocks warns about (`loop ... not redirected`)."""
    d, settings = running
    before = len(d.log_text())
    code, steps = doctor(lab, "--target", TARGET, *settings)
    assert code == 0, "\n".join(steps.values())
    assert warnings_since(d, before) == []


def test_without_rules_the_rules_and_canary_fail(lab, running):
    d, settings = running
    transocks(lab, lab.client, "rules", "--remove")
    before = len(d.log_text())
    code, steps = doctor(lab, "--target", TARGET, *settings)
    assert code == 1
    assert steps["redirect rules"].startswith("FAIL") and "transocks rules --apply" in advice(steps["redirect rules"])
    assert steps["canary"].startswith("FAIL") and "went straight out" in steps["canary"]
    assert "transocks rules --apply" in advice(steps["canary"])
    assert steps["daemon"].startswith("ok") and steps["upstream"].startswith("ok")
    assert warnings_since(d, before) == []


def test_names_that_do_not_resolve_here_get_resolver_advice(lab, usocksd, daemon, tmp_path):
    """The host's resolver fails (the edge's works): for the target, the canary says so and
    points at the resolver or the name, not at the redirect rules; for an upstream's name,
    the rules and upstream steps point at the resolver or proxy_url."""
    u = usocksd()
    d, settings = start_with_rules(lab, daemon, tmp_path, u.url())
    i = settings.index("--proxy-url")
    by_name = [*settings[:i], "--proxy-url", f"socks5://edge.test:{u.port}", *settings[i + 2:]]
    try:
        with hosts_overlay(lab, lab.client, {}):  # resolves nothing: this host's resolver is broken
            code, steps = doctor(lab, "--target", f"good.test:{TEST_PORT}", *settings)
            by_name_code, by_name_steps = doctor(lab, "--target", TARGET, *by_name)
    finally:
        transocks(lab, lab.client, "rules", "--remove", check=False)
    assert code == 1
    assert [s for s, line in steps.items() if line.startswith("FAIL")] == ["canary"], "\n".join(steps.values())
    assert "good.test" in steps["canary"] and "resolv" in advice(steps["canary"])
    assert "--target" in advice(steps["canary"]) and "rules" not in advice(steps["canary"])
    assert by_name_code == 1
    for step in ("redirect rules", "upstream"):
        line = by_name_steps[step]
        assert line.startswith("FAIL") and "edge.test" in line, line
        assert "resolv" in advice(line) and "proxy_url" in advice(line) and "rules" not in advice(line), line


def test_an_upstream_that_is_down_gets_upstream_advice_never_rules(lab, usocksd, daemon, tmp_path):
    """Applying the rules again would not help (and with a direct exit would cut the host off):
    every failing step points at the upstream."""
    u = usocksd()
    d, settings = start_with_rules(lab, daemon, tmp_path, u.url(), "--health-interval", "0.2s")
    try:
        u.stop()
        wait_log(d, "is down after")  # transocks refuses at once now: the canary is reset within a millisecond
        before = len(d.log_text())
        code, steps = doctor(lab, "--target", TARGET, *settings)
    finally:
        transocks(lab, lab.client, "rules", "--remove", check=False)
    assert code == 1
    lines = "\n".join(steps.values())
    assert steps["daemon"].startswith("ok") and steps["redirect rules"].startswith("ok"), lines
    assert steps["upstream"].startswith("FAIL") and "refused" in steps["upstream"], lines
    assert steps["canary"].startswith("FAIL") and "upstream" in advice(steps["canary"]), lines
    assert all("rules --apply" not in advice(line) for line in steps.values()), lines
    assert [w for w in warnings_since(d, before) if "not redirected" in w or "this proxy" in w] == []


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
