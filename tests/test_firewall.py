"""`transocks rules --apply/--remove` in the lab's namespaces (never in the root namespace).

After --apply a real client's traffic (curl) goes through transocks and the
upstream proxy (the test server sees the proxy's outside address, not the
client's), the upstream's own connection is not diverted back (no loop), and
after --remove the namespace's rules and routes are what they were before.
Both formats; the host's own traffic (nat OUTPUT) and a gateway's (PREROUTING,
REDIRECT and TPROXY); and `--format auto` on a host that has nft and no iptables.
"""

from __future__ import annotations

import shutil

import pytest

from tests.lab.netns import GW_EXT_V4, GW_EXT_V6, GW_V4, INET_V4, INET_V6, TEST_PORT
from tests.lab.rulesets import snapshot, transocks
from tests.test_datapath import wait_log

pytestmark = pytest.mark.netns

FORMATS = ["iptables", "nft"]


def peer_through(lab, host: str) -> str:
    """The address the test server saw for a curl from the client namespace."""
    flag = "-6" if ":" in host else "-4"
    url_host = f"[{host}]" if ":" in host else host
    res = lab.run(lab.client, ["curl", "-sS", flag, "--max-time", "20", f"http://{url_host}:{TEST_PORT}/peer"],
                  timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()[0]


def settings(d) -> list[str]:
    """The daemon's own settings (after `python -m transocks`), for `transocks rules`."""
    return d.argv[3:]


def check_through_proxy(lab, d) -> None:
    assert peer_through(lab, INET_V4) == GW_EXT_V4
    assert peer_through(lab, INET_V6) == GW_EXT_V6
    # A connection's line is written once transocks has seen both sides end, which can be
    # just after the client is done.
    wait_log(d, f"dest={INET_V4}:{TEST_PORT}")
    log = wait_log(d, f"dest=[{INET_V6}]:{TEST_PORT}")
    # Had the upstream connection been diverted, transocks would have logged (and refused)
    # a connection to the upstream's address.
    assert f"dest={GW_V4}:" not in log


def apply_twice_then_remove_twice(lab, ns: str, d, *args: str) -> None:
    """Both idempotent: a second apply changes nothing, a second remove finds nothing."""
    before = snapshot(lab, ns)
    transocks(lab, ns, "rules", "--apply", *args, *settings(d))
    try:
        applied = snapshot(lab, ns)
        assert applied != before
        transocks(lab, ns, "rules", "--apply", *args, *settings(d))
        assert snapshot(lab, ns) == applied
        check_through_proxy(lab, d)
    finally:  # a failed check must not leave rules behind for the next test
        transocks(lab, ns, "rules", "--remove")
    transocks(lab, ns, "rules", "--remove")
    assert snapshot(lab, ns) == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_host_rules_divert_own_traffic(lab, upstreams, daemon, fmt):
    d = daemon(["--proxy-url", upstreams.dante.url], redirect=False)
    assert peer_through(lab, INET_V4) != GW_EXT_V4  # without the rules: straight out
    apply_twice_then_remove_twice(lab, lab.client, d, "--format", fmt)
    assert peer_through(lab, INET_V4) != GW_EXT_V4


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tproxy", [False, True], ids=["redirect", "tproxy"])
def test_gateway_rules_divert_forwarded_traffic(lab, upstreams, daemon, fmt, tproxy):
    port = 1091
    args = ["--proxy-url", upstreams.dante.url] + (["--tproxy", "true"] if tproxy else [])
    d = daemon(args, port, redirect=False, ns=lab.gw, listens=[f"[::]:{port}"])
    apply_twice_then_remove_twice(lab, lab.gw, d, "--format", fmt, "--from", "cl0")


def test_switching_format_leaves_only_the_new_one(lab, upstreams, daemon):
    d = daemon(["--proxy-url", upstreams.dante.url], redirect=False)
    before = snapshot(lab, lab.client)
    transocks(lab, lab.client, "rules", "--apply", "--format", "iptables", *settings(d))
    transocks(lab, lab.client, "rules", "--apply", "--format", "nft", *settings(d))
    now = snapshot(lab, lab.client)
    assert "TRANSOCKS" not in now["iptables"] + now["ip6tables"]
    assert "table inet transocks" in now["nft"]
    check_through_proxy(lab, d)
    transocks(lab, lab.client, "rules", "--remove")
    assert snapshot(lab, lab.client) == before


def test_other_rules_are_left_alone(lab, upstreams, daemon):
    """A rule of someone else's in the same built-in chain survives apply and remove."""
    d = daemon(["--proxy-url", upstreams.dante.url], redirect=False)
    other = ["OUTPUT", "-p", "tcp", "-d", "198.51.100.77", "-j", "ACCEPT"]
    lab.iptables(lab.client, "-t", "nat", "-A", *other)
    try:
        before = snapshot(lab, lab.client)
        transocks(lab, lab.client, "rules", "--apply", *settings(d))
        assert "-A OUTPUT -d 198.51.100.77/32 -p tcp -j ACCEPT" in snapshot(lab, lab.client)["iptables"]
        transocks(lab, lab.client, "rules", "--remove")
        assert snapshot(lab, lab.client) == before
    finally:
        lab.iptables(lab.client, "-t", "nat", "-D", *other, check=False)


def only_tools(lab, *tools: str) -> dict[str, str]:
    """A PATH that shows only `tools` (a temp dir of symlinks), for `transocks(..., env=)`."""
    d = lab.tempdir("path")
    for tool in tools:
        (d / tool).symlink_to(shutil.which(tool))
    return {"PATH": str(d)}


def test_nft_only_host_gets_nft_rules_by_default(lab, upstreams, daemon):
    """A stock Debian 12 has nftables and no iptables: there `rules --apply` (format auto, the
    default) installs the nft table, and --remove leaves the namespace exactly as it was."""
    d = daemon(["--proxy-url", upstreams.dante.url], redirect=False)
    nft_only = only_tools(lab, "nft", "ip")
    before = snapshot(lab, lab.client)
    try:
        res = transocks(lab, lab.client, "rules", "--apply", *settings(d), env=nft_only)
        assert "format nft (auto: nft found, iptables-restore not)" in res.stderr
        now = snapshot(lab, lab.client)
        assert "table inet transocks" in now["nft"]
        assert (now["iptables"], now["ip6tables"]) == (before["iptables"], before["ip6tables"])
        check_through_proxy(lab, d)
    finally:
        transocks(lab, lab.client, "rules", "--remove", env=nft_only)
    assert snapshot(lab, lab.client) == before
    res = transocks(lab, lab.client, "rules", "--apply", *settings(d), env=only_tools(lab, "ip"), check=False)
    assert res.returncode == 1 and "install nftables or iptables" in res.stderr
    assert snapshot(lab, lab.client) == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_bypass_user_goes_out_undiverted(lab, upstreams, daemon, fmt):
    """A usocksd on the same host runs as its own user: with bypass_user its connections go straight
    out (the server sees the client namespace's address), while everyone else's go through the proxy."""
    d = daemon(["--proxy-url", upstreams.dante.url], redirect=False)
    transocks(lab, lab.client, "rules", "--apply", "--format", fmt, "--bypass-user", "nobody", *settings(d))
    try:
        assert peer_through(lab, INET_V4) == GW_EXT_V4
        res = lab.run(lab.client, ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "curl", "-sS",
                                   "-4", "--max-time", "20", f"http://{INET_V4}:{TEST_PORT}/peer"],
                      timeout=30, check=False)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split()[0] not in (GW_EXT_V4, GW_V4)  # not through dante
    finally:
        transocks(lab, lab.client, "rules", "--remove")
