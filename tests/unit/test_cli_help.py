"""`--version` on both daemons, read from the package's metadata, and `--help` listing every command on one line."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from transocks.redirector.cli import TransocksApp
from transocks.usocksd.cli import UsocksdApp

REPO = Path(__file__).resolve().parent.parent.parent
RUN = {"transocks": [sys.executable, "-m", "transocks"], "usocksd": [sys.executable, "-m", "transocks.usocksd"]}
APPS = {"transocks": TransocksApp, "usocksd": UsocksdApp}


@pytest.mark.parametrize("name", RUN)
def test_version_is_the_package_version_even_with_an_unreadable_file(name):
    for argv in (["--version"], ["-c", "/nonexistent/file.conf", "--version"]):
        res = subprocess.run([*RUN[name], *argv], capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, res.stderr
        assert res.stdout == f"{name} {version('transocks')}\n"


def test_the_version_is_written_in_pyproject_only():
    wanted = version("transocks")
    assert re.search(rf'^version = "{re.escape(wanted)}"$', (REPO / "pyproject.toml").read_text(), re.M)
    for path in (REPO / "transocks").rglob("*.py"):
        assert f'"{wanted}"' not in path.read_text(), path


@pytest.mark.parametrize("name", RUN)
def test_help_lists_every_command_on_one_line(name):
    res = subprocess.run([*RUN[name], "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    commands = APPS[name]().config().commands.values()
    assert commands
    for command in commands:
        if command.flag.startswith("-"):
            line = rf"^\s+{re.escape(command.flag)} \S.*$"
        else:
            line = rf"^\s+{re.escape(command.flag)}\s+{re.escape(command.help)}$"
        assert re.search(line, res.stdout, re.M), f"{command.flag} not on one line in:\n{res.stdout}"
        assert re.search(rf"^(usage:|      ) {name} {re.escape(command.flag)} ", res.stdout, re.M)
    assert "--version" in res.stdout
