"""usocksd's settings: the embedded default file, env prefix, rule values, credentials at load time."""

from __future__ import annotations

import ipaddress
import os

import pytest

from transocks.core.config import Config, ConfigError
from transocks.core.netutil import Endpoint
from transocks.usocksd import credentials as cr
from transocks.usocksd.cli import (
    DEFAULT_CONFIG,
    DESCRIPTION,
    UsocksdApp,
    _load_credentials,
)
from transocks.usocksd.settings import SETTINGS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(argv, env=None):
    return Config("usocksd", SETTINGS, "USOCKSD", "/nonexistent/usocksd.conf", DESCRIPTION,
                  validate=_load_credentials).load(argv, env or {})


def test_defaults():
    cfg = load([])
    assert cfg.listen == [Endpoint("127.0.0.1", 1080), Endpoint("::1", 1080)]
    assert cfg.allow_from == [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert cfg.auth_file is None and cfg.credentials is None
    assert cfg.allow_dest == [] and cfg.deny_dest == [] and cfg.dest_policy == "allow"
    assert cfg.egress_address == [] and cfg.socks4 is True


def test_embedded_default_file_matches_built_in_defaults():
    path = os.path.join(REPO, "conf", "usocksd.conf")
    from_file = load(["-c", path])
    assert from_file.values == load([]).values
    assert from_file.sources["allow_from"] == f"file {path}"
    assert from_file.sources["negotiation_timeout"] == f"file {path}"


def test_flags_env_and_file(tmp_path):
    f = tmp_path / "u.conf"
    f.write_text("deny_dest = 127.0.0.0/8, ::1, *:25\nallow_dest = .example.com:443\ndest_policy = deny\n")
    cfg = load(["-c", str(f), "--allow-from", "192.0.2.0/24", "--allow-from", "2001:db8:c::/64",
                "--egress-address", "198.51.100.21"], {"USOCKSD_EGRESS_INTERFACE": "eth1"})
    assert [str(r) for r in cfg.deny_dest] == ["127.0.0.0/8", "::1", "*:25"]
    assert str(cfg.allow_dest[0].target).startswith(".") and cfg.dest_policy == "deny"
    assert cfg.allow_from == [ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8:c::/64")]
    assert cfg.egress_address == [ipaddress.ip_address("198.51.100.21")]
    assert cfg.egress_interface == "eth1" and cfg.sources["egress_interface"] == "environment USOCKSD_EGRESS_INTERFACE"


def test_bad_values_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="deny_dest"):
        load(["--deny-dest", "example.com:http"])
    with pytest.raises(ConfigError, match="allow_from"):
        load(["--allow-from", "10.0.0.1/8"])
    f = tmp_path / "u.conf"
    f.write_text("egress_address = eth0\n")
    with pytest.raises(ConfigError, match=rf"{f}: egress_address = 'eth0'"):
        load(["-c", str(f)])


def test_credentials_are_loaded_with_the_configuration(tmp_path, monkeypatch):
    monkeypatch.setattr(cr, "SCRYPT_LN", 4)
    users = tmp_path / "users"
    users.write_text(f"alice:{cr.hash_password('wonder')}\n")
    cfg = load(["--auth-file", str(users)])
    assert cfg.credentials.check("alice", "wonder")
    users.write_text("alice:plaintext\n")
    with pytest.raises(ConfigError, match=r"auth_file: .*users:1: user 'alice'"):
        load(["--auth-file", str(users)])
    with pytest.raises(ConfigError, match="cannot read credentials file"):
        load(["--auth-file", str(tmp_path / "missing")])


def test_help_is_the_manual():
    text = Config("usocksd", SETTINGS, "USOCKSD", DEFAULT_CONFIG, DESCRIPTION).help_text()
    for words in ("DESTINATION RULES", "*.example.com", "Deny wins", "--hash-password", "$scrypt$ln=14,r=8,p=1$",
                  "USOCKSD_ALLOW_FROM", "/etc/usocksd/usocksd.conf", "07 command not supported"):
        assert words in text, words


def test_app_uses_default_path_only_when_present():
    assert UsocksdApp().load_config([]).config_file in (None, DEFAULT_CONFIG)
