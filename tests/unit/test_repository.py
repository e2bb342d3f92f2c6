"""The repository holds source, not binaries: no wheel, archive or compiled object is tracked, and git ignores them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
BINARIES = ("x.whl", "x.tar.gz", "x.tgz", "x.zip", "x.so", "x.so.1", "x.o", "x.a", "x.deb", "x.rpm", "x.exe")

pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                                reason="not a git checkout")


def _git(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True, timeout=60, check=False)


def test_no_binary_is_tracked():
    tracked = _git("ls-files").stdout.splitlines()
    assert tracked
    binaries = [f for f in tracked if f.endswith(tuple(name[1:] for name in BINARIES))]
    assert binaries == []
    large = [f for f in tracked if (REPO / f).is_file() and (REPO / f).stat().st_size > 1_000_000]
    assert large == []


@pytest.mark.parametrize("name", BINARIES)
def test_gitignore_keeps_binaries_out(name):
    assert _git("check-ignore", "-q", "--no-index", name).returncode == 0
