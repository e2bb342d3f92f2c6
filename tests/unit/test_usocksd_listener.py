"""usocksd's listener options: what is set on the socket, and the Fast Open sysctl check."""

from __future__ import annotations

import logging
import socket

import pytest

from transocks.usocksd import listener


def test_nothing_to_prepare_when_both_are_off():
    assert listener.prepare(0.0, 0) is None


def test_defer_accept_and_fastopen_are_set_before_bind(tmp_path):
    sysctl = tmp_path / "tcp_fastopen"
    sysctl.write_text("3\n")
    prepare = listener.prepare(2.5, 16, str(sysctl))
    with socket.socket() as s:
        prepare(s)
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        # The kernel keeps whole seconds, rounded to its SYN-ACK retransmission schedule.
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) >= 3
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN) == 16


@pytest.mark.parametrize("content, warned", [("3\n", False), ("2\n", False), ("1\n", True), (None, True)])
def test_fastopen_without_the_server_bit_is_logged(tmp_path, caplog, content, warned):
    sysctl = tmp_path / "tcp_fastopen"
    if content is not None:
        sysctl.write_text(content)
    with caplog.at_level(logging.WARNING, logger="usocksd"):
        assert listener.prepare(0.0, 16, str(sysctl)) is not None
    assert ("has no effect" in caplog.text) is warned


def test_no_fastopen_check_when_it_is_off(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="usocksd"):
        listener.prepare(5.0, 0, str(tmp_path / "absent"))
    assert not caplog.text
