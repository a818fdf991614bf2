"""Grants: checking a request for remote access to a range of a seal, and the grant it becomes."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidArgument, OutOfRange
from .fabric_api import Region

PAGE_SIZE = 4096

# The values of rdax.v1.Access, which are also rdax.rdma.Access's.
ACCESS_WRITE = 1
ACCESS_READ = 2
ACCESS_ATOMIC = 4   # ATOMIC_WRITE, 8 bytes
ACCESS_FLUSH = 8    # FLUSH to persistence
ACCESS_NAMES = {ACCESS_WRITE: "WRITE", ACCESS_READ: "READ", ACCESS_ATOMIC: "ATOMIC", ACCESS_FLUSH: "FLUSH"}
KNOWN_ACCESS = ACCESS_WRITE | ACCESS_READ | ACCESS_ATOMIC | ACCESS_FLUSH


def access_label(access: int) -> str:
    """'WRITE|FLUSH' for 9."""
    return "|".join(name for bit, name in ACCESS_NAMES.items() if access & bit) or "NONE"


def check_access(access: int) -> None:
    if access == 0:
        raise InvalidArgument("access is 0: ask for an OR of WRITE=1, READ=2, ATOMIC=4, FLUSH=8")
    unknown = access & ~KNOWN_ACCESS
    if unknown:
        raise InvalidArgument(
            f"access {access:#x} has unknown bits {unknown:#x}: only WRITE=1, READ=2, ATOMIC=4, FLUSH=8 exist")
    if access & ACCESS_ATOMIC and not access & ACCESS_WRITE:
        # rxe checks ATOMIC_WRITE against remote-write permission, so the region
        # needs it anyway: an ATOMIC-only grant would silently allow RDMA WRITE.
        raise InvalidArgument(
            f"access {access_label(access)} has ATOMIC without WRITE: an ATOMIC_WRITE region must allow "
            f"remote writes, so ask for {access_label(access | ACCESS_WRITE)}")


def check_range(offset: int, length: int, seal_length: int) -> None:
    """A grant covers whole pages inside the seal."""
    if offset % PAGE_SIZE:
        raise InvalidArgument(f"offset {offset} is not a multiple of {PAGE_SIZE}: grants cover whole pages")
    if length <= 0:
        raise InvalidArgument(f"length {length} must be positive: it is the number of bytes to grant from offset")
    if length % PAGE_SIZE:
        raise InvalidArgument(f"length {length} is not a multiple of {PAGE_SIZE}: grants cover whole pages")
    if offset + length > seal_length:
        if offset >= seal_length:   # "at most 0 bytes" would be a remedy the node refuses
            raise OutOfRange(
                f"[{offset}, {offset + length}) ends past the seal's length {seal_length}: the offset is at or past "
                f"its end; grant from an offset below {seal_length}, or Extend the seal to {offset + length} bytes")
        raise OutOfRange(
            f"[{offset}, {offset + length}) ends past the seal's length {seal_length}: "
            f"grant at most {seal_length - offset} bytes at offset {offset}, or Extend the seal to "
            f"{offset + length} bytes")


@dataclass(frozen=True)
class GrantDescriptor:
    """What a client needs to reach a grant: where to write and with what key (rdax.v1.GrantDescriptor)."""

    grant_id: str
    seal_id: str
    remote_addr: int
    rkey: int
    offset: int
    length: int
    access: int
    epoch: int
    expires_unix_ms: int   # 0: ends with the session
    write_alignment: int = 1   # WRITE/READ start addresses: multiples of this (the node's canary measures it)


@dataclass(eq=False)
class Grant:
    """One memory region over [offset, offset+length) of a seal's mapping, in one session's PD."""

    id: str
    seal_id: str
    session_id: str
    offset: int
    length: int
    access: int
    epoch: int
    remote_addr: int
    region: Region
    rkey: int
    expires_at: float | None      # on the node's monotonic clock; None: ends with the session
    expires_unix_ms: int

    def descriptor(self, write_alignment: int = 1) -> GrantDescriptor:
        """What the client gets; `write_alignment` is the node's (its canary measured it)."""
        return GrantDescriptor(self.id, self.seal_id, self.remote_addr, self.rkey, self.offset, self.length,
                               self.access, self.epoch, self.expires_unix_ms, write_alignment)
