"""The rules generator without a kernel: what a configuration yields, and how apply/remove
talk to iptables-restore, nft and ip (a recording runner stands in for them)."""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from transocks.core.netutil import Endpoint
from transocks.redirector import firewall as fw
from transocks.redirector.cli import TransocksApp, main


def cfg(*argv: str):
    return TransocksApp().load_config(["-c", "/dev/null", *argv])


def plan(*argv: str, ifaces: Sequence[str] = ()) -> fw.Plan:
    return fw.make_plan(cfg(*argv), ifaces)


def test_host_plan_excludes_upstream_reserved_and_listens():
    p = plan("--proxy-url", "socks5://198.51.100.7:1080", "--listen", "127.0.0.1:1091", "--listen", "[::1]:1091")
    v4, v6 = p.divert(fw.IPV4), p.divert(fw.IPV6)
    assert v4 is not None and v6 is not None and (v4.port, v6.port) == (1091, 1091)
    assert v4.exclude[0] == ipaddress.ip_network("198.51.100.7/32")
    assert {ipaddress.ip_network(n) for n in fw.RESERVED_V4} <= set(v4.exclude)
    assert {ipaddress.ip_network(n) for n in fw.RESERVED_V6} <= set(v6.exclude)
    text = fw.iptables_text(p, fw.IPV4)
    assert "-A OUTPUT -p tcp -j TRANSOCKS" in text
    assert "-A TRANSOCKS -d 198.51.100.7/32 -j RETURN" in text
    assert text.rstrip().endswith("-A TRANSOCKS -p tcp -j REDIRECT --to-ports 1091\nCOMMIT")
    assert "-m owner" not in text


def test_ipv6_upstream_is_excluded_in_ipv6_only():
    p = plan("--proxy-url", "socks5://[2001:db8::5]:1080")
    assert ipaddress.ip_network("2001:db8::5/128") in p.divert(fw.IPV6).exclude
    assert "2001:db8::5" not in fw.iptables_text(p, fw.IPV4)


def test_upstream_names_are_resolved_now():
    p = fw.make_plan(cfg("--proxy-url", "socks5://localhost:1080"), upstreams=fw.resolve(Endpoint("127.0.0.1", 1080)))
    assert ipaddress.ip_network("127.0.0.1/32") in p.divert(fw.IPV4).exclude
    with pytest.raises(fw.FirewallError, match="cannot resolve upstream"):
        fw.upstream_endpoints(cfg("--proxy-url", "socks5://no-such-host.invalid:1080"))


def test_user_is_excluded_by_uid_in_both_formats():
    p = plan("--user", "4321")
    assert "-A TRANSOCKS -m owner --uid-owner 4321 -j RETURN" in fw.iptables_text(p, fw.IPV4)
    assert "meta skuid 4321 return" in fw.nft_table(p)
    with pytest.raises(fw.FirewallError, match="does not exist"):
        plan("--user", "no-such-user-here")


def test_direct_exit_without_user_is_noted():
    p = plan("--proxy-url", "direct://")
    assert any("direct://" in n for n in p.notes)
    assert fw.upstream_endpoints(cfg("--proxy-url", "direct://")) == []


def test_gateway_redirect_needs_a_non_loopback_listener():
    with pytest.raises(fw.FirewallError, match="no listen address"):
        plan(ifaces=["lan0"])  # the default listens on loopback only
    p = plan("--listen", "192.0.2.1:1081", ifaces=["lan0", "lan1"])
    assert p.divert(fw.IPV6) is None and any("ipv6" in n for n in p.notes)
    text = fw.iptables_text(p, fw.IPV4)
    assert "-A PREROUTING -i lan0 -p tcp -j TRANSOCKS_GW" in text and "-i lan1" in text
    assert "-A TRANSOCKS_GW -d 192.0.2.1/32 -j RETURN" in text  # the listen address
    assert "-m owner" not in text  # owner matches exist only for local traffic


def test_tproxy_gateway_uses_mangle_marks_and_policy_routing():
    p = plan("--tproxy", "true", "--listen", "[::]:1081", "--listen", "192.0.2.1:1082", ifaces=["lan0"])
    assert p.tproxy and p.hook == ("mangle", "PREROUTING")
    assert "-j TPROXY --on-port 1081 --tproxy-mark 0x1/0x1" in fw.iptables_text(p, fw.IPV4)
    cmds = [" ".join(c) for c in fw.routing_commands(p)]
    assert "ip -4 rule add fwmark 0x1/0x1 lookup 100 protocol 243" in cmds
    assert "ip -6 route replace local ::/0 dev lo table 100 proto 243" in cmds
    nft = fw.nft_table(p)
    assert "type filter hook prerouting priority -150" in nft
    assert "tproxy ip6 to :1081 meta mark set meta mark | 0x1 accept" in nft


def test_tproxy_on_a_specific_address_gives_on_ip():
    p = plan("--tproxy", "true", "--listen", "192.0.2.1:1081", ifaces=["lan0"])
    assert "--on-port 1081 --on-ip 192.0.2.1" in fw.iptables_text(p, fw.IPV4)
    assert "tproxy ip to 192.0.2.1:1081" in fw.nft_table(p)


def test_tproxy_without_from_redirects_the_hosts_traffic():
    p = plan("--tproxy", "true", "--listen", "[::]:1081")
    assert not p.tproxy and p.hook == ("nat", "OUTPUT") and p.notes


def test_nft_sets_have_no_overlapping_intervals():
    """nft refuses overlapping elements in an interval set: an upstream inside a reserved
    range (or a listener on loopback) must be merged, not listed twice."""
    p = plan("--proxy-url", "socks5://10.1.2.3:1080", "--listen", "127.0.0.1:1081", "--listen", "[::1]:1081")
    for line in fw.nft_table(p).splitlines():
        if "elements" in line:
            nets = [ipaddress.ip_network(e.strip()) for e in line.split("{")[1].split("}")[0].split(",")]
            assert all(not a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1:])
    assert "10.1.2.3" not in fw.nft_table(p)


SAVED = """\
# Generated by iptables-save
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:DOCKER - [0:0]
:TRANSOCKS - [0:0]
-A OUTPUT -d 198.51.100.77/32 -p tcp -j ACCEPT
-A OUTPUT -p tcp -j TRANSOCKS
-A TRANSOCKS -d 10.0.0.0/8 -j RETURN
-A TRANSOCKS -p tcp -j REDIRECT --to-ports 1081
COMMIT
"""


def test_parse_save_finds_only_our_chains_and_jumps():
    t = fw.parse_save(SAVED)["nat"]
    assert t.ours == ["TRANSOCKS"] and t.jumps == ["-A OUTPUT -p tcp -j TRANSOCKS"]
    assert t.rules["OUTPUT"] == 2 and t.rules["DOCKER"] == 0
    assert fw.removal_lines(t) == ["-D OUTPUT -p tcp -j TRANSOCKS", "-F TRANSOCKS", "-X TRANSOCKS"]
    assert fw.removal_lines(t, keep=["TRANSOCKS"]) == ["-D OUTPUT -p tcp -j TRANSOCKS"]


class Recorder:
    """Stands in for the tools: answers -save/--version/ip -j from canned text, records the rest."""

    def __init__(self, saved: str = "", backend: str = "legacy") -> None:
        self.saved = saved
        self.backend = backend
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, argv: Sequence[str], input: str | None = None) -> subprocess.CompletedProcess:
        argv = list(argv)
        self.calls.append((argv, input))
        out = ""
        if argv[0].endswith("-save"):
            out = self.saved if argv[0] == "iptables-save" else ""
        elif argv[-1] == "--version":
            out = f"iptables v1.8.9 ({self.backend})"
        elif argv[:2] == ["ip", "-j"]:
            out = '[{"priority": 0, "table": "local", "protocol": "kernel"},' \
                  '{"priority": 32765, "fwmark": "0x1", "table": "100", "protocol": "243"}]'
        return subprocess.CompletedProcess(argv, 0, out, "")

    def inputs(self, tool: str) -> list[str]:
        return [inp or "" for argv, inp in self.calls if argv[0] == tool]


def firewall(rec: Recorder) -> fw.Firewall:
    return fw.Firewall(rec, which=lambda name: "/usr/sbin/" + name)


def test_apply_replaces_the_earlier_apply_in_one_restore_per_family():
    rec = Recorder(SAVED)
    firewall(rec).apply(plan("--proxy-url", "socks5://198.51.100.7:1080"), "iptables")
    (v4,) = rec.inputs("iptables-restore")
    assert v4.startswith("*nat\n-D OUTPUT -p tcp -j TRANSOCKS\n:TRANSOCKS - [0:0]\n-A OUTPUT -p tcp -j TRANSOCKS\n")
    assert v4.count("COMMIT") == 1 and "-X" not in v4 and "MADE" not in v4  # legacy: no marker
    assert "198.51.100.77" not in v4  # someone else's rule is not touched
    (drop_nft,) = rec.inputs("nft")
    assert drop_nft == "table inet transocks\ndelete table inet transocks\n"
    assert ["ip", "-4", "rule", "del", "priority", "32765", "protocol", "243"] in [c for c, _ in rec.calls]


def test_apply_on_iptables_nft_marks_a_table_it_creates():
    rec = Recorder("", backend="nf_tables")
    firewall(rec).apply(plan(), "iptables")
    v4 = rec.inputs("iptables-restore")[0]
    assert f":{fw.MADE_MARKER} - [0:0]" in v4


def test_remove_takes_away_jumps_and_chains_and_nothing_else():
    rec = Recorder(SAVED)
    firewall(rec).remove()
    (v4,) = rec.inputs("iptables-restore")
    assert v4 == "*nat\n-D OUTPUT -p tcp -j TRANSOCKS\n-F TRANSOCKS\n-X TRANSOCKS\nCOMMIT\n"
    assert not rec.inputs("ip6tables-restore")  # nothing of ours there: no restore at all


def test_missing_tools_are_named():
    p = plan()
    with pytest.raises(fw.FirewallError, match="iptables-restore not found"):
        fw.Firewall(Recorder(), which=lambda name: None).apply(p, "iptables")
    fw.Firewall(Recorder(), which=lambda name: None).remove()  # nothing to remove where nothing is installed


def test_rules_command_prints_and_filters_by_family(capsys):
    assert main(["rules", "-c", "/dev/null", "--family", "ipv6", "--proxy-url", "socks5://[2001:db8::9]:1080"]) == 0
    out = capsys.readouterr().out
    assert "ip6tables-restore" in out and "iptables-restore --noflush" not in out.replace("ip6tables", "")
    assert "-A TRANSOCKS -d 2001:db8::9/128 -j RETURN" in out
    assert main(["rules", "-c", "/dev/null", "--format", "nft"]) == 0
    assert capsys.readouterr().out.count("\ntable inet transocks") == 2  # the drop, then the definition


def test_rules_command_reports_bad_settings(capsys):
    assert main(["rules", "-c", "/dev/null", "--listen", "nonsense"]) == 2
    assert "transocks rules: error" in capsys.readouterr().err
    assert main(["rules", "-c", "/dev/null", "--user", "no-such-user-here"]) == 1


def test_help_lists_the_rules_command(capsys):
    assert "rules [--apply|--remove]" in TransocksApp().config().help_text()


def test_every_member_of_every_pool_is_excluded():
    c = cfg("--proxy-url", "socks5://198.51.100.7:1080", "--proxy-url", "socks5://198.51.100.8:1080",
            "--pool", "edge http://[2001:db8::9]:3128 socks5://198.51.100.7:1080", "--route", "port=25 -> edge")
    assert fw.upstream_endpoints(c) == [Endpoint("198.51.100.7", 1080), Endpoint("198.51.100.8", 1080),
                                        Endpoint("2001:db8::9", 3128)]
    p = fw.make_plan(c, ())
    assert ipaddress.ip_network("198.51.100.8/32") in p.divert(fw.IPV4).exclude
    assert ipaddress.ip_network("2001:db8::9/128") in p.divert(fw.IPV6).exclude


def test_a_route_to_direct_without_user_is_noted():
    p = plan("--proxy-url", "socks5://198.51.100.7:1080", "--route", "dst=198.51.100.0/24 -> direct")
    assert any("direct://" in n for n in p.notes)


# --- --format auto ------------------------------------------------------------------


def chooser(tools: set[str], backend: str = "nf_tables", legacy: bool = False) -> fw.Firewall:
    """A host with `tools` on its PATH, iptables of `backend`, legacy tables in use or not."""
    return fw.Firewall(Recorder(backend=backend), which=lambda name: f"/usr/sbin/{name}" if name in tools else None,
                       legacy_tables=lambda: legacy)


@pytest.mark.parametrize("tools, backend, legacy, expected", [
    ({"nft"}, "legacy", False, "nft"),                              # stock Debian 12: nftables only
    ({"iptables-restore"}, "nf_tables", False, "iptables"),         # no nft: iptables is all there is
    ({"nft", "iptables-restore"}, "nf_tables", False, "nft"),       # iptables-nft, nothing legacy
    ({"nft", "iptables-restore"}, "nf_tables", True, "iptables"),   # iptables-nft, but legacy tables in use
    ({"nft", "iptables-restore"}, "legacy", False, "iptables"),     # iptables-legacy
], ids=["nft-only", "iptables-only", "shim", "shim-with-legacy-tables", "legacy"])
def test_auto_picks_the_format_the_host_can_use(tools, backend, legacy, expected):
    fmt, why = chooser(tools, backend, legacy).choose()
    assert fmt == expected and why


def test_auto_without_either_tool_names_both_ways():
    with pytest.raises(fw.FirewallError) as exc:
        chooser(set()).choose()
    assert "install nftables or iptables" in str(exc.value)


def test_legacy_tables_are_read_from_the_kernels_lists(tmp_path):
    empty, nat = tmp_path / "ip_tables_names", tmp_path / "ip6_tables_names"
    empty.write_text("")
    nat.write_text("nat\n")
    assert not fw.legacy_tables_in_use([str(empty), str(tmp_path / "missing")])
    assert fw.legacy_tables_in_use([str(empty), str(nat)])


def test_rules_format_is_auto_by_default(tmp_path, monkeypatch, capsys):
    """With only nft on PATH (a stock Debian 12), `transocks rules` prints the nft script."""
    (tmp_path / "nft").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "nft").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["rules", "-c", "/dev/null"]) == 0
    out, err = capsys.readouterr()
    assert "table inet transocks {" in out and "iptables-restore" not in out
    assert "format nft (auto: nft found, iptables-restore not)" in err
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert main(["rules", "-c", "/dev/null"]) == 1
    assert "install nftables" in capsys.readouterr().err


def test_the_rules_drop_in_leaves_the_format_to_auto():
    text = (Path(__file__).resolve().parents[2] / "init" / "transocks-rules.conf").read_text()
    (apply,) = [ln for ln in text.splitlines() if ln.startswith("ExecStartPre=") and "rules --apply" in ln]
    assert "--format auto" in apply


def test_bypass_users_are_excluded_by_uid_in_both_formats():
    p = plan("--user", "4321", "--bypass-user", "4322", "--bypass-user", "4321")
    text = fw.iptables_text(p, fw.IPV4)
    assert "-A TRANSOCKS -m owner --uid-owner 4321 -j RETURN" in text
    assert "-A TRANSOCKS -m owner --uid-owner 4322 -j RETURN" in text
    assert text.count("--uid-owner 4321") == 1
    assert "meta skuid 4322 return" in fw.nft_table(p)
    with pytest.raises(fw.FirewallError, match="bypass_user"):
        plan("--bypass-user", "no-such-user-here")
    assert plan("--listen", "[::]:1081", "--bypass-user", "4322", ifaces=["eth0"]).uids == ()  # a gateway's rules see no local owner


# --- UDP (udp = true) ------------------------------------------------------------------


def udp_plan(*argv: str, ifaces: Sequence[str] = ()) -> fw.Plan:
    return plan("--udp", "true", "--proxy-url", "socks5://198.51.100.7:1080", *argv, ifaces=ifaces)


def chain_lines(text: str, chain: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(f"-A {chain} ")]


def test_udp_false_adds_nothing_for_udp():
    p = plan("--proxy-url", "socks5://198.51.100.7:1080")
    assert not p.udp and p.reject_ports == () and fw.routing_commands(p) == []
    assert "udp" not in fw.iptables_text(p, fw.IPV4).lower() and "udp" not in fw.nft_table(p)


def test_host_udp_is_marked_in_output_and_tproxied_from_lo():
    p = udp_plan("--user", "4321")
    text = fw.iptables_text(p, fw.IPV4)
    assert "-A OUTPUT -p udp -j TRANSOCKS_UDP" in text
    assert "-A PREROUTING -i lo -p udp -m mark --mark 0x1/0x1 -j TRANSOCKS_UDP_TPROXY" in text
    mark = chain_lines(text, fw.UDP_MARK_CHAIN)
    assert mark[0] == "-A TRANSOCKS_UDP -m owner --uid-owner 4321 -j RETURN"
    assert mark[-2:] == ["-A TRANSOCKS_UDP -p udp -m multiport --dports 443 -j RETURN",
                         "-A TRANSOCKS_UDP -p udp -j MARK --set-mark 0x1/0x1"]
    tproxy = chain_lines(text, fw.UDP_TPROXY_CHAIN)
    # No socket match: it would hand other flows' datagrams to the shared reply socket of their destination.
    assert not any("-m socket" in ln for ln in tproxy)
    assert tproxy[-1] == ("-A TRANSOCKS_UDP_TPROXY -p udp -j TPROXY --on-port 1081 --on-ip 127.0.0.1 "
                          "--tproxy-mark 0x1/0x1")
    assert not any("-m owner" in ln for ln in tproxy)  # PREROUTING has no local owner
    assert "--on-ip ::1" in fw.iptables_text(p, fw.IPV6)
    cmds = [" ".join(c) for c in fw.routing_commands(p)]
    assert "ip -4 rule add fwmark 0x1/0x1 lookup 100 protocol 243" in cmds
    assert "ip -6 route replace local ::/0 dev lo table 100 proto 243" in cmds


def test_tcp_and_udp_skip_the_same_destinations():
    """One list of exclusions: every chain of ours has the same RETURNs (owner matches only where local)."""
    p = udp_plan("--user", "4321")
    for fam in fw.FAMILIES:
        text = fw.iptables_text(p, fam)
        tcp = [ln.split(" ", 2)[2] for ln in chain_lines(text, fw.OUTPUT_CHAIN) if ln.endswith("-j RETURN")]
        for chain in (fw.UDP_MARK_CHAIN, fw.UDP_REJECT_CHAIN):
            assert [ln.split(" ", 2)[2] for ln in chain_lines(text, chain) if "-d " in ln or "owner" in ln
                    or "addrtype" in ln] == tcp
        in_tproxy = [ln.split(" ", 2)[2] for ln in chain_lines(text, fw.UDP_TPROXY_CHAIN) if ln.endswith("-j RETURN")]
        assert in_tproxy == [r for r in tcp if "owner" not in r]
    assert "-d 198.51.100.7/32 -j RETURN" in fw.iptables_text(p, fw.IPV4)


def test_reject_ports_come_before_tproxy_with_icmp_port_unreachable():
    p = udp_plan("--udp-reject-ports", "443", "--udp-reject-ports", "8443")
    v4, v6 = fw.iptables_text(p, fw.IPV4), fw.iptables_text(p, fw.IPV6)
    assert "-A OUTPUT -p udp -m multiport --dports 443,8443 -j TRANSOCKS_UDP_REJECT" in v4
    assert chain_lines(v4, fw.UDP_REJECT_CHAIN)[-1] == \
        "-A TRANSOCKS_UDP_REJECT -p udp -j REJECT --reject-with icmp-port-unreachable"
    assert chain_lines(v6, fw.UDP_REJECT_CHAIN)[-1] == \
        "-A TRANSOCKS_UDP_REJECT -p udp -j REJECT --reject-with icmp6-port-unreachable"
    nft = fw.nft_table(p)
    reject = "udp dport { 443, 8443 } reject with icmpx type port-unreachable"
    assert nft.index(reject) < nft.index("meta mark set meta mark | 0x1\n")
    assert "type route hook output priority -150" in nft  # a mark set here reroutes


def test_an_empty_reject_list_rejects_nothing():
    p = udp_plan("--udp-reject-ports", "")
    assert p.reject_ports == ()
    assert "REJECT" not in fw.iptables_text(p, fw.IPV4) and "reject" not in fw.nft_table(p)
    assert "multiport" not in fw.iptables_text(p, fw.IPV4)


def test_many_reject_ports_are_split_for_multiport():
    ports = [str(1000 + i) for i in range(20)]
    p = udp_plan(*(f"--udp-reject-ports={x}" for x in ports))
    jumps = [ln for ln in fw.iptables_text(p, fw.IPV4).splitlines() if ln.startswith("-A OUTPUT -p udp -m multiport")]
    assert [ln.split("--dports ")[1].split()[0].count(",") + 1 for ln in jumps] == [15, 5]


def test_gateway_udp_is_tproxied_from_its_interfaces_and_rejected_in_forward():
    p = udp_plan("--listen", "[::]:1081", ifaces=["lan0", "lan1"])  # TCP is REDIRECTed here
    assert not p.tproxy and p.udp and fw.routing_commands(p)
    text = fw.iptables_text(p, fw.IPV4)
    assert "-A PREROUTING -i lan0 -p tcp -j TRANSOCKS_GW" in text
    assert "-A PREROUTING -i lan1 -p udp -j TRANSOCKS_UDP_TPROXY" in text
    assert "-A FORWARD -i lan0 -p udp -m multiport --dports 443 -j TRANSOCKS_UDP_REJECT" in text
    assert f":{fw.UDP_MARK_CHAIN} " not in text and "-m owner" not in text  # no host mark chain, no owners
    tproxy = chain_lines(text, fw.UDP_TPROXY_CHAIN)
    assert tproxy[-2:] == ["-A TRANSOCKS_UDP_TPROXY -p udp -m multiport --dports 443 -j RETURN",
                           "-A TRANSOCKS_UDP_TPROXY -p udp -j TPROXY --on-port 1081 --tproxy-mark 0x1/0x1"]
    nft = fw.nft_table(p)
    assert 'iifname "lan1" meta l4proto udp jump udp_divert' in nft and "udp_output" not in nft
    divert = nft[nft.index("chain udp_divert"):]
    assert divert.index("reject") < divert.index("tproxy ip to :1081")
    assert "socket" not in divert  # no socket match (see the host test)


def test_gateway_tcp_tproxy_and_udp_share_policy_routing():
    p = udp_plan("--tproxy", "true", "--listen", "192.0.2.1:1081", ifaces=["lan0"])
    text = fw.iptables_text(p, fw.IPV4)
    assert "-A TRANSOCKS_TPROXY -p tcp -j TPROXY --on-port 1081 --on-ip 192.0.2.1" in text
    assert "-A TRANSOCKS_UDP_TPROXY -p udp -j TPROXY --on-port 1081 --on-ip 192.0.2.1" in text
    assert len(fw.routing_commands(p)) == 2  # one family, one rule and one route


def test_udp_without_user_on_a_host_is_noted():
    assert any("udp = true without `user`" in n for n in udp_plan().notes)
    assert not any("udp" in n for n in udp_plan("--user", "4321").notes)


UDP_SAVED = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:TRANSOCKS_UDP_REJECT - [0:0]
-A OUTPUT -p udp -m multiport --dports 443 -j TRANSOCKS_UDP_REJECT
-A TRANSOCKS_UDP_REJECT -p udp -j REJECT --reject-with icmp-port-unreachable
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:TRANSOCKS_UDP - [0:0]
:TRANSOCKS_UDP_TPROXY - [0:0]
-A PREROUTING -i lo -p udp -m mark --mark 0x1/0x1 -j TRANSOCKS_UDP_TPROXY
-A OUTPUT -p udp -j TRANSOCKS_UDP
-A TRANSOCKS_UDP -p udp -j MARK --set-xmark 0x1/0x1
-A TRANSOCKS_UDP_TPROXY -p udp -j TPROXY --on-port 1081 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
COMMIT
"""


def test_remove_takes_away_the_udp_chains_too():
    rec = Recorder(UDP_SAVED)
    firewall(rec).remove()
    (v4,) = rec.inputs("iptables-restore")
    assert v4 == ("*filter\n-D OUTPUT -p udp -m multiport --dports 443 -j TRANSOCKS_UDP_REJECT\n"
                  "-F TRANSOCKS_UDP_REJECT\n-X TRANSOCKS_UDP_REJECT\nCOMMIT\n"
                  "*mangle\n-D PREROUTING -i lo -p udp -m mark --mark 0x1/0x1 -j TRANSOCKS_UDP_TPROXY\n"
                  "-D OUTPUT -p udp -j TRANSOCKS_UDP\n-F TRANSOCKS_UDP\n-X TRANSOCKS_UDP\n"
                  "-F TRANSOCKS_UDP_TPROXY\n-X TRANSOCKS_UDP_TPROXY\nCOMMIT\n")
    assert ["ip", "-4", "rule", "del", "priority", "32765", "protocol", "243"] in [c for c, _ in rec.calls]


class ChainsRecorder(Recorder):
    """iptables-nft whose filter table has INPUT only (iptables-save lists all three all the same)."""

    def __call__(self, argv: Sequence[str], input: str | None = None) -> subprocess.CompletedProcess:
        if list(argv)[:4] == ["nft", "-j", "list", "chains"]:
            self.calls.append((list(argv), input))
            out = '{"nftables": [{"chain": {"family": "ip", "table": "filter", "name": "INPUT"}}]}'
            return subprocess.CompletedProcess(list(argv), 0, out, "")
        return super().__call__(argv, input)


def test_apply_marks_a_built_in_chain_it_brings_into_an_existing_table():
    rec = ChainsRecorder("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n",
                         backend="nf_tables")
    firewall(rec).apply(udp_plan("--listen", "[::]:1081", ifaces=["lan0"]), "iptables")
    v4 = rec.inputs("iptables-restore")[0]
    assert v4.startswith(f"*filter\n:{fw.MADE_CHAIN}FORWARD - [0:0]\n:{fw.UDP_REJECT_CHAIN} - [0:0]\n")
    assert f":{fw.MADE_MARKER} - [0:0]" in v4  # mangle did not exist: made whole, as before
