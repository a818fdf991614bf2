"""Tests for service.fiemap: reading block maps and judging whether they can be sealed."""

import os
from pathlib import Path

import pytest

from rdax.service import fiemap
from rdax.service.errors import FailedPrecondition, UnstableBlockMap
from rdax.service.fiemap import Extent, check_stable, clip, flag_names, read_extents, summary

BLOCK = 4096


def _file(tmp_path: Path, name: str = "f.bin") -> int:
    return os.open(tmp_path / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)


def test_read_extents_sparse_file_shows_holes(tmp_path: Path) -> None:
    fd = _file(tmp_path)
    try:
        os.pwrite(fd, b"a" * BLOCK, 0)
        os.pwrite(fd, b"b" * BLOCK, 1 << 20)
        extents = read_extents(fd)
    finally:
        os.close(fd)
    assert [(e.logical, e.length) for e in extents] == [(0, BLOCK), (1 << 20, BLOCK)]
    assert extents[-1].flags & fiemap.FIEMAP_EXTENT_LAST
    with pytest.raises(UnstableBlockMap, match=r"hole \[4096, 1048576\)") as info:
        check_stable(extents, (1 << 20) + BLOCK)
    assert (info.value.offset, info.value.length, info.value.flags) == (BLOCK, (1 << 20) - BLOCK, 0)
    assert info.value.code == "FAILED_PRECONDITION"


def test_check_stable_empty_file_bad_flow(tmp_path: Path) -> None:
    fd = _file(tmp_path)
    try:
        extents = read_extents(fd)
    finally:
        os.close(fd)
    assert extents == []
    with pytest.raises(UnstableBlockMap, match=r"hole \[0, 4096\) at the end"):
        check_stable(extents, BLOCK)


def test_check_stable_short_coverage_bad_flow(tmp_path: Path) -> None:
    fd = _file(tmp_path)
    try:
        os.pwrite(fd, b"a" * 2 * BLOCK, 0)
        extents = read_extents(fd)
    finally:
        os.close(fd)
    with pytest.raises(UnstableBlockMap, match=r"hole \[8192, 16384\) at the end") as info:
        check_stable(extents, 4 * BLOCK)
    assert info.value.offset == 2 * BLOCK


def test_check_stable_fallocated_is_unwritten_bad_flow(tmp_path: Path) -> None:
    fd = _file(tmp_path)
    try:
        os.posix_fallocate(fd, 0, 64 * BLOCK)
        extents = read_extents(fd)
    finally:
        os.close(fd)
    assert extents and all(e.flags & fiemap.FIEMAP_EXTENT_UNWRITTEN for e in extents)
    with pytest.raises(UnstableBlockMap, match="extent #0 .* UNWRITTEN") as info:
        check_stable(extents, 64 * BLOCK)
    assert info.value.flags == fiemap.FIEMAP_EXTENT_UNWRITTEN


def test_check_stable_written_file_passes(tmp_path: Path) -> None:
    fd = _file(tmp_path)
    try:
        os.pwrite(fd, b"x" * 16 * BLOCK, 0)
        extents = read_extents(fd)
    finally:
        os.close(fd)
    assert sum(e.length for e in extents) == 16 * BLOCK
    assert check_stable(extents, 16 * BLOCK) is None
    assert check_stable(extents, 4 * BLOCK) is None


@pytest.mark.parametrize(
    "flag, name",
    [
        (fiemap.FIEMAP_EXTENT_UNWRITTEN, "UNWRITTEN"),
        (fiemap.FIEMAP_EXTENT_SHARED, "SHARED"),
        (fiemap.FIEMAP_EXTENT_DELALLOC | fiemap.FIEMAP_EXTENT_UNKNOWN, "DELALLOC"),
        (fiemap.FIEMAP_EXTENT_DATA_INLINE | fiemap.FIEMAP_EXTENT_NOT_ALIGNED, "DATA_INLINE"),
        (fiemap.FIEMAP_EXTENT_DATA_TAIL, "DATA_TAIL"),
        (fiemap.FIEMAP_EXTENT_UNKNOWN, "UNKNOWN"),
        (fiemap.FIEMAP_EXTENT_ENCODED, "ENCODED"),
        (fiemap.FIEMAP_EXTENT_NOT_ALIGNED, "NOT_ALIGNED"),
    ],
)
def test_check_stable_flag_bad_flow(flag: int, name: str) -> None:
    extents = [Extent(0, 1 << 30, BLOCK, 0), Extent(BLOCK, 2 << 30, BLOCK, flag | fiemap.FIEMAP_EXTENT_LAST)]
    with pytest.raises(UnstableBlockMap, match=rf"extent #1 \[4096, 8192\) has flags .*{name}") as info:
        check_stable(extents, 2 * BLOCK)
    assert info.value.flags == flag


def test_check_stable_harmless_flags_pass() -> None:
    harmless = fiemap.FIEMAP_EXTENT_LAST | fiemap.FIEMAP_EXTENT_MERGED | fiemap.FIEMAP_EXTENT_DATA_ENCRYPTED
    assert check_stable([Extent(0, 1 << 30, BLOCK, harmless)], BLOCK) is None


def test_check_stable_ignores_flags_past_length() -> None:
    extents = [Extent(0, 1 << 30, BLOCK, 0), Extent(BLOCK, 2 << 30, BLOCK, fiemap.FIEMAP_EXTENT_UNWRITTEN)]
    assert check_stable(extents, BLOCK) is None
    with pytest.raises(UnstableBlockMap):
        check_stable(extents, 2 * BLOCK)


def test_read_extents_many_extents_loops(tmp_path: Path) -> None:
    # Every other block written: more separate extents than one ioctl batch holds.
    count = 1200
    fd = _file(tmp_path)
    try:
        for i in range(count):
            os.pwrite(fd, b"z" * BLOCK, 2 * i * BLOCK)
        extents = read_extents(fd)
    finally:
        os.close(fd)
    assert [e.logical for e in extents] == [2 * i * BLOCK for i in range(count)]
    assert extents[-1].flags & fiemap.FIEMAP_EXTENT_LAST


def test_read_extents_range_limits_result(tmp_path: Path) -> None:
    fd = _file(tmp_path)
    try:
        for i in range(8):
            os.pwrite(fd, b"z" * BLOCK, 2 * i * BLOCK)
        extents = read_extents(fd, 4 * BLOCK, 4 * BLOCK)
    finally:
        os.close(fd)
    assert [e.logical for e in extents] == [4 * BLOCK, 6 * BLOCK]


def test_read_extents_pipe_bad_flow() -> None:
    rfd, wfd = os.pipe()
    try:
        with pytest.raises(FailedPrecondition, match="does not support FIEMAP"):
            read_extents(rfd)
    finally:
        os.close(rfd)
        os.close(wfd)


def test_summary_fingerprint_stable_across_calls(tmp_path: Path) -> None:
    fd = _file(tmp_path)
    try:
        os.pwrite(fd, b"q" * 8 * BLOCK, 0)
        first, second = summary(read_extents(fd)), summary(read_extents(fd))
    finally:
        os.close(fd)
    assert first == second
    assert first[0] >= 1 and len(first[1]) == 64


def test_summary_fingerprint_changes_when_blocks_move() -> None:
    before = summary([Extent(0, 1 << 30, 2 * BLOCK, 0)])
    after = summary([Extent(0, 1 << 30, BLOCK, 0), Extent(BLOCK, 3 << 30, BLOCK, 0)])
    assert before[1] != after[1]


def test_summary_ignores_record_splits_and_flags() -> None:
    whole = summary([Extent(0, 1 << 30, 2 * BLOCK, fiemap.FIEMAP_EXTENT_LAST)])
    split = summary([Extent(0, 1 << 30, BLOCK, 0), Extent(BLOCK, (1 << 30) + BLOCK, BLOCK, fiemap.FIEMAP_EXTENT_LAST)])
    assert (whole[0], split[0]) == (1, 2)
    assert whole[1] == split[1]


def test_clip_trims_crossing_extent() -> None:
    extents = [Extent(0, 1 << 30, 4 * BLOCK, 0), Extent(4 * BLOCK, 2 << 30, BLOCK, 0)]
    assert clip(extents, 2 * BLOCK) == [Extent(0, 1 << 30, 2 * BLOCK, 0)]


def test_flag_names_lists_set_bits() -> None:
    assert flag_names(fiemap.FIEMAP_EXTENT_UNWRITTEN | fiemap.FIEMAP_EXTENT_LAST) == "LAST|UNWRITTEN"
    assert flag_names(0) == "none"
