"""Open a client-supplied relative path beneath an export root without ever leaving it."""

import errno
import logging
import os
import stat
from typing import NamedTuple

from .audit import quote
from .errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, RdaxError, Unavailable
from .limits import MAX_PATH_BYTES

log = logging.getLogger(__name__)

# O_NOFOLLOW on every component is what keeps the walk beneath the root: a
# symlink, wherever it points, is refused rather than followed.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the lstat check must not block the open,
# and a file under someone else's lease must fail fast instead of waiting out
# lease-break-time. It is cleared again once the object is known to be a file.
_FILE_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_SYMLINKS = "symlinks are never followed beneath the export root, use the real path"


class ResolvedPath(NamedTuple):
    """An O_RDWR|O_CLOEXEC descriptor of a regular file and its canonical relative path."""

    fd: int
    relpath: str
    created: bool = False   # this call made the file (create=True and it did not exist)


def resolve_beneath(
    root: int | str | os.PathLike[str], relpath: str, *, create: bool = False, mode: int = 0o600
) -> ResolvedPath:
    """Open the regular file `relpath` beneath `root` (a directory fd or path) for reading and writing.

    With `create`, a missing file is created with `mode`; its parent directories
    must already exist. The caller owns the returned descriptor.
    """
    parts = split_relpath(relpath)
    canonical = "/".join(parts)
    owns_root = not isinstance(root, int)
    root_fd = root if isinstance(root, int) else _open_root(root)
    try:
        parent_fd = _walk_dirs(root_fd, parts[:-1], canonical)
        try:
            fd, created = _open_leaf(parent_fd, parts[-1], canonical, create, mode)
        finally:
            if parent_fd != root_fd:
                os.close(parent_fd)
    finally:
        if owns_root:
            os.close(root_fd)
    return ResolvedPath(fd, canonical, created)


def stat_beneath(root_fd: int, relpath: str) -> os.stat_result:
    """lstat the regular file `relpath` beneath `root_fd` without opening it (an open would break a lease)."""
    parts = split_relpath(relpath)
    canonical = "/".join(parts)
    parent_fd = _walk_dirs(root_fd, parts[:-1], canonical)
    try:
        st = _lstat(parent_fd, parts[-1], canonical)
    finally:
        if parent_fd != root_fd:
            os.close(parent_fd)
    _require_regular(st, canonical)
    return st


def unlink_beneath(root_fd: int, relpath: str, fd: int) -> None:
    """Remove `relpath` beneath `root_fd` if the name still leads to the file open as `fd`: undoes a
    create when what followed it failed. (A rename in between leaves the name alone.)"""
    # It runs while another error unwinds: it must not replace that error
    # with its own, so a name it cannot remove is logged and left.
    parts = split_relpath(relpath)
    try:
        parent_fd = _walk_dirs(root_fd, parts[:-1], relpath)
    except RdaxError as exc:
        log.warning("could not remove %r after a failed create: %s", relpath, exc)
        return
    try:
        named, mine = os.stat(parts[-1], dir_fd=parent_fd, follow_symlinks=False), os.fstat(fd)
        if (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino):
            os.unlink(parts[-1], dir_fd=parent_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %r after a failed create: %s", relpath, exc)
    finally:
        if parent_fd != root_fd:
            os.close(parent_fd)


def split_relpath(relpath: str) -> list[str]:
    """Check `relpath` lexically and return its components without '.' or empty ones."""
    if not relpath:
        raise InvalidArgument("path is empty: name a file relative to the export root")
    size = len(relpath.encode("utf-8", "surrogatepass"))
    if size > MAX_PATH_BYTES:
        raise InvalidArgument(f"path {quote(relpath, 80)!r} is {size} bytes long: paths are limited to "
                              f"{MAX_PATH_BYTES} bytes, use a shorter one")
    if "\0" in relpath:
        raise InvalidArgument(f"path {quote(relpath, 200)!r} contains a NUL byte: file names cannot contain NUL")
    if relpath.startswith("/"):
        raise InvalidArgument(
            f"path {quote(relpath, 200)!r} is absolute: paths are relative to the export root, drop the leading '/'"
        )
    if relpath.endswith("/"):
        raise InvalidArgument(f"path {quote(relpath, 200)!r} ends with '/': name a regular file, not a directory")
    components = relpath.split("/")
    if ".." in components:
        raise InvalidArgument(
            f"path {quote(relpath, 200)!r} contains '..': "
            "paths are relative to the export root and cannot climb out of it"
        )
    parts = [c for c in components if c not in ("", ".")]
    if not parts:
        raise InvalidArgument(f"path {quote(relpath, 200)!r} names the export root itself: "
                              "name a regular file beneath it")
    return parts


def _open_root(root: str | os.PathLike[str]) -> int:
    # The root comes from the server's own configuration, so following a
    # symlink in it is fine; only the client's part is confined.
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise RdaxError(
            f"export root {os.fspath(root)!r} cannot be opened ({exc.strerror}): "
            "check the server's export configuration"
        ) from exc


def _walk_dirs(root_fd: int, dirs: list[str], canonical: str) -> int:
    """Open each directory of `dirs` in turn beneath `root_fd` and return the last one."""
    current = root_fd
    for depth, name in enumerate(dirs, start=1):
        try:
            child = os.open(name, _DIR_FLAGS, dir_fd=current)
        except OSError as exc:
            raise _dir_error(exc, current, name, "/".join(dirs[:depth]), canonical) from exc
        finally:
            if current != root_fd:
                os.close(current)
        current = child
    return current


def _dir_error(exc: OSError, dir_fd: int, name: str, shown: str, canonical: str) -> RdaxError:
    if exc.errno == errno.ENOENT:
        return NotFound(
            f"directory {shown!r} of path {canonical!r} does not exist beneath the export root: "
            "parent directories are never created, make it first"
        )
    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
        kind = _describe(dir_fd, name)
        if kind == "a symbolic link":
            return PermissionDenied(f"{shown!r} in path {canonical!r} is a symbolic link: {_NO_SYMLINKS}")
        return FailedPrecondition(f"{shown!r} in path {canonical!r} is {kind}, not a directory")
    return _os_error(exc, canonical)


def _open_leaf(dir_fd: int, name: str, canonical: str, create: bool, mode: int) -> tuple[int, bool]:
    """The file's descriptor, and whether this call created it."""
    if create:
        try:
            return os.open(name, _CREATE_FLAGS, mode, dir_fd=dir_fd), True
        except FileExistsError:
            pass  # create-or-open: an existing regular file is what the caller wants
        except OSError as exc:
            raise _os_error(exc, canonical) from exc
    _require_regular(_lstat(dir_fd, name, canonical), canonical)
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise _os_error(exc, canonical) from exc
    try:
        # The name may have been swapped between the lstat and the open.
        _require_regular(os.fstat(fd), canonical)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, False


def _lstat(dir_fd: int, name: str, canonical: str) -> os.stat_result:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        raise _os_error(exc, canonical) from exc


def _require_regular(st: os.stat_result, canonical: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise PermissionDenied(f"path {canonical!r} is a symbolic link: {_NO_SYMLINKS}")
    if not stat.S_ISREG(st.st_mode):
        raise FailedPrecondition(f"path {canonical!r} is {_kind(st.st_mode)}: only regular files can be opened")


def _describe(dir_fd: int, name: str) -> str:
    try:
        return _kind(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return "not accessible"


def _kind(st_mode: int) -> str:
    kinds = {
        stat.S_IFREG: "a regular file",
        stat.S_IFDIR: "a directory",
        stat.S_IFLNK: "a symbolic link",
        stat.S_IFIFO: "a FIFO",
        stat.S_IFSOCK: "a socket",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
    }
    return kinds.get(stat.S_IFMT(st_mode), "of an unknown file type")


def _os_error(exc: OSError, canonical: str) -> RdaxError:
    """Translate an errno from opening `canonical` into the error a client sees."""
    code = exc.errno
    if code == errno.ENOENT:
        return NotFound(f"path {canonical!r} does not exist beneath the export root")
    if code == errno.ELOOP:
        return PermissionDenied(f"path {canonical!r} is a symbolic link: {_NO_SYMLINKS}")
    if code in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"path {canonical!r}: permission denied by the filesystem ({exc.strerror})")
    if code == errno.EISDIR:
        return FailedPrecondition(f"path {canonical!r} is a directory: only regular files can be opened")
    if code == errno.ENAMETOOLONG:
        return InvalidArgument(f"path {canonical!r} has a component longer than the filesystem allows")
    if code == errno.EROFS:
        return FailedPrecondition(f"path {canonical!r} is on a read-only filesystem: it cannot be opened for writing")
    if code == errno.EWOULDBLOCK:
        return Unavailable(
            f"path {canonical!r} is leased by another holder (it is being sealed or is sealed): "
            "retry once it is released"
        )
    return RdaxError(f"path {canonical!r} cannot be opened: {exc.strerror} (errno {code})")
