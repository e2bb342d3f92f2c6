"""Settings reach file, environment and flags; errors name the key and the file."""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transocks.core.config import Config, ConfigError, seconds, size
from transocks.core.netutil import Endpoint
from transocks.redirector.cli import TransocksApp
from transocks.redirector.settings import SETTINGS
from transocks.usocksd.settings import SETTINGS as USOCKSD_SETTINGS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(argv, env=None):
    from transocks.core.config import Config

    return Config("transocks", SETTINGS, "TRANSOCKS", "/nonexistent/transocks.conf").load(argv, env or {})


def test_defaults():
    cfg = load([])
    assert cfg.listen == [Endpoint("127.0.0.1", 1081), Endpoint("::1", 1081)]
    assert [str(u) for u in cfg.proxy_url] == ["socks5://127.0.0.1:1080"]
    assert cfg.connect_timeout == 5.0 and cfg.handshake_timeout == 10.0
    assert cfg.idle_timeout == 0.0 and cfg.half_close_timeout == 60.0
    assert cfg.sources["proxy_url"] == "default"


def test_embedded_default_file_matches_built_in_defaults():
    path = os.path.join(REPO, "conf", "transocks.conf")
    from_file = load(["-c", path])
    built_in = load([])
    assert from_file.values == built_in.values
    assert from_file.sources["listen"] == f"file {path}"


@pytest.mark.parametrize("conf, settings", [("transocks.conf", SETTINGS), ("usocksd.conf", USOCKSD_SETTINGS)])
def test_every_setting_is_in_the_embedded_file(conf, settings):
    with open(os.path.join(REPO, "conf", conf), encoding="utf-8") as f:
        text = f.read()
    for name in (s.name for s in settings):
        assert f"\n{name} =" in text or f"\n# {name} =" in text, name


def test_precedence_flag_over_env_over_file(tmp_path):
    f = tmp_path / "t.conf"
    f.write_text("connect_timeout = 3\nhandshake-timeout: 7\nidle_timeout = 2m\nlisten = [::]:2000\n")
    env = {"TRANSOCKS_HANDSHAKE_TIMEOUT": "8", "TRANSOCKS_IDLE_TIMEOUT": "90"}
    cfg = load(["-c", str(f), "--idle-timeout", "100ms", "--listen", "127.0.0.1:3000", "--listen", "[::1]:3000"], env)
    assert cfg.connect_timeout == 3.0 and cfg.sources["connect_timeout"] == f"file {f}"
    assert cfg.handshake_timeout == 8.0 and cfg.sources["handshake_timeout"] == "environment TRANSOCKS_HANDSHAKE_TIMEOUT"
    assert cfg.idle_timeout == 0.1 and cfg.sources["idle_timeout"] == "command line"
    assert cfg.listen == [Endpoint("127.0.0.1", 3000), Endpoint("::1", 3000)]


def test_file_list_and_env_list(tmp_path):
    f = tmp_path / "t.conf"
    f.write_text("listen = 127.0.0.1:1, [::1]:2\n")
    assert load(["-c", str(f)]).listen == [Endpoint("127.0.0.1", 1), Endpoint("::1", 2)]
    assert load([], {"TRANSOCKS_LISTEN": "[::]:9"}).listen == [Endpoint("::", 9)]


def test_an_empty_list_in_the_file_is_empty_and_listen_needs_one(tmp_path):
    """`udp_reject_ports =` lets QUIC through and `sniff_ports =` turns sniffing off, as their help says
    (the file read a bare value as "true"); `listen =` is refused rather than a daemon with no listener."""
    f = tmp_path / "t.conf"
    f.write_text("udp_reject_ports =\nsniff_ports =\nverify_names =\n")
    cfg = load(["-c", str(f)])
    assert (cfg.udp_reject_ports, cfg.sniff_ports, cfg.verify_names) == ([], [], True)
    f.write_text("listen =\n")
    with pytest.raises(ConfigError, match="listen needs at least one value"):
        load(["-c", str(f)])
    with pytest.raises(ConfigError, match="listen needs at least one value"):
        load([], {"TRANSOCKS_LISTEN": ""})


def test_a_comment_after_a_value(tmp_path):
    """README's examples write `value   # why`, as nginx, HAProxy and Squid files do; the comment was
    read as part of the value (a route's target, a proxy URL). A quoted value keeps its `#`."""
    f = tmp_path / "t.conf"
    f.write_text("proxy_url = socks5://192.0.2.1:1080   # the edge\n"
                 "route = listen=1082 -> direct        # the backup job\n"
                 "pidfile = '/run/a #1.pid'   # quoted, then a comment\n"
                 "user = # nobody yet\n")
    cfg = load(["-c", str(f)])
    assert [str(u) for u in cfg.proxy_url] == ["socks5://192.0.2.1:1080"]
    assert str(cfg.route[0]) == "listen=1082 -> direct"
    assert cfg.pidfile == "/run/a #1.pid"
    assert cfg.user is None  # not "true": only a boolean takes a bare `name =` as on


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.conf"
    f.write_text("proxy_ulr = socks5://x:1\n")
    with pytest.raises(ConfigError, match=rf"{f}: unknown setting 'proxy_ulr'"):
        load(["-c", str(f)])


def test_bad_value_names_key_and_file(tmp_path):
    f = tmp_path / "bad.conf"
    f.write_text("connect_timeout = soon\n")
    with pytest.raises(ConfigError, match=rf"{f}: connect_timeout = 'soon'"):
        load(["-c", str(f)])
    f.write_text("proxy_url = gopher://x:1\n")
    with pytest.raises(ConfigError, match="unsupported proxy scheme"):
        load(["-c", str(f)])


def test_bad_flag_and_env_values():
    with pytest.raises(ConfigError, match="listen"):
        load(["--listen", "localhost:80"])
    with pytest.raises(ConfigError, match="TRANSOCKS_WORKERS"):
        load([], {"TRANSOCKS_WORKERS": "0"})
    with pytest.raises(ConfigError):
        load(["--no-such-flag"])


def test_missing_config_file_is_an_error():
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(["-c", "/nonexistent/x.conf"])


def test_print_config_shows_sources(tmp_path):
    f = tmp_path / "t.conf"
    f.write_text("proxy_url = http://u:secret@192.0.2.1:3128\n")
    text = load(["-c", str(f)]).format()
    assert "proxy_url" in text and "http://u@192.0.2.1:3128" in text and "secret" not in text
    assert f"file {f}" in text


def test_app_uses_default_path_only_when_present():
    assert TransocksApp().load_config([]).config_file in (None, "/etc/transocks/transocks.conf")


NON_FINITE = ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "nan ms", "infs", "1e308h", "-1e999m"]


@pytest.mark.parametrize("settings", [SETTINGS, USOCKSD_SETTINGS], ids=["transocks", "usocksd"])
def test_no_numeric_setting_takes_nan_or_inf(settings):
    """A connect_timeout of nan never fires: every setting that reads a number refuses nan and inf."""
    numeric = []
    for s in settings:
        convert = s.convert_item if s.multiple else s.type
        try:
            sample = convert("5")
        except (ValueError, TypeError):
            continue
        if isinstance(sample, (int, float)) and not isinstance(sample, bool):
            numeric.append(s)
            for text in NON_FINITE:
                with pytest.raises(ValueError):
                    convert(text)
    assert {"connect_timeout", "graceful_timeout", "max_worker_memory"} <= {s.name for s in numeric}
    with pytest.raises(ConfigError, match="connect_timeout = 'nan'.*finite"):
        Config("x", settings, "X", "/nonexistent").load(["--connect-timeout", "nan"], {})


@given(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "s", "ms", "m", "h", "k", "M"]))
def test_seconds_and_size_are_finite_or_refused(number, suffix):
    for convert in (seconds, size):
        try:
            got = convert(f"{number!r}{suffix}")
        except ValueError:
            continue
        assert math.isfinite(got) and got >= 0
