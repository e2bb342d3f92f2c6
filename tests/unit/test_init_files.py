"""The service files stop the daemons gracefully, with room above graceful_timeout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from transocks.redirector.settings import SETTINGS

INIT = Path(__file__).resolve().parent.parent.parent / "init"
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
