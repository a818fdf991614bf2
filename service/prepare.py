"""Make a file's block map stable over [0, length) so that it can be mapped MAP_SYNC and registered for RDMA."""

import errno
import os
import stat
from dataclasses import dataclass

from .errors import FailedPrecondition, InvalidArgument, OutOfRange, RdaxError, ResourceExhausted
from .fiemap import FIEMAP_EXTENT_UNWRITTEN, Extent, check_stable, clip, read_extents, summary

PAGE_SIZE = 4096
_ZEROS = bytes(1 << 20)  # one MiB written per pwrite call


@dataclass(frozen=True)
class PreparedFile:
    """A file whose [0, length) is allocated and written, with the block map that was verified.

    To tell later whether blocks moved, compare `fingerprint` with
    summary(block_map(fd, length))[1].
    """

    length: int
    extent_count: int
    fingerprint: str


def prepare_file(fd: int, length: int) -> PreparedFile:
    """Allocate and write every block of [0, length) of `fd`, keeping its data, and verify the result.

    Growing a shorter file is part of the job; a longer one keeps its tail.
    The caller should hold a write lease (lease.FileLease) so that nobody
    writes to the file while the zero-filled ranges are chosen and written.
    """
    check_length(length)
    _check_regular(fd)
    _allocate(fd, length)
    # SYNC in read_extents flushes dirty pages first, so a range still reported
    # as a hole or UNWRITTEN really reads back as zeros: writing zeros there
    # converts it to written blocks without changing the file's content.
    for start, end in _unwritten_ranges(block_map(fd, length), length):
        _write_zeros(fd, start, end)
    _fsync(fd)
    extents = block_map(fd, length)
    check_stable(extents, length)
    count, fingerprint = summary(extents)
    return PreparedFile(length, count, fingerprint)


def block_map(fd: int, length: int) -> list[Extent]:
    """Return the extents of `fd` inside [0, length), the last one trimmed at `length`.

    Trimming keeps the fingerprint of a seal blind to what happens past its end.
    """
    return clip(read_extents(fd, 0, length), length)


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


def _check_regular(fd: int) -> None:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise _io_error(exc, "stat") from exc
    if not stat.S_ISREG(mode):
        raise FailedPrecondition("only regular files can be prepared: the descriptor refers to something else")


def _allocate(fd: int, length: int) -> None:
    # posix_fallocate also extends st_size when the file is shorter than length.
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError as exc:
        raise _io_error(exc, f"allocating {length} bytes") from exc


def _unwritten_ranges(extents: list[Extent], length: int) -> list[tuple[int, int]]:
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


def _write_zeros(fd: int, start: int, end: int) -> None:
    zeros = memoryview(_ZEROS)
    offset = start
    while offset < end:
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
        return ResourceExhausted(f"{doing} failed: {exc.strerror}; free space on the export or ask for a shorter length")
    if code == errno.EFBIG:
        return OutOfRange(f"{doing} failed: the length is beyond the largest file the filesystem allows")
    if code == errno.EBADF:
        return InvalidArgument(f"{doing} failed: the descriptor is closed or not open for writing; open the file O_RDWR")
    if code in (errno.EOPNOTSUPP, errno.ENODEV):
        return FailedPrecondition(f"{doing} failed: the filesystem cannot preallocate blocks, files on it cannot be sealed")
    return RdaxError(f"{doing} failed: {exc.strerror} (errno {code})")
