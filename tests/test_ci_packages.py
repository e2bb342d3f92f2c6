""".ci/run installs daemons for the tests without starting them on the machine it runs on.

A package's maintainer script starts its service with `invoke-rc.d NAME start`
(dh_installinit), which asks /usr/sbin/policy-rc.d first.  The test runs
`.ci/run --packages-only` with an apt-get stand-in that does exactly that for tinyproxy, in
namespaces of its own (network, PID, and a mount namespace where /usr/sbin is an overlay
and /run, /var/log are fresh), so whatever starts is seen there and dies with them.  The
overlay plays a booted host (in runlevel 2, with no policy-rc.d or one that allows everything), not the
container image the tests may run in, whose policy-rc.d forbids starts already.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# squid, danted, tinyproxy, vsftpd: the daemons .ci/run installs, on their packaged ports.
DAEMON_PORTS = {3128, 1080, 8888, 21}

APT_GET = """#!/bin/sh
# apt-get stand-in: `install` runs what tinyproxy's postinst runs, nothing is downloaded.
[ "$1" = install ] || exit 0
for arg; do
    [ "$arg" = tinyproxy ] && invoke-rc.d tinyproxy start
done
exit 0
"""
# Safety net: .ci/run's next step (./install, then pytest) must not run from this test.
SH = """#!/bin/bash
[ "${1:-}" = ./install ] && { echo "stand-in: no ./install in this test" >&2; exit 99; }
exec /bin/sh "$@"
"""

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("invoke-rc.d") is None or not Path("/etc/init.d/tinyproxy").exists(),
                       reason="needs invoke-rc.d and tinyproxy's init script (Debian)"),
]


def _run_ci(tmp_path: Path, existing_policy: str | None) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in (("apt-get", APT_GET), ("sh", SH)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    policy = "rm -f /usr/sbin/policy-rc.d"
    if existing_policy is not None:
        policy = f"printf %s {_quote(existing_policy)} > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d"
    script = f"""
set -e
ip link set lo up
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/log
mount -t tmpfs tmpfs {scratch}
mkdir {scratch}/upper {scratch}/work
mount -t overlay overlay -o lowerdir=/usr/sbin,upperdir={scratch}/upper,workdir={scratch}/work /usr/sbin
{policy}
# invoke-rc.d starts only what the current runlevel links (/etc/rc2.d/S01tinyproxy on a booted
# sysvinit host); a container has none, so this one says 2.
rm -f /usr/sbin/runlevel && printf '#!/bin/sh\necho N 2\n' > /usr/sbin/runlevel && chmod 0755 /usr/sbin/runlevel
set +e
PATH={stubs}:$PATH bash {REPO}/.ci/run --packages-only > {tmp_path}/ci.log 2>&1
echo "$?" > {tmp_path}/ci.rc
echo "== listening"; ss -ltnH
echo "== processes"; ps -e -o comm=
echo "== policy"; cat /usr/sbin/policy-rc.d 2>/dev/null || echo "(none)"
"""
    res = subprocess.run(["unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc", "--propagation",
                          "private", "bash", "-c", script], capture_output=True, text=True, timeout=300, check=False)
    parts: dict[str, str] = {}
    for chunk in res.stdout.split("== ")[1:]:
        head, _, body = chunk.partition("\n")
        parts[head] = body
    return res, parts


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


@pytest.mark.parametrize("existing_policy", [None, "#!/bin/sh\nexit 0\n"], ids=["no-policy", "permissive-policy"])
def test_ci_install_starts_no_daemon_and_leaves_policy_as_found(tmp_path: Path, existing_policy: str | None) -> None:
    res, parts = _run_ci(tmp_path, existing_policy)
    assert {"listening", "processes", "policy"} <= set(parts), res.stdout + res.stderr
    ports = {int(line.split()[3].rpartition(":")[2]) for line in parts["listening"].splitlines() if line.strip()}
    log = (tmp_path / "ci.log").read_text()
    assert not ports & DAEMON_PORTS, f"listening after .ci/run: {sorted(ports)}\n{log}"
    assert "tinyproxy" not in parts["processes"].split(), parts["processes"]
    assert parts["policy"] == (existing_policy or "(none)\n")
    assert (tmp_path / "ci.rc").read_text().strip() == "0", log
