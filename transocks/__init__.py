"""transocks: a transparent SOCKS proxy that replaces NAT, and usocksd, the SOCKS5 server at the edge."""

import setproctitle  # noqa: F401  (imported first so it can move environ out of argv's way)


def __getattr__(name: str) -> str:
    """`__version__` from the installed package's metadata: pyproject.toml is the one place it is written
    (read on demand, so a daemon's start-up does not pay for importlib.metadata)."""
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("transocks")
        except PackageNotFoundError:
            return "unknown (not installed)"
    raise AttributeError(f"module 'transocks' has no attribute {name!r}")
