"""Tests for service.prepare: making a file's block map stable before sealing it."""

import ctypes
import dataclasses
import errno
import fcntl
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, cast

import pytest

from rdax.service.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, UnstableBlockMap
from rdax.service.fiemap import (
    FIEMAP_EXTENT_DATA_INLINE,
    FIEMAP_EXTENT_DELALLOC,
    FIEMAP_EXTENT_NOT_ALIGNED,
    FIEMAP_EXTENT_SHARED,
    FIEMAP_EXTENT_UNKNOWN,
    FIEMAP_EXTENT_UNWRITTEN,
    FIEMAP_MAX_OFFSET,
    Extent,
    check_stable,
    read_extents,
    summary,
)
from rdax.service.lease import lease_state
from rdax.service.prepare import PAGE_SIZE, PreparedFile, block_map, prepare_file
from rdax.service.seals import open_sealed_file

MIB = 1 << 20
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _punch_hole(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@pytest.fixture
def fd(tmp_path: Path):
    fd = os.open(tmp_path / "f.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    yield fd
    os.close(fd)


def test_prepare_empty_file_all_written(fd: int) -> None:
    prepared = prepare_file(fd, 4 * MIB)
    extents = read_extents(fd)
    assert prepared.length == 4 * MIB and prepared.extent_count >= 1
    assert os.fstat(fd).st_size == 4 * MIB
    assert not any(e.flags & FIEMAP_EXTENT_UNWRITTEN for e in extents)
    assert check_stable(extents, 4 * MIB) is None
    assert os.pread(fd, MIB, 3 * MIB) == bytes(MIB)


def test_prepare_sparse_file_keeps_written_pattern(fd: int) -> None:
    pattern = bytes(range(256)) * 20
    os.pwrite(fd, pattern, 3 * PAGE_SIZE + 100)
    os.pwrite(fd, pattern, 2 * MIB + 7)
    prepare_file(fd, 4 * MIB)
    assert os.pread(fd, len(pattern), 3 * PAGE_SIZE + 100) == pattern
    assert os.pread(fd, len(pattern), 2 * MIB + 7) == pattern
    assert os.pread(fd, 3 * PAGE_SIZE + 100, 0) == bytes(3 * PAGE_SIZE + 100)
    assert check_stable(read_extents(fd), 4 * MIB) is None


def test_prepare_converts_unwritten_preallocation(fd: int) -> None:
    os.posix_fallocate(fd, 0, 2 * MIB)
    assert any(e.flags & FIEMAP_EXTENT_UNWRITTEN for e in read_extents(fd))
    prepare_file(fd, 2 * MIB)
    assert not any(e.flags & FIEMAP_EXTENT_UNWRITTEN for e in read_extents(fd))


def test_prepare_longer_file_keeps_its_tail(fd: int) -> None:
    os.pwrite(fd, b"t" * PAGE_SIZE, 3 * MIB)
    prepared = prepare_file(fd, MIB)
    assert prepared.length == MIB
    assert os.fstat(fd).st_size == 3 * MIB + PAGE_SIZE
    assert os.pread(fd, PAGE_SIZE, 3 * MIB) == b"t" * PAGE_SIZE
    assert check_stable(read_extents(fd), MIB) is None


def test_prepare_fingerprint_stable_across_calls(fd: int) -> None:
    first = prepare_file(fd, 2 * MIB)
    second = prepare_file(fd, 2 * MIB)
    assert first == second
    assert summary(block_map(fd, 2 * MIB)) == (first.extent_count, first.fingerprint)


def test_prepare_fingerprint_ignores_tail_growth(fd: int) -> None:
    prepared = prepare_file(fd, MIB)
    os.pwrite(fd, b"g" * MIB, MIB)
    os.fsync(fd)
    assert summary(block_map(fd, MIB))[1] == prepared.fingerprint


def test_prepare_fingerprint_changes_after_punch_hole_bad_flow(fd: int) -> None:
    prepared = prepare_file(fd, 2 * MIB)
    _punch_hole(fd, MIB, 64 * 1024)
    extents = block_map(fd, 2 * MIB)
    assert summary(extents)[1] != prepared.fingerprint
    with pytest.raises(UnstableBlockMap, match=r"hole \[1048576, 1114112\)"):
        check_stable(extents, 2 * MIB)


def test_prepare_fills_punched_hole_again(fd: int) -> None:
    prepare_file(fd, 2 * MIB)
    _punch_hole(fd, MIB, 64 * 1024)
    prepared = prepare_file(fd, 2 * MIB)
    assert isinstance(prepared, PreparedFile)
    assert check_stable(read_extents(fd), 2 * MIB) is None


@pytest.mark.parametrize("length", [1, PAGE_SIZE + 1, 5000])
def test_prepare_length_not_page_multiple_bad_flow(fd: int, length: int) -> None:
    rounded = -(-length // PAGE_SIZE) * PAGE_SIZE
    with pytest.raises(InvalidArgument, match=rf"4096-byte page size.*ask for {rounded}") as info:
        prepare_file(fd, length)
    assert info.value.code == "INVALID_ARGUMENT"
    assert os.fstat(fd).st_size == 0


@pytest.mark.parametrize("length", [0, -PAGE_SIZE])
def test_prepare_length_not_positive_bad_flow(fd: int, length: int) -> None:
    with pytest.raises(InvalidArgument, match="must be positive"):
        prepare_file(fd, length)


def test_prepare_readonly_fd_bad_flow(tmp_path: Path) -> None:
    (tmp_path / "ro.bin").write_bytes(b"")
    ro = os.open(tmp_path / "ro.bin", os.O_RDONLY)
    try:
        with pytest.raises(InvalidArgument, match="open the file O_RDWR"):
            prepare_file(ro, MIB)
    finally:
        os.close(ro)
    assert (tmp_path / "ro.bin").stat().st_size == 0


def test_prepare_directory_bad_flow(tmp_path: Path) -> None:
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FailedPrecondition, match="only regular files"):
            prepare_file(dfd, MIB)
    finally:
        os.close(dfd)


# -- a refused Seal leaves the file as it was (issue 14) ----------------------------------------------------------
# Each test seals an existing file and is refused for one cause; afterwards the file's size, st_blocks, bytes
# (sha256) and mtime are what they were, and so is which of its ranges are data, UNWRITTEN or holes.

FILE_SIZE = 3 * MIB + 1234   # not a multiple of the block size: the last block is partly past the end
SEAL_LENGTH = 8 * MIB        # longer than the file: preparation grows it


class FlagsAdded:
    """A read_extents stand-in: the real block map, with `flags` added to every extent while `when(fd)` holds.

    For what the host's ext4 cannot produce: SHARED (no reflink), DATA_INLINE, UNKNOWN.
    """

    def __init__(self, flags: int, when: Callable[[int], bool] = lambda fd: True) -> None:
        self.flags = flags
        self.when = when
        self.added = 0

    def __call__(self, fd: int, start: int = 0, length: int = FIEMAP_MAX_OFFSET, *, sync: bool = True) -> list[Extent]:
        extents = read_extents(fd, start, length, sync=sync)
        if self.when(fd):
            self.added += 1
            extents = [dataclasses.replace(e, flags=e.flags | self.flags) for e in extents]
        return extents


def _grown(fd: int) -> bool:
    """Whether preparation has allocated already: the file is as long as the seal."""
    return os.fstat(fd).st_size >= SEAL_LENGTH


class FileLook(NamedTuple):
    size: int
    # Bytes the file's extents cover (FIEMAP), not st_blocks: st_blocks also counts the filesystem's own
    # metadata, and ext4 keeps an extent tree's index block after the tree shrinks back (a host on 6.18 showed
    # 4 KiB more after a rollback that had put every extent back as it was).
    allocated: int
    sha256: str
    mtime_ns: int
    kinds: tuple[tuple[int, int, str], ...]   # (start, end, 'data' | 'unwritten') runs, holes between them


def _look(path: Path) -> FileLook:
    st = path.stat()
    fd = os.open(path, os.O_RDONLY)
    try:
        runs: list[tuple[int, int, str]] = []
        allocated = 0
        for ext in read_extents(fd):
            allocated += ext.length
            kind = "unwritten" if ext.flags & FIEMAP_EXTENT_UNWRITTEN else "data"
            if runs and runs[-1][1] == ext.logical and runs[-1][2] == kind:
                runs[-1] = (runs[-1][0], ext.end, kind)
            else:
                runs.append((ext.logical, ext.end, kind))
    finally:
        os.close(fd)
    return FileLook(st.st_size, allocated, hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns,
                    tuple(runs))


def _ctime_ns(path: Path) -> int:
    """The one time nothing can set back: equal afterwards means the file was never changed."""
    return path.stat().st_ctime_ns


def _make_file(path: Path, size: int = FILE_SIZE) -> FileLook:
    """Data, a hole, data at an odd offset, an UNWRITTEN MiB, a hole to the odd end, a MiB preallocated past it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.pwrite(fd, random.Random(14).randbytes(256 * 1024), 0)
        os.pwrite(fd, random.Random(15).randbytes(100 * 1024), MIB + 7)
        os.posix_fallocate(fd, 2 * MIB, MIB)
        os.ftruncate(fd, size)
        _fallocate(fd, FALLOC_FL_KEEP_SIZE, -(-size // MIB) * MIB, MIB)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))   # clearly not "now"
    look = _look(path)
    assert (2 * MIB, 3 * MIB, "unwritten") in look.kinds and look.kinds[-1][0] >= size, look.kinds
    return look


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@pytest.fixture
def export(tmp_path: Path):
    """(directory, its descriptor): an export root on the host's filesystem."""
    root = tmp_path / "export"
    root.mkdir()
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    yield root, root_fd
    os.close(root_fd)


@pytest.fixture
def small_fs(tmp_path: Path):
    """(directory, its descriptor) on a 16 MiB ext4 with 4 KiB blocks, loop-mounted: a real ENOSPC.

    4 KiB blocks keep a failed 10 MiB allocation within the four extents an ext4 inode holds; with 1 KiB
    blocks it needs an extent index block, which ext4 keeps after the truncate back (st_blocks +2).
    """
    if os.geteuid() != 0:
        pytest.skip("a real ENOSPC needs a loop-mounted filesystem, and mounting one needs root")
    image, mount = tmp_path / "small.ext4", tmp_path / "small"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(16 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    root_fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield mount, root_fd
    finally:
        os.close(root_fd)
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def sigio_caught():
    """A lease break signals the holder with SIGIO, whose default action ends the process: count them instead."""
    caught: list[int] = []
    previous = signal.signal(signal.SIGIO, lambda signum, frame: caught.append(signum))
    yield caught
    signal.signal(signal.SIGIO, previous)


def test_seal_refused_shared_leaves_file_unchanged_bad_flow(export) -> None:
    root, root_fd = export
    before, ctime_ns = _make_file(root / "f"), _ctime_ns(root / "f")
    shared = FlagsAdded(FIEMAP_EXTENT_SHARED)
    with pytest.raises(UnstableBlockMap, match=r"SHARED: blocks shared with another file") as info:
        open_sealed_file(root_fd, "f", SEAL_LENGTH, create=False, map_sync=False, read_extents=shared)
    assert info.value.code == "FAILED_PRECONDITION" and info.value.flags == FIEMAP_EXTENT_SHARED
    assert _look(root / "f") == before
    assert _ctime_ns(root / "f") == ctime_ns   # refused before any change, not changed and put back


def test_seal_refused_inline_leaves_file_unchanged_bad_flow(export) -> None:
    root, root_fd = export
    (root / "small").write_bytes(b"a few bytes, inline on a filesystem with inline data")
    before, ctime_ns = _look(root / "small"), _ctime_ns(root / "small")
    inline = FlagsAdded(FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_NOT_ALIGNED)
    with pytest.raises(UnstableBlockMap, match=r"DATA_INLINE: data stored inside metadata"):
        open_sealed_file(root_fd, "small", MIB, create=False, map_sync=False, read_extents=inline)
    assert _look(root / "small") == before
    assert _ctime_ns(root / "small") == ctime_ns


def test_seal_refused_unknown_leaves_file_unchanged_bad_flow(export) -> None:
    root, root_fd = export
    before, ctime_ns = _make_file(root / "f"), _ctime_ns(root / "f")
    unknown = FlagsAdded(FIEMAP_EXTENT_UNKNOWN)
    with pytest.raises(UnstableBlockMap, match=r"UNKNOWN: the filesystem does not know where the data is"):
        open_sealed_file(root_fd, "f", SEAL_LENGTH, create=False, map_sync=False, read_extents=unknown)
    assert _look(root / "f") == before
    assert _ctime_ns(root / "f") == ctime_ns


def test_seal_refused_unknown_after_preparation_leaves_file_unchanged_bad_flow(export) -> None:
    """The final check refuses after the file was grown, allocated and zero-filled: all of that is undone."""
    root, root_fd = export
    before = _make_file(root / "f")
    late = FlagsAdded(FIEMAP_EXTENT_UNKNOWN, when=_grown)
    with pytest.raises(UnstableBlockMap, match=r"UNKNOWN"):
        open_sealed_file(root_fd, "f", SEAL_LENGTH, create=False, map_sync=False, read_extents=late)
    assert late.added == 2   # the map zero-filling went by, and the final check
    assert _look(root / "f") == before


def test_seal_refused_no_space_leaves_file_unchanged_bad_flow(small_fs) -> None:
    root, root_fd = small_fs
    before, ctime_ns = _make_file(root / "f"), _ctime_ns(root / "f")
    with pytest.raises(ResourceExhausted, match=r"needs \d+ more bytes allocated but the filesystem has \d+ free"):
        open_sealed_file(root_fd, "f", 64 * MIB, create=False, map_sync=False)
    assert _look(root / "f") == before
    assert _ctime_ns(root / "f") == ctime_ns


def test_seal_refused_no_space_midway_leaves_file_unchanged_bad_flow(small_fs) -> None:
    """statvfs says there is room, fallocate finds out there is not (ext4 grows the file as far as it got)."""
    root, _ = small_fs
    before = _make_file(root / "f")
    plenty = cast(os.statvfs_result, types.SimpleNamespace(f_bfree=1 << 40, f_frsize=4096))   # all it reads
    fd = os.open(root / "f", os.O_RDWR)
    try:
        with pytest.raises(ResourceExhausted, match="No space left on device") as info:
            prepare_file(fd, 64 * MIB, statvfs=lambda fd: plenty)
    finally:
        os.close(fd)
    assert info.value.__cause__.errno == errno.ENOSPC
    assert _look(root / "f") == before


def test_seal_refused_breaker_leaves_file_unchanged_bad_flow(export, sigio_caught) -> None:
    """Another process opens the file while it is being prepared: the Seal fails and the file is put back
    before the lease is let go, so the opener, blocked until then, finds the file as it was."""
    root, root_fd = export
    before = _make_file(root / "f")
    opener = BreakerOnceGrown(root / "f")
    try:
        with pytest.raises(FailedPrecondition, match=r"another process opened the file while it was being sealed.*"
                                                     r"retry when that process is done"):
            open_sealed_file(root_fd, "f", SEAL_LENGTH, create=False, map_sync=False, read_extents=opener)
        out, _ = opener.proc.communicate(timeout=30)
    finally:
        opener.close()
    assert opener.proc.returncode == 0 and int(out) == FILE_SIZE   # the size it saw once its open went through
    assert sigio_caught   # the break really happened
    assert _look(root / "f") == before


def test_seal_refused_map_sync_leaves_file_unchanged_bad_flow(export) -> None:
    """Mapping fails after preparation succeeded (MAP_SYNC on ext4, not DAX): the prepared file is put back."""
    root, root_fd = export
    before = _make_file(root / "f")
    with pytest.raises(FailedPrecondition, match="cannot be mapped MAP_SYNC"):
        open_sealed_file(root_fd, "f", SEAL_LENGTH, create=False, map_sync=True)
    assert _look(root / "f") == before


def test_seal_refused_shorter_length_leaves_file_unchanged_bad_flow(export) -> None:
    """A seal shorter than the file: nothing to truncate, the holes and UNWRITTEN range inside are put back."""
    root, root_fd = export
    before = _make_file(root / "f")
    with pytest.raises(FailedPrecondition, match="cannot be mapped MAP_SYNC"):
        open_sealed_file(root_fd, "f", 3 * MIB, create=False, map_sync=True)
    assert _look(root / "f") == before


def test_seal_refused_created_file_is_removed_bad_flow(export) -> None:
    root, root_fd = export
    with pytest.raises(FailedPrecondition, match="cannot be mapped MAP_SYNC"):
        open_sealed_file(root_fd, "new", MIB, create=True, map_sync=True)
    assert not (root / "new").exists()


def test_seal_delalloc_is_left_to_preparation(export) -> None:
    """DELALLOC (with the UNKNOWN that comes with it) is not refused up front: fsync allocates it."""
    root, root_fd = export
    _make_file(root / "f")
    delalloc = FlagsAdded(FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_UNKNOWN, when=lambda fd: not _grown(fd))
    sealed = open_sealed_file(root_fd, "f", SEAL_LENGTH, create=False, map_sync=False, read_extents=delalloc)
    sealed.close()
    assert delalloc.added >= 1 and (root / "f").stat().st_size == SEAL_LENGTH


def test_prepare_checks_lease_before_changing_anything_bad_flow(fd: int) -> None:
    os.pwrite(fd, b"d" * PAGE_SIZE, 0)
    blocks = os.fstat(fd).st_blocks
    with pytest.raises(FailedPrecondition, match="another process opened the file"):
        prepare_file(fd, 4 * MIB, lease_intact=lambda: False)
    assert (os.fstat(fd).st_size, os.fstat(fd).st_blocks) == (PAGE_SIZE, blocks)


def test_prepare_append_descriptor_bad_flow(tmp_path: Path) -> None:
    ap = os.open(tmp_path / "a.bin", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        with pytest.raises(InvalidArgument, match="O_APPEND"):
            prepare_file(ap, MIB)
        assert os.fstat(ap).st_size == 0
    finally:
        os.close(ap)


class BreakerOnceGrown:
    """A read_extents stand-in that, once preparation has grown the file, has another process open it.

    The open blocks on the node's write lease; this waits until the kernel has started breaking the lease
    (F_GETLEASE no longer F_WRLCK), then lets preparation go on. The opener prints the size it sees.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc: subprocess.Popen | None = None

    def __call__(self, fd: int, start: int = 0, length: int = FIEMAP_MAX_OFFSET, *, sync: bool = True) -> list[Extent]:
        if self.proc is None and _grown(fd):
            code = "import os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\nprint(os.fstat(fd).st_size)\n"
            self.proc = subprocess.Popen([sys.executable, "-c", code, str(self.path)], stdout=subprocess.PIPE,
                                         text=True)
            deadline = time.monotonic() + 30
            while lease_state(fd) == fcntl.F_WRLCK:
                assert time.monotonic() < deadline, "the opener did not break the lease within 30 s"
                assert self.proc.poll() is None, "the opener ended without waiting for the lease"
                time.sleep(0.01)
        return read_extents(fd, start, length, sync=sync)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
