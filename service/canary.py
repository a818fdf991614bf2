"""The start-up canary: prove that RDMA WRITEs through an ODP region land in full at the configured path MTU."""
# rxe loses data silently on ODP memory regions below path MTU 4096: the work
# completion says success while part of each page never lands (LAB-NOTES.md).
# So before serving, the node writes a random pattern into a file prepared
# like a seal, over two of its own QPs connected to each other, and reads it
# back with pread.
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from rdax.rdma import Access, Chunk, Connection, Device, LocalBuffer, VerbsError, register

from .mapping import DaxMapping
from .paths import resolve_beneath
from .prepare import prepare_file

CANARY_NAME = ".rdax-canary"
CANARY_BYTES = 64 * 1024


class CanaryFailed(Exception):
    """The data path loses or refuses writes: the node must not serve."""


@dataclass(frozen=True)
class CanaryResult:
    mtu: int
    length: int
    odp: bool


def run_canary(device: Device, export_root: str, mtu: int, *, map_sync: bool = True,
               length: int = CANARY_BYTES) -> CanaryResult:
    """Write `length` random bytes into `export_root`/.rdax-canary by RDMA at `mtu`; raise CanaryFailed unless all land."""
    pattern = os.urandom(length)
    with contextlib.ExitStack() as cleanup:
        root_fd = os.open(export_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        cleanup.callback(os.close, root_fd)
        _remove(root_fd)   # a stale one from a crash
        fd = resolve_beneath(root_fd, CANARY_NAME, create=True).fd
        cleanup.callback(_remove, root_fd)
        cleanup.callback(os.close, fd)
        prepare_file(fd, length)
        mapping = cleanup.enter_context(DaxMapping(fd, length, sync=map_sync))
        odp = _write_through_odp(device, mtu, mapping, pattern)
        landed = os.pread(fd, length, 0)
    lost = sum(1 for want, got in zip(pattern, landed) if want != got)
    if lost:
        raise CanaryFailed(
            f"canary: {lost} of {length} bytes RDMA-written at path MTU {mtu} did not reach "
            f"{os.path.join(export_root, CANARY_NAME)}, although every write completed successfully: rxe loses data "
            f"on ODP memory regions below path MTU 4096 (a kernel bug, see LAB-NOTES.md); start with --mtu 4096 "
            f"on a netdev whose MTU allows it (e.g. 9000)")
    return CanaryResult(mtu, length, odp)


def _write_through_odp(device: Device, mtu: int, mapping: DaxMapping, pattern: bytes) -> bool:
    """One QP writes `pattern` into the mapping through another QP's ODP region; returns whether it was ODP."""
    length = len(pattern)
    try:
        with contextlib.ExitStack() as verbs:
            pd = device.alloc_pd()
            verbs.callback(pd.close)
            target = verbs.enter_context(Connection(device, pd, depth=4, remote_access=Access.WRITE))
            writer = verbs.enter_context(Connection(device, pd, depth=16))
            target.connect(writer.endpoint(mtu), mtu=mtu)
            writer.connect(target.endpoint(mtu), mtu=mtu)
            # pinned=False: grants over DAX files are ODP regions, the kind the bug hits.
            region = verbs.enter_context(register(pd, mapping.addr, length, Access.WRITE, pinned=False))
            staging = verbs.enter_context(LocalBuffer(pd, length))
            staging.write(pattern)
            writer.write([Chunk(staging.addr, staging.lkey, length, region.rkey, mapping.addr)])
            return region.odp
    except VerbsError as exc:
        raise CanaryFailed(f"canary: the RDMA write at path MTU {mtu} failed: {exc}") from exc


def _remove(root_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(CANARY_NAME, dir_fd=root_fd)
