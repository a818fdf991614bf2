"""Make a file's block map stable over [0, length) so that it can be mapped MAP_SYNC and registered for RDMA.

A Seal that is refused must leave the file as it found it (issue 14: a
reflinked 1 MiB file refused for its SHARED extents had become 8 MiB). So a
Preparation works in three steps, all under the node's write lease:

1. Preparation(fd, length) checks, before anything is changed, all that can be
   known in advance: the descriptor (a regular file, not read-only, not
   O_APPEND), the flags of the extents the file already has in [0, length)
   (SHARED, DATA_INLINE, UNKNOWN, ENCODED, NOT_ALIGNED and DATA_TAIL stay
   whatever preparation does: fiemap.check_fixable) and the free space (fewer
   free blocks, counting root's reserve, than bytes still to allocate is
   refused with ResourceExhausted). It records what it found: size, atime and
   mtime, the holes and UNWRITTEN ranges inside the old size, what was
   preallocated past the old end.
2. run() allocates [0, length), writes zeros over the holes and UNWRITTEN
   ranges, fsyncs and verifies the block map. What cannot be known before is
   found out here: ENOSPC or EDQUOT part-way (ext4 extends the file with each
   chunk it allocates, so a failed fallocate still leaves it longer), a block
   map still unstable after all, and a lease break: another process opening
   the file meanwhile (checked before the first change, after allocating,
   before every MiB of zeros and at the end).
3. undo() puts the file back when run() or anything after it (mapping the
   file) fails:

   - size: exactly; ftruncate back down (preparation only ever grows a file).
   - bytes: exactly. Preparation writes nothing but zeros, and only where the
     file read as zeros (holes and UNWRITTEN extents after a FIEMAP with
     FLAG_SYNC); the truncate drops all it added past the old end.
   - holes inside the old size: punched out again (FALLOC_FL_PUNCH_HOLE).
   - UNWRITTEN ranges inside the old size that were overwritten with zeros:
     made UNWRITTEN again with FALLOC_FL_ZERO_RANGE (ext4 converts the extents
     in place; XFS frees and preallocates, so the blocks may move), or punched
     and preallocated where ZERO_RANGE is not supported.
   - blocks preallocated past the old end (fallocate KEEP_SIZE): the truncate
     frees them with the rest, so their ranges are preallocated again.
   - atime and mtime: set back (futimens). ctime cannot be: it shows the change.
   - written extents (the file's data): never touched, they keep their blocks.
   - st_blocks: equal in every refusal the unit tests make, on ext4 with 4 KiB
     blocks and on XFS (measured with tests/unit/test_prepare.py on both). The
     filesystem's own bookkeeping can differ, measured on ext4: a tree of
     extents that grew a level stays that deep (an ENOSPC part-way through an
     allocation split into more than four extents, 1 KiB blocks: 2048 -> 2050
     512-byte sectors); a preallocation that straddled an old end not on a
     block boundary comes back as two extents, and a fifth extent costs a tree
     block (4320 -> 4328).

   undo() relies on the lease being still held while it runs (intact or under
   break, the opener waiting for it): open_sealed_file releases the lease only
   after it. If preparation outlasts /proc/sys/fs/lease-break-time the kernel
   drops the lease and lets the opener in; neither preparation nor undo is safe
   then, which is why run() checks the lease before every MiB of zeros.
"""

import ctypes
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from .errors import FailedPrecondition, InvalidArgument, OutOfRange, RdaxError, ResourceExhausted
from .fiemap import (
    FIEMAP_EXTENT_DELALLOC,
    FIEMAP_EXTENT_UNKNOWN,
    FIEMAP_EXTENT_UNWRITTEN,
    Extent,
    check_fixable,
    check_stable,
    clip,
    read_extents,
    summary,
)

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
_ZEROS = bytes(1 << 20)  # one MiB written per pwrite call, the lease checked before each
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

LEASE_BROKEN = (
    "another process opened the file while it was being sealed (the node's write lease on it was broken): "
    "the Seal is refused and the file put back as it was; retry when that process is done with the file"
)

ReadExtents = Callable[..., list[Extent]]   # like fiemap.read_extents(fd, start, length)
Range = tuple[int, int]   # [start, end) in bytes

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


@dataclass(frozen=True)
class PreparedFile:
    """A file whose [0, length) is allocated and written, with the block map that was verified.

    To tell later whether blocks moved, compare `fingerprint` with
    summary(block_map(fd, length))[1].
    """

    length: int
    extent_count: int
    fingerprint: str


def prepare_file(
    fd: int,
    length: int,
    *,
    lease_intact: Callable[[], bool] | None = None,
    read_extents: ReadExtents = read_extents,
    statvfs: Callable[[int], os.statvfs_result] = os.fstatvfs,
) -> PreparedFile:
    """Allocate and write every block of [0, length) of `fd`, keeping its data, and verify the result.

    Growing a shorter file is part of the job; a longer one keeps its tail.
    The caller should hold a write lease (lease.FileLease) so that nobody
    writes to the file while the zero-filled ranges are chosen and written;
    `lease_intact` tells whether it still holds it. A refusal leaves the file
    as it was (see the module's docstring for exactly what that means).
    `read_extents` and `statvfs` are where the block map and the free space
    come from (tests pass stand-ins for what the host cannot produce).
    """
    preparation = Preparation(fd, length, read_extents=read_extents, statvfs=statvfs)
    try:
        return preparation.run(lease_intact)
    except BaseException:
        preparation.undo()
        raise


class Preparation:
    """One file's preparation for a seal: checked on construction, before any change; run(); undo() on failure."""

    def __init__(
        self,
        fd: int,
        length: int,
        *,
        read_extents: ReadExtents = read_extents,
        statvfs: Callable[[int], os.statvfs_result] = os.fstatvfs,
    ) -> None:
        check_length(length)
        st = _fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FailedPrecondition("only regular files can be prepared: the descriptor refers to something else")
        _check_writable(fd)
        self.fd = fd
        self.length = length
        self.size = st.st_size
        self.blocks = st.st_blocks
        self._times_ns = (st.st_atime_ns, st.st_mtime_ns)
        self._read_extents = read_extents
        limit = min(self.size, length)   # the file's existing bytes that the seal covers
        found = read_extents(fd, 0, limit) if limit else []
        old = clip(found, limit)
        check_fixable(old, limit)
        # Up to the page past the old end: a partial last block lies beyond it after the truncate back.
        self.holes, self.unwritten = _holes_and_unwritten(found, limit, _round_up(limit, PAGE_SIZE))
        self.preallocated_past_end: list[Range] = []
        if self.size < length:
            self.preallocated_past_end = [
                (max(ext.logical, self.size), ext.end) for ext in read_extents(fd, self.size)
                if ext.end > self.size and not ext.flags & (FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_UNKNOWN)
            ]
        allocated = sum(ext.length for ext in old) + sum(
            max(0, min(end, length) - start) for start, end in self.preallocated_past_end)
        _check_space(fd, length, length - allocated, statvfs)
        self._changed = False
        self._zeroed: list[Range] = []

    def run(self, lease_intact: Callable[[], bool] | None = None) -> PreparedFile:
        """Allocate, zero-fill, fsync and verify [0, length); on failure the caller calls undo()."""

        def check_lease() -> None:
            if lease_intact is not None and not lease_intact():
                raise FailedPrecondition(LEASE_BROKEN)

        check_lease()
        self._changed = True
        _allocate(self.fd, self.length)
        check_lease()
        # SYNC in read_extents flushes dirty pages first, so a range still reported
        # as a hole or UNWRITTEN really reads back as zeros: writing zeros there
        # converts it to written blocks without changing the file's content.
        for start, end in _unwritten_ranges(self._block_map(), self.length):
            self._zeroed.append((start, end))
            _write_zeros(self.fd, start, end, check_lease)
        _fsync(self.fd)
        extents = self._block_map()
        check_stable(extents, self.length)
        check_lease()
        count, fingerprint = summary(extents)
        return PreparedFile(self.length, count, fingerprint)

    def undo(self) -> None:
        """Put the file back as construction found it, if run() changed it; never raises (failures are logged).

        Call it while the lease is still held, so that an opener waiting for the
        lease finds the file as it was.
        """
        if not self._changed:
            return
        self._changed = False
        fd = self.fd
        problems: list[str] = []

        def step(doing: str, call: Callable[..., object], *args: object, **kwargs: object) -> None:
            try:
                call(*args, **kwargs)
            except OSError as exc:
                problems.append(f"{doing}: {exc.strerror} (errno {exc.errno})")

        try:
            grown = os.fstat(fd).st_size > self.size
        except OSError as exc:
            log.error("cannot put the file back after a refused Seal: fstat failed: %s", exc.strerror)
            return
        if grown:
            step(f"truncating back to {self.size} bytes", os.ftruncate, fd, self.size)
        for start, end in self.holes:
            step(f"punching the hole [{start}, {end}) again", _fallocate, fd,
                 FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, end - start)
        # UNWRITTEN before, written zeros now: ZERO_RANGE makes them UNWRITTEN again (ext4 converts the
        # extents in place, XFS frees and preallocates); where it is not supported, punch and preallocate.
        for start, end in _overlaps(self.unwritten, self._zeroed):
            step(f"making [{start}, {end}) UNWRITTEN again", _unwrite, fd, start, end - start)
        # Past the end also when nothing grew: punching the hole that ends at the old end may reach past it.
        # After an fsync: ext4 reuses the blocks the truncate freed only once that is committed (measured on
        # a nearly full 16 MiB ext4: without it a 1 MiB preallocation came back as two extents, not one).
        if self.preallocated_past_end:
            step("fsync", os.fsync, fd)
        for start, end in self.preallocated_past_end:
            step(f"preallocating [{start}, {end}) again", _fallocate, fd, FALLOC_FL_KEEP_SIZE, start, end - start)
        step("setting atime and mtime back", os.utime, fd, ns=self._times_ns)
        step("fsync", os.fsync, fd)
        if problems:
            log.error("the file could not be put back entirely after a refused Seal: %s", "; ".join(problems))
        else:
            log.info("a refused Seal put the file back: %d bytes as before, %d blocks (%d before)",
                     self.size, _blocks(fd), self.blocks)

    def _block_map(self) -> list[Extent]:
        return clip(self._read_extents(self.fd, 0, self.length), self.length)


def block_map(fd: int, length: int, *, sync: bool = True) -> list[Extent]:
    """Return the extents of `fd` inside [0, length), the last one trimmed at `length`.

    Trimming keeps the fingerprint of a seal blind to what happens past its end. sync=False skips
    FIEMAP_FLAG_SYNC: on DAX there is no delayed allocation to settle, and the sync would write back (flush the
    CPU caches of) every dirty page, which drops those pages from the ODP regions clients write through.
    """
    return clip(read_extents(fd, 0, length, sync=sync), length)


def check_length(length: int) -> None:
    """A length to prepare (and to seal: the node checks it before opening anything)."""
    if length <= 0:
        raise InvalidArgument(f"length {length} must be positive: it is the number of bytes to seal from offset 0")
    if length % PAGE_SIZE:
        rounded = -(-length // PAGE_SIZE) * PAGE_SIZE
        raise InvalidArgument(
            f"length {length} is not a multiple of {PAGE_SIZE}, the {PAGE_SIZE}-byte page size: "
            f"DAX mappings are made of whole pages, ask for {rounded} instead"
        )


def _fstat(fd: int) -> os.stat_result:
    try:
        return os.fstat(fd)
    except OSError as exc:
        raise _io_error(exc, "stat") from exc


def _blocks(fd: int) -> int:
    try:
        return os.fstat(fd).st_blocks
    except OSError:
        return -1


def _check_writable(fd: int) -> None:
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as exc:
        raise _io_error(exc, "reading the descriptor's flags") from exc
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise InvalidArgument("the descriptor is open read-only: open the file O_RDWR")
    if flags & os.O_APPEND:
        raise InvalidArgument("the descriptor is open O_APPEND, where pwrite ignores its offset on Linux: "
                              "open the file O_RDWR without O_APPEND")


def _check_space(fd: int, length: int, needed: int, statvfs: Callable[[int], os.statvfs_result]) -> None:
    """Refuse when even the free blocks kept for root could not hold the `needed` bytes still to allocate.

    f_bfree, not f_bavail: whether the reserve may be used depends on the
    filesystem and the caller's capabilities, and only a certain failure is
    refused here; an ENOSPC part-way is undone instead.
    """
    if needed <= 0:
        return
    try:
        fs = statvfs(fd)
    except OSError as exc:
        raise _io_error(exc, "statvfs") from exc
    free = fs.f_bfree * fs.f_frsize
    if free < needed:
        raise ResourceExhausted(
            f"sealing [0, {length}) needs {needed} more bytes allocated but the filesystem has {free} free: "
            f"free space on the export or ask for a shorter length"
        )


def _holes_and_unwritten(extents: list[Extent], limit: int, edge: int) -> tuple[list[Range], list[Range]]:
    """Return the holes and the UNWRITTEN ranges of [0, limit) in `extents` (not clipped at `limit`).

    A hole that reaches `limit` is stretched to `edge`; an UNWRITTEN range ends
    where its extent does, but not past `edge`.
    """
    holes: list[Range] = []
    unwritten: list[Range] = []
    covered = 0
    for ext in sorted(extents, key=lambda e: e.logical):
        if ext.logical > covered:
            holes.append((covered, ext.logical))
        if ext.flags & FIEMAP_EXTENT_UNWRITTEN and ext.end > covered:
            unwritten.append((max(ext.logical, covered), min(ext.end, edge)))
        covered = max(covered, ext.end)
    if covered < limit:
        holes.append((covered, edge))
    return holes, unwritten


def _overlaps(ranges: list[Range], others: list[Range]) -> list[Range]:
    """The non-empty intersections of each range of `ranges` with each of `others`."""
    return [(max(a, c), min(b, d)) for a, b in ranges for c, d in others if max(a, c) < min(b, d)]


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _allocate(fd: int, length: int) -> None:
    # posix_fallocate also extends st_size when the file is shorter than length.
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError as exc:
        raise _io_error(exc, f"allocating {length} bytes") from exc


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _unwrite(fd: int, offset: int, length: int) -> None:
    """Turn [offset, offset + length), which reads as zeros, into UNWRITTEN extents."""
    try:
        _fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        _fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)


def _unwritten_ranges(extents: list[Extent], length: int) -> list[Range]:
    """Return the [start, end) ranges of [0, length) that are holes or UNWRITTEN extents."""
    ranges = []
    covered = 0
    for ext in sorted(extents, key=lambda e: e.logical):
        if ext.logical > covered:
            ranges.append((covered, ext.logical))
        if ext.flags & FIEMAP_EXTENT_UNWRITTEN:
            ranges.append((max(ext.logical, covered), ext.end))
        covered = max(covered, ext.end)
    if covered < length:
        ranges.append((covered, length))
    return ranges


def _write_zeros(fd: int, start: int, end: int, before_each: Callable[[], None]) -> None:
    zeros = memoryview(_ZEROS)
    offset = start
    while offset < end:
        before_each()
        try:
            offset += os.pwrite(fd, zeros[: min(end - offset, len(zeros))], offset)
        except OSError as exc:
            raise _io_error(exc, f"writing zeros at offset {offset}") from exc


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise _io_error(exc, "fsync") from exc


def _io_error(exc: OSError, doing: str) -> RdaxError:
    """Translate an errno met while `doing` something to the file into the error a client sees."""
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"{doing} failed: {exc.strerror}; "
                                 "free space on the export or ask for a shorter length")
    if code == errno.EFBIG:
        return OutOfRange(f"{doing} failed: the length is beyond the largest file the filesystem allows")
    if code == errno.EBADF:
        return InvalidArgument(f"{doing} failed: the descriptor is closed or not open for writing; "
                               "open the file O_RDWR")
    if code in (errno.EOPNOTSUPP, errno.ENODEV):
        return FailedPrecondition(f"{doing} failed: the filesystem cannot preallocate blocks, "
                                  "files on it cannot be sealed")
    return RdaxError(f"{doing} failed: {exc.strerror} (errno {code})")
