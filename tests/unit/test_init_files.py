"""The service files: they stop the daemons gracefully, keep their control sockets where the defaults are,
and check the configuration before a start or a reload."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from transocks.redirector.settings import SETTINGS
from transocks.usocksd.settings import SETTINGS as USOCKSD_SETTINGS

REPO = Path(__file__).resolve().parent.parent.parent
INIT = REPO / "init"
CONF = REPO / "conf"
INSTALL = REPO / "install"
GRACE = next(s.default for s in SETTINGS if s.name == "graceful_timeout")


@pytest.mark.parametrize("unit", ["transocks.service", "usocksd.service"])
def test_systemd_unit_stops_with_quit_above_graceful_timeout(unit):
    text = (INIT / unit).read_text()
    assert re.search(r"^KillSignal=SIGQUIT$", text, re.M)
    assert re.search(r"^KillMode=mixed$", text, re.M)
    assert int(re.search(r"^TimeoutStopSec=(\d+)$", text, re.M).group(1)) > GRACE


@pytest.mark.parametrize("script", ["transocks.openrc", "usocksd.openrc"])
def test_openrc_stops_with_quit_above_graceful_timeout(script):
    retry = re.search(r'^retry="QUIT/(\d+)/KILL/\d+"$', (INIT / script).read_text(), re.M)
    assert retry and int(retry.group(1)) > GRACE


def _service(unit: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in (INIT / unit).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            keys.setdefault(key, []).append(value)
    return keys


DAEMONS = [("transocks", SETTINGS), ("usocksd", USOCKSD_SETTINGS)]


@pytest.mark.parametrize(("name", "settings"), DAEMONS)
def test_runtime_directory_holds_the_default_control_socket(name, settings):
    """ProtectSystem=strict leaves only RuntimeDirectory= writable under /run: the socket's default lives there,
    and so does the one the shipped configuration names."""
    control = next(s.default for s in settings if s.name == "control_socket")
    assert _service(f"{name}.service")["RuntimeDirectory"] == [name]
    assert os.path.dirname(control) == f"/run/{name}"
    shipped = re.search(r"^control_socket = (\S+)$", (CONF / f"{name}.conf").read_text(), re.M)
    assert shipped and shipped.group(1) == control
    assert next(s.default for s in settings if s.name == "pidfile") is None


@pytest.mark.parametrize("name", ["transocks", "usocksd"])
def test_start_and_reload_check_the_configuration_first(name):
    keys = _service(f"{name}.service")
    (start,) = keys["ExecStart"]
    check = f"{start} --check-config"
    assert keys["ExecStartPre"][0] == check
    assert keys["ExecReload"] == [check, "/bin/kill -HUP $MAINPID"]


@pytest.mark.parametrize("name", ["transocks", "usocksd"])
def test_units_read_the_files_install_puts_in_etc(name):
    """The unit's -c FILE is where ./install copies conf/NAME.conf."""
    (start,) = _service(f"{name}.service")["ExecStart"]
    assert f"-c /etc/{name}/{name}.conf" in start
    assert (CONF / f"{name}.conf").exists()
    assert '"conf/$name.conf" "$conf"' in INSTALL.read_text()
