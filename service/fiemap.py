"""Read a file's block map with the FIEMAP ioctl and judge whether it is stable enough to seal."""

import errno
import fcntl
import hashlib
import struct
from dataclasses import dataclass

from .errors import FailedPrecondition, RdaxError, UnstableBlockMap

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_MAX_OFFSET = 2**64 - 1
FIEMAP_FLAG_SYNC = 0x1

FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x80
FIEMAP_EXTENT_NOT_ALIGNED = 0x100
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_DATA_TAIL = 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_MERGED = 0x1000
FIEMAP_EXTENT_SHARED = 0x2000

_FLAG_BITS = {
    name.removeprefix("FIEMAP_EXTENT_"): bit for name, bit in globals().items() if name.startswith("FIEMAP_EXTENT_")
}

# Why each flag makes a range unsealable, as told to the operator.
UNSTABLE_FLAGS: dict[int, str] = {
    FIEMAP_EXTENT_UNWRITTEN: (
        "UNWRITTEN: preallocated but never written, the first write would change the block map; run prepare on it"
    ),
    FIEMAP_EXTENT_SHARED: (
        "SHARED: blocks shared with another file (reflink or dedupe), a write would move them; "
        "unshare them (xfs_io -c 'funshare 0 LEN') or copy the file with --reflink=never"
    ),
    FIEMAP_EXTENT_DELALLOC: "DELALLOC: blocks not allocated yet; fsync the file and retry",
    FIEMAP_EXTENT_DATA_INLINE: "DATA_INLINE: data stored inside metadata, not in blocks that can be mapped",
    FIEMAP_EXTENT_DATA_TAIL: "DATA_TAIL: data packed with other files' tails, not in blocks of its own",
    FIEMAP_EXTENT_UNKNOWN: "UNKNOWN: the filesystem does not know where the data is",
    FIEMAP_EXTENT_ENCODED: "ENCODED: data is compressed or otherwise encoded, it cannot be mapped directly",
    FIEMAP_EXTENT_NOT_ALIGNED: "NOT_ALIGNED: data is not block aligned, it cannot be mapped directly",
}
_UNSTABLE_MASK = sum(UNSTABLE_FLAGS)
# The flags that preparing a file (prepare.py) cannot take away: it writes zeros
# over holes and UNWRITTEN extents and fsyncs, which allocates DELALLOC ones;
# every other flag stays whatever is written, so a Seal is refused up front.
UNFIXABLE_MASK = _UNSTABLE_MASK & ~(FIEMAP_EXTENT_UNWRITTEN | FIEMAP_EXTENT_DELALLOC)

_HEADER = struct.Struct("=QQIIII")  # struct fiemap: start, length, flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # struct fiemap_extent: logical, physical, length, flags
_BATCH = 512  # extents fetched per ioctl call


@dataclass(frozen=True)
class Extent:
    """One FIEMAP extent: byte offsets in the file (logical) and on the device (physical)."""

    logical: int
    physical: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.logical + self.length


def read_extents(fd: int, start: int = 0, length: int = FIEMAP_MAX_OFFSET, *, sync: bool = True) -> list[Extent]:
    """Return the extents of `fd` that overlap [start, start + length), in file order.

    `sync` flushes dirty data first so that delayed allocations show real blocks.
    """
    extents: list[Extent] = []
    end = min(start + length, FIEMAP_MAX_OFFSET)
    while start < end:
        batch = _fiemap_call(fd, start, end - start, FIEMAP_FLAG_SYNC if sync else 0)
        extents.extend(batch)
        # A short batch means the range is exhausted; LAST means the file is.
        if len(batch) < _BATCH or batch[-1].flags & FIEMAP_EXTENT_LAST:
            break
        start = batch[-1].end
    return extents


def _fiemap_call(fd: int, start: int, length: int, flags: int) -> list[Extent]:
    buf = bytearray(_HEADER.size + _BATCH * _EXTENT.size)
    _HEADER.pack_into(buf, 0, start, length, flags, 0, _BATCH, 0)
    try:
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
    except OSError as exc:
        raise _fiemap_error(exc) from exc
    mapped = _HEADER.unpack_from(buf, 0)[3]
    return [Extent(*_EXTENT.unpack_from(buf, _HEADER.size + i * _EXTENT.size)) for i in range(mapped)]


def _fiemap_error(exc: OSError) -> RdaxError:
    if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
        return FailedPrecondition("the filesystem does not support FIEMAP: files on it cannot be sealed, "
                                  "use XFS or ext4")
    if exc.errno == errno.EBADR:
        return FailedPrecondition("the filesystem rejected FIEMAP_FLAG_SYNC: files on it cannot be sealed")
    return RdaxError(f"FIEMAP failed: {exc.strerror} (errno {exc.errno})")


def flag_names(flags: int) -> str:
    """Name the FIEMAP_EXTENT_* bits of `flags`, e.g. 'UNWRITTEN|LAST'."""
    return "|".join(name for name, bit in _FLAG_BITS.items() if flags & bit) or "none"


def check_stable(extents: list[Extent], length: int) -> None:
    """Raise UnstableBlockMap unless `extents` cover [0, length) with written blocks of their own."""
    covered = 0
    for index, ext in enumerate(sorted(extents, key=lambda e: e.logical)):
        if ext.logical >= length:
            break
        if ext.logical > covered:
            raise _hole(covered, ext.logical, f"before extent #{index} at offset {ext.logical}")
        bad = ext.flags & _UNSTABLE_MASK
        if bad:
            raise _flag_error(index, ext, bad)
        covered = max(covered, ext.end)
    if covered < length:
        raise _hole(covered, length, "at the end of the range to seal")


def check_fixable(extents: list[Extent], length: int) -> None:
    """Raise UnstableBlockMap if an extent inside [0, length) has a flag that preparation cannot take away.

    Holes and UNWRITTEN extents pass (preparation writes zeros over them), so
    do DELALLOC ones, with the UNKNOWN that comes with DELALLOC (fsync
    allocates them); SHARED, DATA_INLINE, UNKNOWN, ENCODED, NOT_ALIGNED and
    DATA_TAIL do not.
    """
    for index, ext in enumerate(sorted(extents, key=lambda e: e.logical)):
        if ext.logical >= length:
            break
        bad = ext.flags & UNFIXABLE_MASK
        if ext.flags & FIEMAP_EXTENT_DELALLOC:
            bad &= ~FIEMAP_EXTENT_UNKNOWN
        if bad:
            raise _flag_error(index, ext, bad)


def _flag_error(index: int, ext: Extent, bad: int) -> UnstableBlockMap:
    reasons = "; ".join(why for bit, why in UNSTABLE_FLAGS.items() if bad & bit)
    return UnstableBlockMap(
        f"extent #{index} [{ext.logical}, {ext.end}) has flags {flag_names(ext.flags)}: {reasons}",
        offset=ext.logical, length=ext.length, flags=bad,
    )


def _hole(start: int, end: int, where: str) -> UnstableBlockMap:
    return UnstableBlockMap(
        f"hole [{start}, {end}) {where}: no blocks are allocated there; run prepare on the file",
        offset=start, length=end - start, flags=0,
    )


def clip(extents: list[Extent], length: int) -> list[Extent]:
    """Keep the part of `extents` inside [0, length), trimming an extent that crosses `length`."""
    clipped = []
    for ext in extents:
        if ext.logical >= length:
            continue
        if ext.end > length:
            ext = Extent(ext.logical, ext.physical, length - ext.logical, ext.flags)
        clipped.append(ext)
    return clipped


def summary(extents: list[Extent]) -> tuple[int, str]:
    """Return (extent count, sha256 hex fingerprint of where the bytes live).

    The fingerprint hashes (logical, physical, length) runs after joining
    extents that continue each other both in the file and on the device, so
    that the filesystem splitting or merging its records without moving any
    block does not count as a change. Flags are left out for the same reason,
    so the fingerprint says where the blocks are, not that they are written:
    run check_stable as well when verifying a seal again.
    """
    digest = hashlib.sha256()
    for logical, physical, length in _runs(extents):
        digest.update(struct.pack("<QQQ", logical, physical, length))
    return len(extents), digest.hexdigest()


def _runs(extents: list[Extent]) -> list[tuple[int, int, int]]:
    runs: list[tuple[int, int, int]] = []
    for ext in sorted(extents, key=lambda e: e.logical):
        if runs:
            logical, physical, length = runs[-1]
            if logical + length == ext.logical and physical + length == ext.physical:
                runs[-1] = (logical, physical, length + ext.length)
                continue
        runs.append((ext.logical, ext.physical, ext.length))
    return runs
