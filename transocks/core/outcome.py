"""Outcome names of a finished connection, shared by the access logs of both daemons."""

OK = "ok"
RESET = "reset"
LOOP = "loop"
UPSTREAM_UNREACHABLE = "upstream_unreachable"
UPSTREAM_TIMEOUT = "upstream_timeout"
UPSTREAM_REFUSED = "upstream_refused"
AUTH_FAILED = "auth_failed"
DEST_REFUSED = "dest_refused"
DEST_UNREACHABLE = "dest_unreachable"
PROTOCOL_ERROR = "protocol_error"
IDLE_TIMEOUT = "idle_timeout"
NOT_ALLOWED = "not_allowed"
SHUTDOWN = "shutdown"
AUTH_LIMITED = "auth_limited"  # usocksd: the client reached auth_fail_limit, its login was not checked
RESOURCE_EXHAUSTED = "resource_exhausted"  # this host ran out of descriptors (EMFILE/ENFILE) or buffers
SOURCE_LIMITED = "source_limited"  # transocks: the client address is over max_conns_per_source or conn_rate_per_source
NO_REQUEST = "no_request"  # usocksd: method negotiation done, closed before a request (a health check)
UPSTREAM_CLOSED = "upstream_closed"  # transocks udp: the member ended the association (its control connection)
EVICTED = "evicted"  # transocks udp: the session idle longest, ended for a new flow at udp_max_sessions


class Failure(Exception):
    """A connection that ends before relaying; `outcome` names why in the access log.

    Both daemons raise subclasses (a transocks dialer's `UpstreamError`, a
    usocksd `Refused`), so the outcome travels with the message that explains it.
    """

    def __init__(self, outcome_name: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome_name
