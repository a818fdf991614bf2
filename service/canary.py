"""The start-up canary: prove that RDMA WRITEs through an ODP region land in full at the configured path MTU."""
# rxe loses data silently on ODP memory regions below path MTU 4096: the work
# completion says success while part of each page never lands (LAB-NOTES.md).
# So before serving, the node writes a random pattern into a file prepared
# like a seal, over two of its own QPs connected to each other, and reads it
# back with pread.
# rxe ODP regions also put a write that starts inside a page at the start of
# that page (7.3.4). So the canary then writes a few bytes at an address
# inside a page, and where they land says where clients may start writes:
# grants carry it as write_alignment, and the client refuses the others.
from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass

from rdax.rdma import Access, Chunk, Connection, Device, LocalBuffer, VerbsError, register

from .mapping import DaxMapping
from .paths import resolve_beneath
from .prepare import prepare_file

CANARY_NAME = ".rdax-canary"
CANARY_BYTES = 64 * 1024
PAGE = mmap.PAGESIZE
PROBE_AT, PROBE_BYTES = PAGE + 100, 64   # a write that starts inside the canary's second page


class CanaryFailed(Exception):
    """The data path loses or refuses writes: the node must not serve."""


@dataclass(frozen=True)
class CanaryResult:
    mtu: int
    length: int
    odp: bool
    write_alignment: int   # 1: writes land where they are aimed; PAGE: only page-aligned ones do


def run_canary(device: Device, export_root: str, mtu: int, *, map_sync: bool = True,
               length: int = CANARY_BYTES) -> CanaryResult:
    """Write `length` random bytes into `export_root`/.rdax-canary by RDMA at `mtu`; raise CanaryFailed unless all
    land."""
    pattern = os.urandom(length)
    probe = os.urandom(PROBE_BYTES)
    with contextlib.ExitStack() as cleanup:
        root_fd = os.open(export_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        cleanup.callback(os.close, root_fd)
        _remove(root_fd)   # a stale one from a crash
        fd = resolve_beneath(root_fd, CANARY_NAME, create=True).fd
        cleanup.callback(_remove, root_fd)
        cleanup.callback(os.close, fd)
        prepare_file(fd, length)
        mapping = cleanup.enter_context(DaxMapping(fd, length, sync=map_sync))
        odp = _write_through_odp(device, mtu, mapping, pattern, probe)
        landed = os.pread(fd, length, 0)
    # The probe went over [PROBE_AT, +PROBE_BYTES), or over the page's start: leave that page out of the count.
    lost = sum(1 for want, got in zip(pattern[:PAGE] + pattern[2 * PAGE:], landed[:PAGE] + landed[2 * PAGE:],
                                      strict=False)
               if want != got)
    if lost:
        raise CanaryFailed(
            f"canary: {lost} of {length} bytes RDMA-written at path MTU {mtu} did not reach "
            f"{os.path.join(export_root, CANARY_NAME)}, although every write completed successfully: rxe loses data "
            f"on ODP memory regions below path MTU 4096 (a kernel bug, see LAB-NOTES.md); start with --mtu 4096 "
            f"on a netdev whose MTU allows it (e.g. 9000)")
    aligned = landed[PROBE_AT:PROBE_AT + PROBE_BYTES] == probe
    return CanaryResult(mtu, length, odp, 1 if aligned else PAGE)


def _write_through_odp(device: Device, mtu: int, mapping: DaxMapping, pattern: bytes, probe: bytes) -> bool:
    """One QP writes `pattern` into the mapping through another QP's ODP region, then `probe` at
    PROBE_AT; returns whether it was ODP."""
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
            staging.write(probe)
            writer.write([Chunk(staging.addr, staging.lkey, len(probe), region.rkey, mapping.addr + PROBE_AT)])
            return region.odp
    except VerbsError as exc:
        raise CanaryFailed(f"canary: the RDMA write at path MTU {mtu} failed: {exc}") from exc


def _remove(root_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(CANARY_NAME, dir_fd=root_fd)
