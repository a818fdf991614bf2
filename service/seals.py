"""Seals: a file beneath the export root made stable (prepared, leased, mapped) and shared by the sessions that hold it."""
from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from dataclasses import dataclass, field

from .errors import FailedPrecondition, InvalidArgument, OutOfRange, RdaxError
from .fiemap import read_extents
from .grants import Grant
from .lease import FileLease, lease_state
from .mapping import DaxMapping, MappingError
from .paths import resolve_beneath, split_relpath, unlink_beneath
from .prepare import LEASE_BROKEN, Preparation, PreparedFile, ReadExtents

SEALED = "SEALED"
REVOKED = "REVOKED"


def canonical_path(relpath: str) -> str:
    """The key a seal is known by: `relpath` without '.' and empty components (checked lexically)."""
    return "/".join(split_relpath(relpath))


def check_commit_range(offset: int, length: int, seal_length: int) -> None:
    if length <= 0:
        raise InvalidArgument(f"range at offset {offset} has length {length}: a range to commit must not be empty")
    if offset + length > seal_length:
        raise OutOfRange(f"range [{offset}, {offset + length}) ends past the seal's length {seal_length}: commit "
                         f"ranges inside [0, {seal_length}), or Extend the seal first")


@dataclass(eq=False)
class SealedFile:
    """The kernel resources behind a seal: our only descriptor of the file, its write lease, its shared mapping."""

    fd: int
    lease: FileLease
    mapping: DaxMapping
    prepared: PreparedFile

    def lease_intact(self) -> bool:
        """False once someone else opened or truncated the file (a break downgrades the lease) or the lease is gone."""
        try:
            return lease_state(self.fd) == fcntl.F_WRLCK
        except OSError:
            return False

    def close(self, truncate_to: int | None = None) -> None:
        """munmap, set the size a client declared (if any), release the lease, close the descriptor — each step
        runs even if one before it failed. The size is set before the lease goes: nobody sees the padding go."""
        with contextlib.ExitStack() as steps:  # callbacks run last-in first-out
            steps.callback(os.close, self.fd)
            steps.callback(self.lease.release)
            if truncate_to is not None:
                steps.callback(os.ftruncate, self.fd, truncate_to)
            steps.callback(self.mapping.close)

    def size(self) -> int:
        return os.fstat(self.fd).st_size


def open_sealed_file(root_fd: int, relpath: str, length: int, *, create: bool, map_sync: bool,
                     read_extents: ReadExtents = read_extents, reserve: int | None = None) -> SealedFile:
    """Open `relpath` beneath the root, lease it, make [0, length) stable and map it.

    On failure nothing is left behind: a file this call created is removed, an
    existing one is put back as it was (size, allocation, bytes: prepare.py).
    `read_extents` is where the block map comes from (tests pass stand-ins).
    """
    resolved = resolve_beneath(root_fd, relpath, create=create)
    fd = resolved.fd
    with contextlib.ExitStack() as undo:   # callbacks run last-in first-out
        undo.callback(os.close, fd)
        if resolved.created:   # a Seal that fails leaves no file it made (undone before the close above)
            undo.callback(unlink_beneath, root_fd, resolved.relpath, fd)
        # Lease before preparing: nobody else may write while zero-filled ranges are chosen and written.
        lease = FileLease(fd)
        undo.callback(lease.release)
        # Refuses (unstable extents, no space, ...) before the file is changed at all.
        preparation = Preparation(fd, length, read_extents=read_extents)
        # Put back before the lease is released, so that an opener waiting for it finds the file as it was.
        undo.callback(preparation.undo)
        prepared = preparation.run(lease_intact=lambda: _lease_intact(fd))
        mapping = _map(fd, length, relpath, map_sync, reserve)
        undo.callback(mapping.close)   # unmapped before the file is put back
        if not _lease_intact(fd):
            raise FailedPrecondition(LEASE_BROKEN)
        undo.pop_all()
    return SealedFile(fd, lease, mapping, prepared)


def _lease_intact(fd: int) -> bool:
    """Whether our write lease on `fd` is still whole: not under break by someone opening the file, not gone."""
    try:
        return lease_state(fd) == fcntl.F_WRLCK
    except OSError:
        return False


def _map(fd: int, length: int, relpath: str, map_sync: bool, reserve: int | None = None) -> DaxMapping:
    try:
        return DaxMapping(fd, length, sync=map_sync, reserve=reserve)
    except MappingError as exc:
        if exc.errno in (95, 22) and map_sync:  # EOPNOTSUPP, EINVAL: MAP_SYNC refused
            raise FailedPrecondition(
                f"{relpath!r} cannot be mapped MAP_SYNC: it is not on a DAX filesystem; "
                f"export a directory on a filesystem mounted with -o dax=always") from exc
        raise RdaxError(f"mapping {relpath!r} failed: {exc}") from exc


@dataclass(frozen=True)
class SealInfo:
    """A seal as Stat and List describe it (rdax.v1.SealInfo)."""

    seal_id: str
    path: str
    length: int
    epoch: int
    extent_count: int
    fingerprint: str
    grant_ids: tuple[str, ...]          # the caller's own grants on the seal
    owner_session: str                  # the caller's session if it is the longest-standing holder, else ""
    holder_sessions: tuple[str, ...]    # the caller's own session, if it holds the seal: never another's
    state: str
    revoked_reason: str
    holder_count: int = 0               # every holder, of every identity
    file_size: int = 0                  # st_size when answered


@dataclass(eq=False)
class Seal:
    """A sealed file as the node tracks it: who holds it, what is granted on it, its epoch.

    `file` is None once the seal is revoked: its grants are deregistered and
    its file let go, but the record stays until every holder unseals it.
    A revoked seal's file is let go outside the node's lock (revocation.py), so
    code under that lock touches `file` only while the state is SEALED.
    """

    id: str
    path: str
    length: int
    file: SealedFile | None
    extent_count: int
    fingerprint: str
    epoch: int = 1
    state: str = SEALED
    accepting_grants: bool = True
    revoked_reason: str = ""
    declared_size: int | None = None   # the size a holder declared (Commit/Unseal): set when the file is let go
    watch_key: bytes = b""   # the file's handle as fanotify reports it (fanotify.py)
    holders: dict[str, None] = field(default_factory=dict)   # session ids, in the order they sealed
    grants: dict[str, Grant] = field(default_factory=dict)
    # Held while the file or its mapping is used outside the node's lock (Commit's msync, Extend's preparation):
    # unmapping and closing wait for it. Extend checks accepting_grants as it goes, so that a revocation
    # waits for at most a MiB of its zero-filling.
    io_lock: threading.Lock = field(default_factory=threading.Lock)
    extend_lock: threading.Lock = field(default_factory=threading.Lock)   # one Extend at a time
    # Regions over the mapping that are not in `grants` (changed under the node's lock): registrations in flight,
    # and regions taken out of the tables but not yet deregistered. A revoked seal's file is let go only at 0.
    unsettled: int = 0

    @property
    def mapping(self) -> DaxMapping:
        if self.file is None:
            raise FailedPrecondition(self.revoked_message())
        return self.file.mapping

    def revoked_message(self) -> str:
        return (f"seal {self.id} of {self.path!r} was revoked at epoch {self.epoch} ({self.revoked_reason}): "
                f"seal the path again for a new seal")

    def close_file(self, truncate_to: int | None = None) -> None:
        with self.io_lock:
            if self.file is not None:
                sealed_file, self.file = self.file, None
                sealed_file.close(truncate_to)

    def declare_size(self, size: int) -> None:
        """Remember the size a holder says the file has (pNFS LAYOUTCOMMIT's new size); checked here, set at let-go."""
        if size > self.length:
            raise OutOfRange(f"size {size} is past the seal's length {self.length}: declare at most {self.length}, "
                             f"or seal a longer file")
        if self.file is None or self.state != SEALED:
            raise FailedPrecondition(self.revoked_message())
        current = self.file.size()
        if current > self.length:
            raise FailedPrecondition(
                f"{self.path!r} is {current} bytes long, past the seal's {self.length}: setting its size would cut "
                f"bytes no seal covers; seal the whole file ({-(-current // 4096) * 4096} bytes) to set its size")
        self.declared_size = size

    def info(self, session_id: str) -> SealInfo:
        """The seal as `session_id` may see it: its own grants and session, other holders only as a count."""
        holders = tuple(self.holders)
        mine = (session_id,) if session_id in self.holders else ()
        return SealInfo(self.id, self.path, self.length, self.epoch, self.extent_count, self.fingerprint,
                        tuple(g.id for g in self.grants.values() if g.session_id == session_id),
                        session_id if holders[:1] == mine and mine else "", mine, self.state,
                        self.revoked_reason, len(holders),
                        self.file.size() if self.file is not None and self.state == SEALED else 0)
