"""UDP through TPROXY: per-datagram original destinations, sessions, associations, transparent replies."""

from __future__ import annotations

from .kernel import prepare_listener
from .service import UdpService, UdpSettings

__all__ = ["UdpService", "UdpSettings", "prepare_listener"]
