"""Errors of the rdax client library.

    RdaxClientError
    ├── GrantRevoked      the node revoked the grant (seal broken, unseal, shutdown, expiry, policy)
    ├── SessionLost       the node ended the session (expiry, QP error, certificate expiry, shutdown)
    └── RemoteError       an RPC failed: .code is the grpc.StatusCode, .details the node's message
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:   # annotations only: the errors import without gRPC
    import grpc


class RdaxClientError(Exception):
    pass


class GrantRevoked(RdaxClientError):
    def __init__(self, grant_id: str, reason: str, epoch: int) -> None:
        self.grant_id, self.reason, self.epoch = grant_id, reason, epoch
        super().__init__(f"grant {grant_id} was revoked ({reason}); the seal is at epoch {epoch}: re-seal and re-grant")


class SessionLost(RdaxClientError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"the node ended this session ({reason}): connect again for a new one")


class RemoteError(RdaxClientError):
    def __init__(self, rpc: str, code: grpc.StatusCode, details: str | None) -> None:
        self.rpc, self.code, self.details = rpc, code, details
        super().__init__(f"{rpc}: {code.name}: {details}")
