"""doctor's readers of iptables-save and nft output, and its step lines, without a kernel."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from types import SimpleNamespace

import psutil
import pytest

from transocks.redirector import doctor as dr
from transocks.redirector.cli import TransocksApp, main

IPTABLES = """\
*nat
:OUTPUT ACCEPT [0:0]
:TRANSOCKS - [0:0]
-A OUTPUT -p tcp -j TRANSOCKS
-A TRANSOCKS -m addrtype --dst-type LOCAL -j RETURN
-A TRANSOCKS -d 192.0.2.1/32 -j RETURN
-A TRANSOCKS -d 10.0.0.0/8 -j RETURN
-A TRANSOCKS -p tcp -j REDIRECT --to-ports 1081
COMMIT
*mangle
-A PREROUTING -i lan0 -p tcp -j TPROXY --on-port 1082 --on-ip 0.0.0.0 --tproxy-mark 0x1/0x1
COMMIT
"""

NFT = """\
table inet transocks {
	set bypass4 {
		type ipv4_addr
		flags interval
		elements = { 0.0.0.0/8, 10.0.0.0/8,
			     127.0.0.0/8, 198.51.100.9,
			     224.0.0.0/3 }
	}

	set bypass6 {
		type ipv6_addr
		flags interval
		elements = { ::/127,
			     ::ffff:0.0.0.0/96,
			     2001:db8::1,
			     fc00::/7 }
	}

	chain divert {
		meta nfproto ipv4 meta l4proto tcp redirect to :1081
		meta nfproto ipv6 meta l4proto tcp tproxy ip6 to [2001:db8::2]:1083 meta mark set meta mark | 0x00000001 accept
	}
}
"""


def test_divert_ports_in_both_formats():
    assert dr._divert_ports(IPTABLES) == [1081, 1082]
    assert dr._divert_ports(NFT) == [1081, 1083]


def test_our_exclusions_read_return_rules_and_set_elements():
    nets = dr._our_exclusions({"iptables": IPTABLES, "nft": NFT})
    assert nets is not None
    for addr in ("192.0.2.1", "10.1.2.3", "198.51.100.9", "2001:db8::1", "::ffff:1.2.3.4", "fd00::1"):
        assert any(ipaddress.ip_address(addr) in n for n in nets if n.version == ipaddress.ip_address(addr).version)
    assert not any(ipaddress.ip_address("203.0.113.5") in n for n in nets if n.version == 4)
    assert dr._our_exclusions({"iptables": "*nat\n-A OUTPUT -j REDIRECT --to-ports 1\nCOMMIT\n"}) is None


def test_step_lines_say_what_to_do_only_when_failing():
    assert dr.Step("daemon", True, "pid 7", "start it").line() == "ok    daemon: pid 7"
    assert dr.Step("daemon", False, "not running", "start it").line() == "FAIL  daemon: not running; do: start it"


def completed(stdout: str) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], 0, stdout, "")


@pytest.fixture
def tools(monkeypatch):
    monkeypatch.setattr(dr.shutil, "which", lambda name: "/usr/sbin/" + name)


def run_with(iptables: str = "", nft: str = ""):
    return lambda argv: completed(iptables if argv[0] == "iptables-save" else nft if argv[0] == "nft" else "")


def cfg(*argv: str):
    return TransocksApp().load_config(["-c", "/dev/null", *argv])


def test_rules_step_checks_the_upstream_in_our_rules(tools):
    good = dr.Doctor(cfg("--proxy-url", "socks5://192.0.2.1:1080"), None, run_with(IPTABLES)).rules()
    assert good.ok and "upstream excluded" in good.found
    moved = dr.Doctor(cfg("--proxy-url", "socks5://203.0.113.9:1080"), None, run_with(IPTABLES)).rules()
    assert not moved.ok and "203.0.113.9 is not excluded" in moved.found


def test_rules_step_wants_a_divert_to_a_listen_port(tools):
    step = dr.Doctor(cfg("--listen", "127.0.0.1:2000"), None, run_with(IPTABLES)).rules()
    assert not step.ok and "not to a listen port" in step.found
    none = dr.Doctor(cfg(), None, run_with("*nat\nCOMMIT\n")).rules()
    assert not none.ok and "transocks rules --apply" in none.todo
    foreign = dr.Doctor(cfg(), None, run_with("*nat\n-A OUTPUT -d 203.0.113.0/24 -p tcp -j REDIRECT --to-ports 1081\n")).rules()
    assert foreign.ok and "not made by transocks rules" in foreign.found


def test_bad_configuration_is_the_only_line(capsys):
    assert main(["doctor", "-c", "/dev/null", "--workers", "0"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("FAIL  configuration: ")


def listening(monkeypatch, *sockets: tuple[str, int, int | None]) -> None:
    """The kernel's socket table holds these listening sockets (address, port, owner pid), and
    no connection may be made: the daemon step must not connect (transocks would warn)."""
    table = [SimpleNamespace(status=psutil.CONN_LISTEN, laddr=(host, port), pid=pid) for host, port, pid in sockets]
    monkeypatch.setattr(dr.psutil, "net_connections", lambda kind: table)

    def no_connect(*args, **kwargs):
        raise AssertionError("the daemon step connected to a listener")

    monkeypatch.setattr(dr.socket, "create_connection", no_connect)


def test_daemon_step_reads_the_listeners_without_connecting(monkeypatch, tmp_path):
    pidfile = tmp_path / "pid"
    pidfile.write_text(f"{os.getpid()}\n")
    settings = ("--listen", "127.0.0.1:1081", "--listen", "[::1]:1081", "--pidfile", str(pidfile))
    listening(monkeypatch, ("127.0.0.1", 1081, os.getpid()), ("::1", 1081, os.getpid()))
    step = dr.Doctor(cfg(*settings), None).daemon()
    assert step.ok and step.found == f"pid {os.getpid()}, listening on 127.0.0.1:1081, listening on [::1]:1081"
    listening(monkeypatch, ("127.0.0.1", 1081, os.getpid()))
    step = dr.Doctor(cfg(*settings), None).daemon()
    assert not step.ok and step.found == "nothing listens on [::1]:1081" and "start transocks" in step.todo
    listening(monkeypatch, ("127.0.0.1", 1081, 1), ("::1", 1081, os.getpid()))
    step = dr.Doctor(cfg(*settings), None).daemon()
    assert not step.ok and "127.0.0.1:1081 is held by pid 1" in step.found


def test_a_failed_canary_points_at_the_first_failed_step():
    d = dr.Doctor(cfg(), None)
    assert d._blame("see the log") == "see the log"
    d.failed.append(dr.Step("upstream", False, "connect refused", "check the upstream"))
    assert d._blame("see the log") == "fix the upstream step first (check the upstream)"
