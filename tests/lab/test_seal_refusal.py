"""Lab: a refused Seal leaves the file as it was (issue 14), on the XFS dax=always mount (reflink=1).

open_sealed_file is called in this (storage) process, as the node calls it:
the first test seals a reflinked copy, whose SHARED extents are refused before
anything is changed; the second has another process open a file while it is
being prepared, so that the Seal fails after the file was grown, allocated and
zero-filled, and must be put back on DAX (truncate, punch, ZERO_RANGE).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from labkit import pattern

from rdax.service.errors import FailedPrecondition, UnstableBlockMap
from rdax.service.fiemap import (
    FIEMAP_EXTENT_LAST,
    FIEMAP_EXTENT_SHARED,
    FIEMAP_EXTENT_UNWRITTEN,
    FIEMAP_MAX_OFFSET,
    Extent,
    read_extents,
)
from rdax.service.lease import lease_state
from rdax.service.seals import open_sealed_file

MiB = 1 << 20


class Look(NamedTuple):
    size: int
    blocks: int
    sha256: str
    mtime_ns: int
    extents: tuple[tuple[int, int, int, int], ...]   # (logical, physical, length, flags without LAST)


def look(path: Path) -> Look:
    st = path.stat()
    with open(path, "rb") as f:   # a second open by this process: only while no lease is held
        digest = hashlib.sha256(f.read()).hexdigest()
        extents = tuple((e.logical, e.physical, e.length, e.flags & ~FIEMAP_EXTENT_LAST)
                        for e in read_extents(f.fileno()))
    return Look(st.st_size, st.st_blocks, digest, st.st_mtime_ns, extents)


def write_file(path: Path, data: bytes, offset: int = 0, size: int | None = None) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.pwrite(fd, data, offset)
        if size is not None:
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(path: Path, length: int, **kwargs) -> None:
    """open_sealed_file on `path`, as the node does it (MAP_SYNC); a seal that is made is let go at once."""
    root_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        open_sealed_file(root_fd, path.name, length, create=False, map_sync=True, **kwargs).close()
    finally:
        os.close(root_fd)


@pytest.fixture
def source(dax_file):
    """A second file beside dax_file (the reflink's source), removed afterwards."""
    path = dax_file.with_name(dax_file.name + ".src")
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.parametrize("length", [8 * MiB, MiB], ids=["longer-than-the-file", "as-long-as-the-file"])
def test_seal_refused_reflinked_leaves_file_unchanged_bad_flow(lab, dax_file, source, length):
    """Issue 14 as reported: a 1 MiB reflinked copy, refused for SHARED extents, had become 8 MiB."""
    write_file(source, pattern(14, MiB))
    copy = subprocess.run(["cp", "--reflink=always", str(source), str(dax_file)], capture_output=True, text=True)
    assert copy.returncode == 0, f"cp --reflink=always failed on {lab['RDAX_DAX_MOUNT']}: {copy.stderr}"
    before = look(dax_file), look(source)
    assert all(flags & FIEMAP_EXTENT_SHARED for *_, flags in before[0].extents), \
        f"the reflinked copy has extents that are not SHARED: {before[0].extents}"

    with pytest.raises(UnstableBlockMap, match="SHARED: blocks shared with another file") as info:
        seal(dax_file, length)

    assert info.value.code == "FAILED_PRECONDITION"
    assert (look(dax_file), look(source)) == before   # size, st_blocks, bytes, mtime, blocks still shared


class OpenerOnceGrown:
    """A read_extents stand-in: once preparation has grown the file to `length`, another process opens it.

    The open waits for the node's write lease; this waits until the kernel has
    started breaking it, then lets preparation go on. The opener prints the
    size it finds once its open goes through.
    """

    def __init__(self, path: Path, length: int) -> None:
        self.path = path
        self.length = length
        self.proc: subprocess.Popen | None = None

    def __call__(self, fd: int, start: int = 0, length: int = FIEMAP_MAX_OFFSET, *, sync: bool = True) -> list[Extent]:
        if self.proc is None and os.fstat(fd).st_size >= self.length:
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


@pytest.fixture
def sigio_caught():
    """A lease break signals the holder with SIGIO, whose default action ends the process: count them instead."""
    caught: list[int] = []
    previous = signal.signal(signal.SIGIO, lambda signum, frame: caught.append(signum))
    yield caught
    signal.signal(signal.SIGIO, previous)


def test_seal_broken_during_preparation_leaves_file_unchanged_bad_flow(lab, dax_file, sigio_caught):
    """Data, a hole, an UNWRITTEN MiB, an end inside a block; grown to 8 MiB, then someone opens it: put back."""
    size, length = 3 * MiB + 1234, 8 * MiB
    write_file(dax_file, pattern(15, 256 * 1024), size=size)
    fd = os.open(dax_file, os.O_RDWR)
    try:
        os.pwrite(fd, pattern(16, 100 * 1024), MiB + 7)
        os.posix_fallocate(fd, 2 * MiB, MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    before = look(dax_file)
    assert any(flags & FIEMAP_EXTENT_UNWRITTEN for *_, flags in before.extents), before.extents

    opener = OpenerOnceGrown(dax_file, length)
    try:
        with pytest.raises(FailedPrecondition, match="another process opened the file while it was being sealed"):
            seal(dax_file, length, read_extents=opener)
        assert opener.proc is not None, "preparation never grew the file: the opener was not started"
        out, _ = opener.proc.communicate(timeout=60)
    finally:
        opener.close()

    assert opener.proc.returncode == 0 and int(out) == size   # the opener never saw the grown file
    assert sigio_caught, "no SIGIO: the lease was not broken"
    after = look(dax_file)
    # Where the data lives may not change; the UNWRITTEN MiB is UNWRITTEN again, on blocks that may have moved.
    assert (after.size, after.blocks, after.sha256, after.mtime_ns) == before[:4]
    data = [(lo, ph, ln) for lo, ph, ln, flags in before.extents if not flags & FIEMAP_EXTENT_UNWRITTEN]
    assert [(lo, ph, ln) for lo, ph, ln, flags in after.extents if not flags & FIEMAP_EXTENT_UNWRITTEN] == data
