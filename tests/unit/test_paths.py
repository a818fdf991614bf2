"""Tests for service.paths: resolving client paths beneath an export root."""

import fcntl
import os
import stat
from pathlib import Path

import pytest

from rdax.service.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, RdaxError
from rdax.service.paths import resolve_beneath, unlink_beneath


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An export root holding d/f.bin, with a secret file outside it."""
    export = tmp_path / "export"
    (export / "d").mkdir(parents=True)
    (export / "d" / "f.bin").write_bytes(b"inside")
    (tmp_path / "secret").write_bytes(b"outside")
    return export


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_resolve_existing_file_returns_rdwr_cloexec_fd(root: Path) -> None:
    fd, rel, created = resolve_beneath(root, "d/f.bin")
    try:
        assert rel == "d/f.bin"
        assert os.path.samestat(os.fstat(fd), os.stat(root / "d" / "f.bin"))
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        assert flags & os.O_ACCMODE == os.O_RDWR
        assert not flags & os.O_NONBLOCK
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(fd)


def test_resolve_root_fd_accepted_and_left_open(root: Path) -> None:
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd, rel, created = resolve_beneath(root_fd, "d/f.bin")
        os.close(fd)
        assert rel == "d/f.bin"
        assert stat.S_ISDIR(os.fstat(root_fd).st_mode)
    finally:
        os.close(root_fd)


def test_resolve_canonicalises_dot_and_empty_components(root: Path) -> None:
    fd, rel, created = resolve_beneath(root, "./d//./f.bin")
    os.close(fd)
    assert rel == "d/f.bin"


def test_resolve_dotdot_bad_flow(root: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"contains '\.\.'") as info:
        resolve_beneath(root, "d/../d/f.bin")
    assert info.value.code == "INVALID_ARGUMENT"


def test_resolve_dotdot_escaping_bad_flow(root: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"'\.\.'"):
        resolve_beneath(root, "../secret")


def test_resolve_absolute_bad_flow(root: Path) -> None:
    with pytest.raises(InvalidArgument, match="absolute"):
        resolve_beneath(root, str(root / "d" / "f.bin"))


def test_resolve_empty_bad_flow(root: Path) -> None:
    with pytest.raises(InvalidArgument, match="empty"):
        resolve_beneath(root, "")


def test_resolve_nul_byte_bad_flow(root: Path) -> None:
    with pytest.raises(InvalidArgument, match="NUL"):
        resolve_beneath(root, "d/f.bin\0.txt")


def test_resolve_trailing_slash_bad_flow(root: Path) -> None:
    with pytest.raises(InvalidArgument, match="ends with '/'"):
        resolve_beneath(root, "d/")


def test_resolve_root_itself_bad_flow(root: Path) -> None:
    with pytest.raises(InvalidArgument, match="export root itself"):
        resolve_beneath(root, "./.")


def test_resolve_symlink_in_middle_escaping_bad_flow(root: Path, tmp_path: Path) -> None:
    (root / "out").symlink_to(tmp_path)
    with pytest.raises(PermissionDenied, match="'out' in path 'out/secret' is a symbolic link") as info:
        resolve_beneath(root, "out/secret")
    assert info.value.code == "PERMISSION_DENIED"


def test_resolve_symlink_in_middle_inside_root_bad_flow(root: Path) -> None:
    (root / "alias").symlink_to("d")
    with pytest.raises(PermissionDenied, match="symbolic link"):
        resolve_beneath(root, "alias/f.bin")


def test_resolve_symlink_at_end_escaping_bad_flow(root: Path, tmp_path: Path) -> None:
    (root / "d" / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(PermissionDenied, match="symbolic link"):
        resolve_beneath(root, "d/leak")


def test_resolve_symlink_at_end_inside_root_bad_flow(root: Path) -> None:
    (root / "d" / "alias").symlink_to("f.bin")
    with pytest.raises(PermissionDenied, match="symbolic link"):
        resolve_beneath(root, "d/alias")


def test_resolve_create_through_dangling_symlink_bad_flow(root: Path, tmp_path: Path) -> None:
    target = tmp_path / "planted"
    (root / "d" / "trap").symlink_to(target)
    with pytest.raises(PermissionDenied, match="symbolic link"):
        resolve_beneath(root, "d/trap", create=True)
    assert not target.exists()


def test_resolve_directory_as_final_object_bad_flow(root: Path) -> None:
    with pytest.raises(FailedPrecondition, match="'d' is a directory") as info:
        resolve_beneath(root, "d")
    assert info.value.code == "FAILED_PRECONDITION"


def test_resolve_fifo_bad_flow(root: Path) -> None:
    os.mkfifo(root / "d" / "pipe")
    with pytest.raises(FailedPrecondition, match="is a FIFO"):
        resolve_beneath(root, "d/pipe")


def test_resolve_file_as_directory_bad_flow(root: Path) -> None:
    with pytest.raises(FailedPrecondition, match="'d/f.bin' in path 'd/f.bin/x' is a regular file, not a directory"):
        resolve_beneath(root, "d/f.bin/x")


def test_resolve_missing_file_bad_flow(root: Path) -> None:
    with pytest.raises(NotFound, match="does not exist") as info:
        resolve_beneath(root, "d/nope.bin")
    assert info.value.code == "NOT_FOUND"


def test_resolve_create_missing_parent_bad_flow(root: Path) -> None:
    with pytest.raises(NotFound, match="directory 'nodir' .* make it first"):
        resolve_beneath(root, "nodir/new.bin", create=True)
    assert not (root / "nodir").exists()


def test_resolve_create_makes_private_empty_file(root: Path) -> None:
    fd, rel, created = resolve_beneath(root, "d/new.bin", create=True)
    try:
        st = os.fstat(fd)
        assert rel == "d/new.bin" and created
        assert os.path.samestat(st, os.stat(root / "d" / "new.bin"))
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0
    finally:
        os.close(fd)


def test_resolve_create_existing_keeps_content(root: Path) -> None:
    fd, _, created = resolve_beneath(root, "d/f.bin", create=True)
    try:
        assert os.pread(fd, 100, 0) == b"inside" and not created
    finally:
        os.close(fd)


def test_resolve_missing_root_bad_flow(tmp_path: Path) -> None:
    with pytest.raises(RdaxError, match="export root .* cannot be opened") as info:
        resolve_beneath(tmp_path / "absent", "f.bin")
    assert info.value.code == "INTERNAL"


def test_resolve_failures_leak_no_descriptor_bad_flow(root: Path, tmp_path: Path) -> None:
    (root / "d" / "leak").symlink_to(tmp_path / "secret")
    before = _open_fds()
    for relpath in ("d/leak", "d/f.bin/x", "d/missing/f", "d"):
        with pytest.raises(RdaxError):
            resolve_beneath(root, relpath)
    assert _open_fds() == before


def test_unlink_beneath_removes_only_the_file_it_was_given(root: Path) -> None:
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    fd, rel, created = resolve_beneath(root_fd, "d/new.bin", create=True)
    try:
        os.rename(root / "d" / "new.bin", root / "d" / "moved.bin")
        (root / "d" / "new.bin").write_bytes(b"someone else's")
        unlink_beneath(root_fd, rel, fd)   # the name now leads elsewhere: left alone
        assert (root / "d" / "new.bin").read_bytes() == b"someone else's"
        os.rename(root / "d" / "moved.bin", root / "d" / "new.bin")
        unlink_beneath(root_fd, rel, fd)
        assert not (root / "d" / "new.bin").exists()
        unlink_beneath(root_fd, "gone/new.bin", fd)   # cleanup never raises over the error it follows
    finally:
        os.close(fd)
        os.close(root_fd)
