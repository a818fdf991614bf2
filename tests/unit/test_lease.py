"""Tests for service.lease: write leases on open files, as Linux actually grants them."""

import fcntl
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rdax.service.errors import FailedPrecondition, Unavailable
from rdax.service.lease import FileLease, lease_state


@pytest.fixture
def path(tmp_path: Path) -> Path:
    target = tmp_path / "f.bin"
    target.write_bytes(bytes(mmap.PAGESIZE))
    return target


@pytest.fixture
def fd(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def test_lease_exclusive_fd_granted_then_released(fd: int) -> None:
    with FileLease(fd) as lease:
        assert lease.held
        assert lease_state(fd) == fcntl.F_WRLCK
    assert not lease.held
    assert lease_state(fd) == fcntl.F_UNLCK


def test_lease_release_twice_is_harmless(fd: int) -> None:
    lease = FileLease(fd)
    lease.release()
    lease.release()
    assert lease_state(fd) == fcntl.F_UNLCK


def test_lease_dup_of_same_fd_granted(fd: int) -> None:
    # A dup shares the open file description, so it is not "someone else".
    dup = os.dup(fd)
    try:
        with FileLease(fd):
            assert lease_state(dup) == fcntl.F_WRLCK
    finally:
        os.close(dup)


def test_lease_other_rdonly_fd_same_process_bad_flow(fd: int, path: Path) -> None:
    other = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(Unavailable, match="open elsewhere") as info:
            FileLease(fd)
        assert info.value.code == "UNAVAILABLE"
        assert lease_state(fd) == fcntl.F_UNLCK
    finally:
        os.close(other)
    with FileLease(fd):
        assert lease_state(fd) == fcntl.F_WRLCK


def test_lease_mapping_outliving_its_fd_bad_flow(fd: int, path: Path) -> None:
    # A mapping keeps its open file description alive after the fd is closed.
    other = os.open(path, os.O_RDWR)
    mapping = mmap.mmap(other, mmap.PAGESIZE)
    os.close(other)
    try:
        with pytest.raises(Unavailable):
            FileLease(fd)
    finally:
        mapping.close()
    with FileLease(fd):
        assert lease_state(fd) == fcntl.F_WRLCK


def test_lease_pipe_bad_flow() -> None:
    rfd, wfd = os.pipe()
    try:
        with pytest.raises(FailedPrecondition, match="not a regular file"):
            FileLease(rfd)
    finally:
        os.close(rfd)
        os.close(wfd)


def test_lease_break_signals_holder_bad_flow(fd: int, path: Path) -> None:
    signals: list[int] = []
    previous = signal.signal(signal.SIGIO, lambda signum, frame: signals.append(signum))
    try:
        with FileLease(fd) as lease:
            # O_NONBLOCK makes the opener fail at once instead of waiting out lease-break-time.
            opener = (
                "import os, sys\n"
                "try:\n    os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK)\n"
                "except BlockingIOError:\n    sys.exit(11)\n"
            )
            child = subprocess.run([sys.executable, "-c", opener, str(path)], check=False)
            deadline = time.monotonic() + 5
            while not signals and time.monotonic() < deadline:
                time.sleep(0.01)
            assert child.returncode == 11
            assert signals == [signal.SIGIO]
            assert lease_state(fd) == fcntl.F_RDLCK  # downgrade asked for by a reader
            lease.release()
        assert lease_state(fd) == fcntl.F_UNLCK
    finally:
        signal.signal(signal.SIGIO, previous)
