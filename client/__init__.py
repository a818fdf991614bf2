"""rdax.client: the client library (connect -> Session -> RemoteFile) and the `rdax` CLI."""
from typing import TYPE_CHECKING, Any

from .errors import GrantRevoked, RdaxClientError, RemoteError, SessionLost
from .tls import TlsFiles, tls_from_env

if TYPE_CHECKING:   # what __getattr__ hands out, for type checkers (at run time it imports on first use)
    from .session import Grant, RemoteFile, Session, connect

__all__ = ["Grant", "GrantRevoked", "RdaxClientError", "RemoteError", "RemoteFile", "Session", "SessionLost",
           "TlsFiles", "connect", "tls_from_env"]

_SESSION_NAMES = ("Grant", "RemoteFile", "Session", "connect")


def __getattr__(name: str) -> Any:
    # The session module imports pyverbs: loaded on first use, so that rdax.client.tls and the errors work on a
    # machine without RDMA (a control-plane tool, the host's tests).
    if name in _SESSION_NAMES:
        from . import session
        return getattr(session, name)
    raise AttributeError(f"module 'rdax.client' has no attribute {name!r}")
