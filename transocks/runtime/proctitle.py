"""Process titles for `ps`, refreshed at most once a second by their callers."""

from __future__ import annotations

import setproctitle as _spt

_last = ""


def set_title(title: str) -> None:
    global _last
    if title != _last:
        _spt.setproctitle(title)
        _last = title
