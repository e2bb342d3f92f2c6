"""The systemd units as shipped: installed by ./install, run under their users and sandboxing, `status` answers.

systemd is not PID 1 on the test machines, so tests/lab/units.py stands in for it:
namespaces of their own play the host (the scratch root that `./install --root` filled laid
over /etc, the test's environment linked where the units expect /usr/local/bin), and each
service runs in a mount namespace of its own with the unit's users, capabilities,
read-only file system and writable directories.  Nothing reaches the real /etc or /run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.lab.units import Machine

REPO = Path(__file__).resolve().parent.parent
INIT = REPO / "init"
SCRIPTS = Path(sys.executable).parent
ACCOUNTS = ("passwd", "group", "shadow", "gshadow")
HIDDEN = ("/root/", "/home/", "/run/user/", "/tmp/", "/var/tmp/")  # ProtectHome=, PrivateTmp= (CI clones under /tmp)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("setpriv") is None or shutil.which("nsenter") is None,
                       reason="needs setpriv and nsenter (util-linux)"),
]


def install_root(root: Path) -> subprocess.CompletedProcess[str]:
    """`./install --root ROOT --system-only` over a copy of this machine's accounts, as an image build would."""
    (root / "etc").mkdir(parents=True, exist_ok=True)
    for name in ACCOUNTS:
        if not (root / "etc" / name).exists() and os.path.exists(f"/etc/{name}"):
            shutil.copy(f"/etc/{name}", root / "etc" / name)
    return subprocess.run(["sh", str(REPO / "install"), "--root", str(root), "--system-only"],
                          capture_output=True, text=True, timeout=120, check=False)


def _service_python() -> str:
    """An interpreter the service users can run: ProtectHome= hides /root and /home (where pyenv lives)."""
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    if not base.startswith(HIDDEN):
        return base
    version = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=False).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.skip(f"the test environment's python ({base}) is under {HIDDEN}, which the units hide, "
                    "and /usr/bin/python3 is another version")
    return "/usr/bin/python3"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The scratch root ./install filled, with /opt/transocks and /usr/local/bin as ./install makes them:
    an environment of the service users' interpreter that reaches this checkout's packages, and links."""
    root = tmp_path / "root"
    res = install_root(root)
    assert res.returncode == 0, res.stderr
    venv = root / "opt" / "transocks"
    subprocess.run([_service_python(), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    ours = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    theirs = Path(_site_packages(venv))
    if not (ours.startswith(HIDDEN) or str(REPO).startswith(HIDDEN)):
        (theirs / "test_environment.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    else:  # a checkout or environment where the units cannot see (HIDDEN): a copy where they look
        shutil.copytree(ours, theirs, symlinks=True, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__editable__*", "pip", "pip-*"))
        shutil.copytree(REPO / "transocks", theirs / "transocks", ignore=shutil.ignore_patterns("__pycache__"))
    bindir = root / "usr" / "local" / "bin"
    bindir.mkdir(parents=True)
    for script in ("transocks", "usocksd"):
        body = (SCRIPTS / script).read_text().split("\n", 1)[1]
        (venv / "bin" / script).write_text(f"#!/opt/transocks/bin/python\n{body}")
        (venv / "bin" / script).chmod(0o755)
        (bindir / script).symlink_to(f"/opt/transocks/bin/{script}")
    return root


def _site_packages(venv: Path) -> str:
    return str(next((venv / "lib").glob("python3*/site-packages")))


def _uid(root: Path, user: str) -> int:
    """The user's uid in the scratch root's accounts (the host's own do not have it)."""
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2])
    raise AssertionError(f"no user {user} in {root}/etc/passwd")


def _status(machine: Machine, name: str) -> dict:
    """`NAME status --json` as an operator types it on the host (root, default configuration)."""
    res = machine.run([f"/usr/local/bin/{name}", "status", "--json"])
    assert res.returncode == 0, f"{name} status: {res.stdout}{res.stderr}"
    return json.loads(res.stdout)


def test_both_units_run_sandboxed_as_their_users_and_answer_status(root: Path, tmp_path: Path) -> None:
    logs = {name: tmp_path / f"{name}.log" for name in ("usocksd", "transocks")}
    with Machine(root, tmp_path / "machine") as machine:
        services = {name: machine.start(INIT / f"{name}.service", logs[name]) for name in logs}
        for name, service in services.items():
            uids = psutil.Process(service.host_pid).uids()
            assert uids.real == uids.effective == _uid(root, name)
            status = _status(machine, name)
            assert status["generation"] == 1 and status["workers"], status
            text = machine.run([f"/usr/local/bin/{name}", "status"])
            assert text.returncode == 0 and "generation 1" in text.stdout, text.stdout + text.stderr
        # `systemctl reload`: the configuration check, then HUP; the new generation answers.
        for name, service in services.items():
            assert machine.reload(service, logs[name]) == 0, logs[name].read_text()[-3000:]
        for name in services:
            status = _status(machine, name)
            assert status["generation"] == 2, status
    for name, log in logs.items():
        assert "no control socket" not in log.read_text(), log.read_text()[-3000:]


def test_reload_with_a_broken_configuration_fails_and_the_daemon_keeps_serving(root: Path, tmp_path: Path) -> None:
    """ExecReload= checks the file before the HUP: `systemctl reload` fails loudly, generation 1 goes on."""
    log = tmp_path / "transocks.log"
    with Machine(root, tmp_path / "machine") as machine:
        service = machine.start(INIT / "transocks.service", log)
        conf = root / "etc" / "transocks" / "transocks.conf"
        conf.write_text(conf.read_text() + "\nno_such_setting = 1\n")
        assert machine.reload(service, log) != 0
        assert "unknown setting 'no_such_setting'" in log.read_text()
        assert _status(machine, "transocks")["generation"] == 1
