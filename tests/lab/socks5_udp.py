"""UDP through a SOCKS5 server in the lab: a small RFC 1928 UDP client.

The client is ours (curl cannot do UDP and dante is a server); everything it
sends is built by the shared codec in `transocks.wire.socks5`, or by hand for
what well-behaved clients never send.  Security tests decide by what reached
a `tests.lab.udp.UdpRecorder` (and from which source address), never by usocksd's log.
"""

from __future__ import annotations

import socket

from tests.lab.netns import Lab
from tests.usocksd_fixtures import recv_exact
from transocks.core.netutil import Endpoint
from transocks.wire import socks5

RECV_TIMEOUT = 3.0


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Socks5Udp:
    """One UDP association from the client namespace: a TCP control connection and a UDP socket.

    `send` wraps a payload for a destination (host or name); `recv` unwraps what
    comes back: (source endpoint, payload), or None when nothing arrives in time.
    """

    def __init__(self, lab: Lab, ns: str, proxy: tuple[str, int], source: str | None = None,
                 request: Endpoint | None = None, udp_source: str | None = None) -> None:
        with lab.netns(ns):
            self.control = socket.create_connection(proxy, timeout=10,
                                                    source_address=(source, 0) if source else None)
            self.control.sendall(socks5.greeting(bytes([socks5.NO_AUTH])))
            assert recv_exact(self.control, 2) == b"\x05\x00"
            local = self.control.getsockname()[0]
            self.control.sendall(socks5.udp_associate_request(request or Endpoint(
                "0.0.0.0" if "." in local else "::", 0)))
            ver, self.rep, _, atyp = recv_exact(self.control, 4)
            assert ver == 5
            self.bound = socks5.read_address(lambda n: recv_exact(self.control, n), atyp)
            host = udp_source or local
            self.udp = socket.socket(_family(host), socket.SOCK_DGRAM)
            self.udp.bind((host, 0))
        self.udp.settimeout(RECV_TIMEOUT)

    @property
    def relay(self) -> tuple[str, int]:
        return self.bound.host, self.bound.port

    def send_raw(self, datagram: bytes) -> None:
        self.udp.sendto(datagram, self.relay)

    def send(self, host: str, port: int, payload: bytes, frag: int = 0) -> None:
        datagram = socks5.udp_datagram(socks5.encode_address(Endpoint(host, port)), payload)
        self.send_raw(datagram[:2] + bytes([frag]) + datagram[3:])

    def recv(self, timeout: float = RECV_TIMEOUT) -> tuple[Endpoint, bytes] | None:
        self.udp.settimeout(timeout)
        try:
            data, _ = self.udp.recvfrom(65536)
        except TimeoutError:
            return None
        frag, source, offset = socks5.parse_udp_datagram(data)
        assert frag == 0
        return source, data[offset:]

    def close(self) -> None:
        self.control.close()
        self.udp.close()
