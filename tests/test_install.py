"""The README's install on a Python that refuses pip (PEP 668), and the init files once installed.

The install runs once per module into a temporary directory (never /opt or
/usr/local on the test machine); the unit check bind-mounts its links over
/usr/local/bin inside a private mount namespace, so the host sees nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INIT = REPO / "init"
INSTALL_TIMEOUT = 300


def _externally_managed_python() -> str | None:
    """A python3 that refuses `pip install` (PEP 668), e.g. Debian's /usr/bin/python3."""
    for candidate in ("/usr/bin/python3", sys.executable):
        if not os.path.exists(candidate):
            continue
        stdlib = subprocess.run([candidate, "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                                capture_output=True, text=True, check=False).stdout.strip()
        if stdlib and os.path.exists(os.path.join(stdlib, "EXTERNALLY-MANAGED")):
            return candidate
    return None


MANAGED = _externally_managed_python()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """./install into (venv, bin) under a temporary directory, over a broken environment there."""
    if MANAGED is None:
        pytest.skip("no externally-managed (PEP 668) python3 here")
    base = tmp_path_factory.mktemp("install")
    venv, bindir = base / "venv", base / "bin"
    # A broken environment, as a failed `python3 -m venv` leaves it: python but no pip.
    subprocess.run([MANAGED, "-m", "venv", "--without-pip", str(venv)], check=True)
    argv = ["sh", str(REPO / "install"), "--venv", str(venv), "--bin", str(bindir)]
    written = base / "written"
    if os.geteuid() == 0:
        # As root, in a mount namespace where /etc and /usr/lib are overlays: what the install writes
        # there is listed, never kept.  With places of its own it writes nothing there.
        layers = base / "layers"
        layers.mkdir()
        script = (f'mount -t tmpfs tmpfs "{layers}" && cd "{layers}" && mkdir etc etc.work lib lib.work'
                  ' && mount -t overlay overlay -o lowerdir=/etc,upperdir=etc,workdir=etc.work /etc'
                  ' && mount -t overlay overlay -o lowerdir=/usr/lib,upperdir=lib,workdir=lib.work /usr/lib'
                  f' && cd / && "$@"; rc=$?; find "{layers}/etc" "{layers}/lib" -mindepth 1 > "{written}"; exit $rc')
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "install", *argv]
    res = subprocess.run(argv, env={**os.environ, "PYTHON": MANAGED}, cwd="/", capture_output=True, text=True,
                         timeout=INSTALL_TIMEOUT, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "making it anew" in res.stderr
    if written.exists():
        assert written.read_text() == "", f"written in /etc or /usr/lib:\n{written.read_text()}"
    return venv, bindir


def test_pip_refuses_the_distribution_python_but_install_works(installed: tuple[Path, Path]) -> None:
    venv, bindir = installed
    assert MANAGED is not None
    refused = subprocess.run([MANAGED, "-m", "pip", "install", "--dry-run", "--no-deps", str(REPO)],
                             capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode != 0
    assert "externally-managed-environment" in refused.stderr or "No module named pip" in refused.stderr
    for script in ("transocks", "usocksd"):
        link = bindir / script
        assert link.is_symlink() and Path(os.readlink(link)) == venv / "bin" / script
        ok = subprocess.run([str(link), "--check-config", "-c", "/dev/null"], capture_output=True, text=True,
                            timeout=60, check=False)
        assert ok.returncode == 0, ok.stderr
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--version"], capture_output=True, check=False)
    assert pip.returncode == 0


def test_license_is_an_spdx_string() -> None:
    """setuptools >= 77 reads `license = "MIT"`; the table form is deprecated (builds break in 2027)."""
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^license = "MIT"$', text, re.MULTILINE)
    assert re.search(r'requires = \["setuptools>=77"\]', text)


def _unit_users() -> set[str]:
    users = set()
    for unit in INIT.glob("*.service"):
        users |= set(re.findall(r"^(?:User|Group)=(\S+)$", unit.read_text(), re.MULTILINE))
    return users


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers not installed")
def test_sysusers_file_creates_the_units_users(tmp_path: Path) -> None:
    """Installed as its comment says, into a scratch root: every User=/Group= of the units exists."""
    sysusers = tmp_path / "etc" / "sysusers.d"
    sysusers.mkdir(parents=True)
    shutil.copy(INIT / "transocks.sysusers", sysusers / "transocks.conf")
    res = subprocess.run(["systemd-sysusers", f"--root={tmp_path}"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    users = {line.split(":")[0] for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0] for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    needed = _unit_users()
    assert needed == {"transocks", "usocksd"}
    assert needed <= users and needed <= groups


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="bind-mounting over /usr/local/bin in a private mount namespace needs root")
def test_systemd_analyze_verify_passes_once_installed(installed: tuple[Path, Path], tmp_path: Path) -> None:
    """The units (and the opt-in rules drop-in) verify with the scripts where ./install links them."""
    _, bindir = installed
    units = [str(u) for u in sorted(INIT.glob("*.service"))]
    dropin = tmp_path / "transocks.service.d"
    dropin.mkdir()
    shutil.copy(INIT / "transocks.service", tmp_path)
    shutil.copy(INIT / "transocks-rules.conf", dropin / "rules.conf")
    units.append(str(tmp_path / "transocks.service"))
    script = f'mount --bind "{bindir}" /usr/local/bin && exec systemd-analyze verify "$@"'
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "verify", *units],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "not executable" not in res.stderr and "Unknown" not in res.stderr


def test_ci_run_installs_venv_and_uses_the_install_script() -> None:
    text = (REPO / ".ci" / "run").read_text()
    assert "python3-venv" in text
    assert "./install --venv" in text


def test_install_help_is_the_help_text_only() -> None:
    res = subprocess.run(["sh", str(REPO / "install"), "--help"], capture_output=True, text=True, timeout=30,
                         check=False)
    assert res.returncode == 0
    assert res.stdout.startswith("Install transocks and usocksd")
    assert "set -eu" not in res.stdout and not any(line.startswith("#") for line in res.stdout.splitlines())
    for flag in ("--venv", "--bin", "--no-link", "--system-only", "--root"):
        assert flag in res.stdout


ACCOUNTS = ("passwd", "group", "shadow", "gshadow")


def _install_root(root: Path, hide_sysusers: bool) -> subprocess.CompletedProcess[str]:
    """`./install --root ROOT --system-only`; with hide_sysusers, on a machine without systemd-sysusers
    (a private mount namespace where it is not executable)."""
    argv = ["sh", str(REPO / "install"), "--root", str(root), "--system-only"]
    sysusers = shutil.which("systemd-sysusers")
    if hide_sysusers and sysusers:
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'mount --bind /dev/null "{sysusers}" && exec "$@"', "hide", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating users (even in a scratch root) needs root")
@pytest.mark.parametrize("hide_sysusers", [False, True], ids=["systemd-sysusers", "useradd"])
def test_install_as_root_puts_the_configuration_sysusers_and_users_in_place(tmp_path: Path,
                                                                            hide_sysusers: bool) -> None:
    if not hide_sysusers and shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers not installed")
    if hide_sysusers and shutil.which("useradd") is None:
        pytest.skip("useradd not installed")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ACCOUNTS:
        if os.path.exists(f"/etc/{name}"):
            shutil.copy(f"/etc/{name}", root / "etc" / name)
    res = _install_root(root, hide_sysusers)
    assert res.returncode == 0, res.stderr
    for name in ("transocks", "usocksd"):
        conf = root / "etc" / name / f"{name}.conf"
        assert conf.read_text() == (REPO / "conf" / f"{name}.conf").read_text()
        assert conf.stat().st_mode & 0o777 == 0o644
    assert (root / "usr/lib/sysusers.d/transocks.conf").read_text() == (INIT / "transocks.sysusers").read_text()
    accounts = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0] for line in (root / "etc/group").read_text().splitlines()}
    for user in _unit_users():
        assert user in groups
        assert accounts[user][5:7] == ["/", "/usr/sbin/nologin"]
        assert int(accounts[user][2]) < 1000  # a system user
    # Run again over an operator's edits: the configuration is never overwritten, the users stay.
    edited = root / "etc" / "transocks" / "transocks.conf"
    edited.write_text("proxy_url = socks5://192.0.2.1:1080\n")
    res = _install_root(root, hide_sysusers)
    assert res.returncode == 0, res.stderr
    assert edited.read_text() == "proxy_url = socks5://192.0.2.1:1080\n"
    assert f"kept {edited}" in res.stderr
    assert (root / "etc/passwd").read_text().count("\ntransocks:") == 1
