"""Drop capabilities a worker does not need, once the listening sockets exist.

Why: a TPROXY daemon started as root, or with CAP_NET_ADMIN from systemd,
needs that capability for one setsockopt (IP_TRANSPARENT) on its listening
sockets, which the master makes.  A worker parses bytes from the network; if
it is ever subverted it must not be able to rewrite routes or firewall
rules, nor forge packets with raw sockets.  An app whose workers make
transparent sockets themselves (transocks' UDP replies, sent from the
original destination's address) keeps CAP_NET_RAW, which IP_TRANSPARENT
also accepts: still no routes or rules (`App.worker_capabilities`).  The capability leaves every set (effective, permitted, inheritable,
ambient) and the bounding set, so no exec can bring it back.  No library:
capget/capset and prctl through ctypes.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("transocks")

CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
WORKER_DROPS = (CAP_NET_ADMIN, CAP_NET_RAW)

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_LOWER = 3
_PR_CAP_AMBIENT_RAISE = 2
_PR_SET_KEEPCAPS = 8


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def keep_across_setuid(on: bool) -> None:
    """Whether the next setuid from root keeps the permitted set (PR_SET_KEEPCAPS)."""
    if _libc.prctl(_PR_SET_KEEPCAPS, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS) failed")


def retain(caps: tuple[int, ...]) -> tuple[int, ...]:
    """After a setuid that kept the permitted set: hold only `caps` (those still permitted), in
    every set and the ambient one, so the workers forked from here and a master exec'd by an
    upgrade have them as well; returns the ones held."""
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    held_now = [cap for cap in caps if data[cap // 32].permitted >> (cap % 32) & 1]
    masks = [0, 0]
    for cap in held_now:
        masks[cap // 32] |= 1 << (cap % 32)
    for word in (0, 1):
        data[word].effective = data[word].permitted = data[word].inheritable = masks[word]
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    for cap in held_now:
        _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap, 0, 0)
    return tuple(held_now)


def drop(caps: tuple[int, ...] = WORKER_DROPS) -> None:
    """Remove `caps` from this process for good; OSError if the kernel refuses."""
    for cap in caps:
        # Needs CAP_SETPCAP, which an unprivileged process lacks; then its bounding
        # set cannot grant the capability through exec anyway (no file capabilities
        # with NoNewPrivileges), and the sets below still lose it.
        _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
        _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_LOWER, cap, 0, 0)
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    for cap in caps:
        word, bit = divmod(cap, 32)
        mask = ~(1 << bit) & 0xFFFFFFFF
        data[word].effective &= mask
        data[word].permitted &= mask
        data[word].inheritable &= mask
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def held(cap: int, which: str = "CapEff") -> bool:
    """Whether this process has `cap` in the /proc/self/status set `which`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(which + ":"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False
