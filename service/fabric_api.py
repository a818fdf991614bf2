"""What the node core needs from RDMA (channels per session, regions per grant), without pyverbs so tests can fake
it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# rxe loses data written through ODP memory regions below path MTU 4096
# (LAB-NOTES.md), and every grant over a DAX file is an ODP region.
REQUIRED_MTU = 4096


@dataclass(frozen=True)
class Endpoint:
    """What a peer needs to connect an RC QP: QPN, GID (IPv6 notation), initial PSN, path MTU."""

    qpn: int
    gid: str
    psn: int
    mtu: int


class Region(Protocol):
    """One registered memory region; close() deregisters it, after which remote access through its rkey fails."""

    @property
    def rkey(self) -> int: ...

    def close(self) -> None: ...


class Channel(Protocol):
    """One session's protection domain and the RC QP in it, connected to the client's QP."""

    @property
    def endpoint(self) -> Endpoint: ...

    def register(self, addr: int, length: int, access: int) -> Region:
        """Register [addr, addr+length) of this process in the channel's PD; `access` is an OR of grants.ACCESS_*
        bits."""
        ...

    def failed(self) -> bool:
        """True once the QP is in the error state (after a remote access error, say): the session is unusable."""
        ...

    def close(self) -> None:
        """Destroy the QP and the PD. Can be slow (rxe): the node calls it off the request path."""
        ...


class Fabric(Protocol):
    """Opens channels on the node's RDMA device."""

    def open_channel(self, remote: Endpoint) -> Channel:
        """Allocate a PD and an RC QP in it (remote access WRITE|READ|ATOMIC|FLUSH) and connect it to `remote`."""
        ...
