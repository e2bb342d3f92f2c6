"""Interception methods: how a diverted connection reaches us and where it was going.

Each module (like sshuttle's methods/) has the same interface: `NAME`,
`prepare_listener` (socket options before bind, or None), `destination(sock,
peer)` raising `NotRedirected`.  The firewall rules generator is their
natural companion.
"""

from __future__ import annotations

from types import ModuleType

from . import redirect, tproxy
from .redirect import NotRedirected

METHODS: dict[str, ModuleType] = {redirect.NAME: redirect, tproxy.NAME: tproxy}


def method(tproxy_on: bool) -> ModuleType:
    """The method a configuration asks for (`tproxy = true` or the default REDIRECT)."""
    return tproxy if tproxy_on else redirect


__all__ = ["METHODS", "NotRedirected", "method"]
