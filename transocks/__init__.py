"""transocks: a transparent SOCKS proxy that replaces NAT, and usocksd, the SOCKS5 server at the edge."""

import setproctitle  # noqa: F401  (imported first so it can move environ out of argv's way)

__version__ = "0.1.0"
