"""Netfilter and policy-routing state of one namespace, and transocks' one-shot commands run there.

`snapshot` is what "the ruleset is as it was" compares: iptables-save,
ip6tables-save, nft list ruleset, ip rule and every route table, without the
parts that change by themselves (timestamps, counters).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from .netns import Lab

REPO_ROOT = Path(__file__).resolve().parents[2]
_COUNTERS = re.compile(r"\[\d+:\d+\]")
_NFT_COUNTER = re.compile(r"counter packets \d+ bytes \d+")


def snapshot(lab: Lab, ns: str) -> dict[str, str]:
    """The namespace's rules and routes, normalised for comparison."""
    out = {}
    for name, argv in (("iptables", ["iptables-save"]), ("ip6tables", ["ip6tables-save"]),
                       ("nft", ["nft", "list", "ruleset"]), ("rule4", ["ip", "-4", "rule"]),
                       ("rule6", ["ip", "-6", "rule"]), ("route4", ["ip", "-4", "route", "show", "table", "all"]),
                       ("route6", ["ip", "-6", "route", "show", "table", "all"])):
        text = lab.run(ns, argv).stdout
        lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
        text = "\n".join(lines)
        out[name] = _NFT_COUNTER.sub("counter", _COUNTERS.sub("[0:0]", text))
    return out


def transocks(lab: Lab, ns: str, *args: str, check: bool = True, timeout: float = 60,
              env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`transocks ARGS` from this checkout inside `ns` (e.g. `rules --apply ...`, `doctor ...`);
    `env` sets more variables (e.g. a PATH that shows only some tools)."""
    argv = ["env", *(f"{k}={v}" for k, v in (env or {}).items()), f"PYTHONPATH={REPO_ROOT}", sys.executable,
            "-m", "transocks", *args]
    return lab.run(ns, argv, check=check, timeout=timeout)
