"""What both daemons share: settings, logs, outcomes, addresses, non-blocking I/O and the relay.

Imports nothing from the rest of the package."""
