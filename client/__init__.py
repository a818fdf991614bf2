"""rdax.client: the client library (connect -> Session -> RemoteFile) and the `rdax` CLI."""
from .errors import GrantRevoked, RdaxClientError, RemoteError, SessionLost
from .session import Grant, RemoteFile, Session, connect
from .tls import TlsFiles, tls_from_env

__all__ = ["Grant", "GrantRevoked", "RdaxClientError", "RemoteError", "RemoteFile", "Session", "SessionLost",
           "TlsFiles", "connect", "tls_from_env"]
