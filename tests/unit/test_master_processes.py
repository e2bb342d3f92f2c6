"""The generic runtime with a stand-in app, on loopback: boot failures, CLI checks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAILING_APP = textwrap.dedent(
    """
    import sys
    from transocks.core import logs
    from transocks.core.config import Config
    from transocks.runtime.master import serve
    from transocks.runtime.settings import runtime_settings

    class FailingApp:
        name = "failapp"

        def load_config(self, argv):
            return Config(self.name, runtime_settings(["127.0.0.1:18931"]), "FAILAPP", "/nonexistent").load(argv, {})

        def setup_logging(self, cfg):
            logs.setup(self.name, "-", "info", "off")

        def listen(self, cfg):
            return list(cfg.listen)

        def prepare_listener(self, cfg):
            return None

        def make_handler(self, cfg):
            raise RuntimeError("cannot start: boom")

    sys.exit(serve(FailingApp(), sys.argv[1:]))
    """
)


def run(args, env=None):
    env = dict(os.environ if env is None else env, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)


def test_master_exits_nonzero_when_workers_keep_failing_to_boot():
    res = run(["-c", FAILING_APP, "--workers", "2"])
    assert res.returncode == 3, res.stderr
    assert "cannot start: boom" in res.stderr
    assert "workers failed to boot 5 times in a row; exiting" in res.stderr


def test_check_config_and_print_config(tmp_path):
    ok = run(["-m", "transocks", "--check-config", "-c", os.path.join(REPO, "conf", "transocks.conf")])
    assert ok.returncode == 0 and "configuration ok" in ok.stdout
    bad = tmp_path / "bad.conf"
    bad.write_text("half_close_timeout = soon\n")
    res = run(["-m", "transocks", "--check-config", "-c", str(bad)])
    assert res.returncode == 2
    assert f"{bad}: half_close_timeout = 'soon'" in res.stderr
    shown = run(["-m", "transocks", "--print-config", "--proxy-url", "http://192.0.2.1:3128"],
                env=dict(os.environ, TRANSOCKS_IDLE_TIMEOUT="5m"))
    assert shown.returncode == 0
    # The names are padded to the longest one's width.
    assert re.search(r"^proxy_url += http://192\.0\.2\.1:3128    # command line$", shown.stdout, re.M)
    assert re.search(r"^idle_timeout += 300\.0    # environment TRANSOCKS_IDLE_TIMEOUT$", shown.stdout, re.M)


def test_help_is_the_reference_manual():
    res = run(["-m", "transocks", "--help"])
    assert res.returncode == 0
    for flag in ("--listen", "--proxy-url", "--connect-timeout", "--handshake-timeout", "--idle-timeout",
                 "--half-close-timeout", "--workers", "--graceful-timeout", "--access-log-format", "TRANSOCKS_PROXY_URL"):
        assert flag in res.stdout
