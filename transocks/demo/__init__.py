"""`transocks demo`: the whole chain, client -> transocks -> two usocksd edges -> a web server, in network
namespaces of its own, shown step by step and removed afterwards, also on Ctrl-C, SIGTERM or failure.

sandbox.py makes and removes the namespaces, files and processes; tour.py starts the chain and tells
the steps.  Neither imports the daemons: they run as the installed commands would, from files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import traceback
from collections.abc import Sequence

from .sandbox import ENDING_SIGNALS, Sandbox, SandboxError, reap_stale
from .tour import StepFailed, Tour

REQUIRED_TOOLS = ("ip",)
FIREWALL_TOOLS = ("iptables-restore", "nft")


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived: unwind through the teardown."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def say(line: str) -> None:
    print(line, flush=True)


def why_not_here() -> str | None:
    """Why the demo cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "needs root: it builds network namespaces and applies firewall rules inside them (try: sudo transocks demo)"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if not any(shutil.which(t) for t in FIREWALL_TOOLS):
        missing.append(" or ".join(FIREWALL_TOOLS))
    if missing:
        return "needs " + ", ".join(missing) + " (Debian: apt-get install iproute2 iptables)"
    return None


def _pause(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 600:  # also refuses nan
        raise argparse.ArgumentTypeError("a pause is 0 to 600 seconds")
    return value


def demo_command(argv: Sequence[str]) -> int:
    """Run the demo; 0 when every step showed what it should, 1 when one did not, 2 when it cannot run here,
    128+N after signal N."""
    parser = argparse.ArgumentParser(
        prog="transocks demo", allow_abbrev=False,
        description="Build network namespaces of its own (documentation addresses, no link to a real interface), "
                    "start a web server, two usocksd edges that refuse one name and transocks with its rules "
                    "applied, then show a transparent curl served, the denied name refused and one edge stopped "
                    "with traffic going on, each with the daemons' new access-log lines.  Everything it made is "
                    "removed at the end, also on Ctrl-C, SIGTERM or failure.  Needs root.")
    parser.add_argument("--pause", type=_pause, default=0.0, metavar="SECONDS",
                        help="wait this long after each step, to read along (default 0)")
    args = parser.parse_args(list(argv))
    problem = why_not_here()
    if problem:
        print(f"transocks demo: {problem}", file=sys.stderr)
        return 2
    previous = {sig: signal.getsignal(sig) for sig in ENDING_SIGNALS}
    # SIGINT too: a shell that starts a command in the background hands it SIGINT ignored, and
    # Python then installs no KeyboardInterrupt; Ctrl-C and `kill -INT` must still end the demo.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
    sandbox: Sandbox | None = None
    rc = 1
    try:
        for prefix in reap_stale():
            say(f"transocks demo: removed what an earlier, killed demo left ({prefix}-*)")
        sandbox = Sandbox()
        say(f"transocks demo: the whole chain in namespaces of its own, prefix {sandbox.prefix}")
        Tour(sandbox, say, args.pause).run()
        say("")
        say("All 3 steps succeeded.")
        rc = 0
    except Interrupted as exc:
        say(f"\ntransocks demo: interrupted ({exc})")
        rc = 128 + exc.signum
    except (SandboxError, StepFailed) as exc:
        say(f"\ntransocks demo: FAILED: {exc}")
    except Exception:  # noqa: BLE001 - an unforeseen failure still removes everything first
        say("\ntransocks demo: FAILED:\n" + traceback.format_exc())
    finally:
        for sig in ENDING_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if sandbox is not None:
            say("")
            for line in sandbox.close():
                say(f"  cleanup: {line}")
            left = sandbox.leftovers()
            if left:
                say(f"transocks demo: could not remove: {', '.join(left)}")
                rc = rc or 1
            else:
                say(f"transocks demo: removed everything it made ({sandbox.prefix}-*)")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return rc
