"""rdax.client: the client library (connect -> Session -> RemoteFile) and the `rdax` CLI."""
from .errors import GrantRevoked, RdaxClientError, RemoteError
from .session import Grant, RemoteFile, Session, connect

__all__ = ["Grant", "GrantRevoked", "RdaxClientError", "RemoteError", "RemoteFile", "Session",
           "connect"]
