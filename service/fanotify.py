"""fanotify on sealed files: notice the seal breaks a lease cannot see.

A write lease catches other processes' open() and truncate(); rename, link,
unlink and chmod go by path and never open the file. An inode mark with
FAN_REPORT_FID reports them (MOVE_SELF, ATTRIB, DELETE_SELF) together with
writes (MODIFY, CLOSE_WRITE) and opens, with the pid of the process that did
it and a file handle that names the inode — and, unlike plain fanotify, opens
no descriptor of the file on our behalf (which would break our own lease).
Python has no binding; this is ctypes on libc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
import threading
from collections.abc import Callable

log = logging.getLogger("rdax.service")

FAN_CLOEXEC, FAN_NONBLOCK, FAN_CLASS_NOTIF, FAN_REPORT_FID = 0x1, 0x2, 0x0, 0x200
FAN_MARK_ADD, FAN_MARK_REMOVE = 0x1, 0x2
FAN_MODIFY, FAN_ATTRIB, FAN_CLOSE_WRITE, FAN_OPEN = 0x2, 0x4, 0x8, 0x20
FAN_DELETE_SELF, FAN_MOVE_SELF, FAN_Q_OVERFLOW = 0x400, 0x800, 0x4000
FAN_EVENT_INFO_TYPE_FID = 1
AT_EMPTY_PATH = 0x1000
WATCHED = FAN_MODIFY | FAN_ATTRIB | FAN_CLOSE_WRITE | FAN_OPEN | FAN_DELETE_SELF | FAN_MOVE_SELF
_METADATA = struct.Struct("=IBBHQii")         # event_len, vers, reserved, metadata_len, mask, fd, pid
_INFO_HEADER = struct.Struct("=BBH")           # info_type, pad, len
_FSID = 8
_HANDLE = struct.Struct("=Ii")                 # handle_bytes, handle_type
MAX_HANDLE_SZ = 128

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]

_NAMES = [(FAN_OPEN, "opened"), (FAN_MODIFY, "modified (write, truncate or fallocate)"),
          (FAN_CLOSE_WRITE, "closed after writing"), (FAN_ATTRIB, "attributes changed (chmod, link or unlink)"),
          (FAN_MOVE_SELF, "renamed"), (FAN_DELETE_SELF, "deleted")]


def describe(mask: int) -> str:
    return ", ".join(name for bit, name in _NAMES if mask & bit) or f"mask {mask:#x}"


def file_key(fd: int) -> bytes:
    """The (handle_type, handle) of an open file, as fanotify reports it."""
    buf = ctypes.create_string_buffer(_HANDLE.size + MAX_HANDLE_SZ)
    _HANDLE.pack_into(buf, 0, MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), AT_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"name_to_handle_at(fd={fd}, AT_EMPTY_PATH): {os.strerror(err)}")
    size, kind = _HANDLE.unpack_from(buf, 0)
    return struct.pack("=i", kind) + buf.raw[_HANDLE.size:_HANDLE.size + size]


def parse_events(data: bytes) -> list[tuple[int, int, bytes | None]]:
    """(mask, pid, file key) for each event in a read() of a FAN_REPORT_FID group."""
    events, pos = [], 0
    while pos + _METADATA.size <= len(data):
        event_len, _vers, _res, meta_len, mask, _fd, pid = _METADATA.unpack_from(data, pos)
        if event_len < _METADATA.size:
            break
        key, info = None, pos + meta_len
        while info + _INFO_HEADER.size <= pos + event_len:
            info_type, _pad, info_len = _INFO_HEADER.unpack_from(data, info)
            if info_len == 0:
                break
            if info_type == FAN_EVENT_INFO_TYPE_FID:
                handle_at = info + _INFO_HEADER.size + _FSID
                size, kind = _HANDLE.unpack_from(data, handle_at)
                start = handle_at + _HANDLE.size
                key = struct.pack("=i", kind) + data[start:start + size]
            info += info_len
        events.append((mask, pid, key))
        pos += event_len
    return events


CAP_SYS_ADMIN = 21


def _status_field(status: str, name: str) -> str:
    for line in status.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def explain_init_error(err: int, status: str | None = None) -> str:
    """What blocks fanotify_init(FAN_CLASS_NOTIF|FAN_REPORT_FID) here, and what to do about it.

    The kernel allows this group without any capability since Linux 5.13 (unprivileged fanotify); what refuses
    it is usually a container runtime's default seccomp profile, which allows fanotify_init only to a process
    with CAP_SYS_ADMIN. `status` is /proc/self/status (read when not given)."""
    if status is None:
        try:
            with open("/proc/self/status") as f:
                status = f.read()
        except OSError:
            status = ""
    try:
        cap_sys_admin = bool(int(_status_field(status, "CapEff") or "0", 16) >> CAP_SYS_ADMIN & 1)
    except ValueError:
        cap_sys_admin = False
    seccomp = _status_field(status, "Seccomp") not in ("", "0")
    if err == errno.EPERM and seccomp and not cap_sys_admin:
        return ("refused by the seccomp filter this process runs under, most likely a container runtime's default "
                "profile, which allows fanotify_init only with CAP_SYS_ADMIN (the kernel itself allows it "
                "unprivileged since 5.13). Run the container with docker/seccomp.json (the default profile plus "
                "fanotify_init; Kubernetes: a Localhost seccomp profile), or, with more privilege, --cap-add SYS_ADMIN")
    if err == errno.EPERM and seccomp:
        return "refused by the seccomp filter this process runs under: its profile must allow fanotify_init"
    if err == errno.EPERM:
        return ("the kernel refuses unprivileged fanotify (Linux >= 5.13 allows FAN_REPORT_FID notification groups "
                "without CAP_SYS_ADMIN; older kernels need CAP_SYS_ADMIN)")
    if err == errno.EINVAL:
        return "the kernel does not know FAN_REPORT_FID (needs Linux >= 5.1)"
    if err in (errno.EMFILE, errno.ENFILE):
        return "too many fanotify groups or open files for this user (fs.fanotify.max_user_groups, ulimit -n)"
    if err == errno.ENOSYS:
        return "this kernel has no fanotify (CONFIG_FANOTIFY)"
    return "needs a kernel >= 5.13, or CAP_SYS_ADMIN on an older one"


class SealWatcher:
    """One fanotify group; inode marks on sealed files; a thread that calls
    `on_break(key, mask, pid)` for each event another process caused."""

    def __init__(self, on_break: Callable[[bytes, int, int], None]) -> None:
        self._fd = _libc.fanotify_init(FAN_CLASS_NOTIF | FAN_REPORT_FID | FAN_CLOEXEC | FAN_NONBLOCK,
                                       os.O_RDONLY | os.O_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fanotify_init(FAN_CLASS_NOTIF|FAN_REPORT_FID): {os.strerror(err)}: "
                               f"{explain_init_error(err)}")
        self._on_break = on_break
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)   # close() wakes the thread at once
        self._thread = threading.Thread(target=self._run, name="rdax-fanotify", daemon=True)
        self._thread.start()

    def watch(self, fd: int) -> bytes:
        """Mark the file open as `fd`; returns the key its events will carry."""
        if _libc.fanotify_mark(self._fd, FAN_MARK_ADD, WATCHED, fd, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fanotify_mark(ADD, fd={fd}): {os.strerror(err)}")
        return file_key(fd)

    def unwatch(self, fd: int) -> None:
        if _libc.fanotify_mark(self._fd, FAN_MARK_REMOVE, WATCHED, fd, None) != 0:
            err = ctypes.get_errno()
            if err not in (errno.ENOENT, errno.EBADF):
                log.warning("fanotify_mark(REMOVE, fd=%d): %s", fd, os.strerror(err))

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll():
                continue
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            for mask, pid, key in parse_events(data):
                if mask & FAN_Q_OVERFLOW:
                    # Events were lost: every seal must be re-checked.
                    self._on_break(b"", mask, pid)
                elif key is not None and pid != self._pid:
                    try:
                        self._on_break(key, mask, pid)
                    except Exception:
                        log.exception("handling fanotify event %s by pid %d failed", describe(mask), pid)

    def close(self) -> None:
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=2)
        for fd in (self._fd, self._wake_r, self._wake_w):
            os.close(fd)
