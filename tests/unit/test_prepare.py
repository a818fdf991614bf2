"""Tests for service.prepare: making a file's block map stable before sealing it."""

import ctypes
import os
from pathlib import Path

import pytest

from rdax.service.errors import FailedPrecondition, InvalidArgument, UnstableBlockMap
from rdax.service.fiemap import FIEMAP_EXTENT_UNWRITTEN, check_stable, read_extents, summary
from rdax.service.prepare import PAGE_SIZE, PreparedFile, block_map, prepare_file

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
