"""Hold a write lease on an open file so that the kernel reports anyone else opening it."""

import errno
import fcntl

from .errors import FailedPrecondition, PermissionDenied, RdaxError, Unavailable

F_SETLEASE = 1024
F_GETLEASE = 1025


class FileLease:
    """A write lease (F_SETLEASE F_WRLCK) on `fd`, taken on construction, dropped by release() or on leaving a with
    block.

    Linux grants it only while the file has no other open file description:
    another descriptor, even O_RDONLY in this very process, or a mapping made
    through one that is closed since, makes it fail. A dup() of `fd` is fine.
    The lease goes away by itself when `fd` is closed.

    When someone else opens the file, the kernel starts a lease break and
    signals the holder (SIGIO unless F_SETSIG chose another signal). SIGIO's
    default action ends the process: install a handler before taking leases.
    If the lease is not released within /proc/sys/fs/lease-break-time
    seconds, the kernel drops it and lets the opener proceed.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            fcntl.fcntl(fd, F_SETLEASE, fcntl.F_WRLCK)
        except OSError as exc:
            raise _lease_error(exc) from exc
        self.held = True

    def release(self) -> None:
        """Drop the lease; calling it again, or after the kernel broke the lease, does nothing."""
        if not self.held:
            return
        self.held = False
        try:
            fcntl.fcntl(self.fd, F_SETLEASE, fcntl.F_UNLCK)
        except OSError as exc:
            # EAGAIN: no lease left to drop, the kernel already broke it.
            if exc.errno != errno.EAGAIN:
                raise RdaxError(f"releasing the lease failed: {exc.strerror} (errno {exc.errno})") from exc

    def __enter__(self) -> "FileLease":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def lease_state(fd: int) -> int:
    """Return F_GETLEASE for `fd`: fcntl.F_WRLCK while held, F_UNLCK when not, the target type during a break."""
    return fcntl.fcntl(fd, F_GETLEASE)


def _lease_error(exc: OSError) -> RdaxError:
    if exc.errno == errno.EAGAIN:
        return Unavailable(
            "the file is open elsewhere, so no write lease can be taken: another descriptor, "
            "a live mapping or another process (including this one) has it open; close those and retry"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(
            "a lease needs the file to be owned by the caller or the CAP_LEASE capability: "
            "run the service as root or as the files' owner"
        )
    if exc.errno == errno.EINVAL:
        return FailedPrecondition(
            "no lease can be taken on this descriptor: it is not a regular file, the filesystem "
            "does not support leases, or leases are disabled (/proc/sys/fs/leases-enable is 0)"
        )
    return RdaxError(f"taking the lease failed: {exc.strerror} (errno {exc.errno})")
