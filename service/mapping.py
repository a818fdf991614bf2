"""Shared DAX mappings: mmap(MAP_SHARED_VALIDATE | MAP_SYNC) of a sealed file.

MAP_SYNC makes the kernel refuse the mapping unless the file is on a DAX
filesystem and keeps its metadata durable on write faults, so bytes that
reach the mapping and are flushed from the CPU caches are persistent.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

MAP_SHARED_VALIDATE = 0x03
MAP_SYNC = 0x80000
MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 0x02, 0x10, 0x20, 0x4000
PROT_NONE = 0
MS_SYNC = 4   # <sys/mman.h>; Python's mmap module does not export it
MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class MappingError(OSError):
    pass


class DaxMapping:
    """[0, length) of a file descriptor mapped shared and synchronous, at the start of a window of `reserve`
    bytes of address space, so that the mapping can grow in place (grow()): memory regions registered over it
    stay valid, and one region can span what was mapped before and after."""

    def __init__(self, fd: int, length: int, sync: bool = True, reserve: int | None = None) -> None:
        self.fd = fd
        self.sync_flag = MAP_SYNC if sync else 0
        self.reserve = max(length, reserve or length)
        # Address space only: no memory, no page tables until something is mapped over it.
        window = _libc.mmap(None, self.reserve, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if window in (None, MAP_FAILED):
            err = ctypes.get_errno()
            raise MappingError(err, f"mmap(len={self.reserve}, PROT_NONE): reserving address space: "
                                    f"{os.strerror(err)}")
        self.addr: int = window
        self.length = 0
        try:
            self._map(0, length)
        except MappingError:
            _libc.munmap(window, self.reserve)
            self.addr = 0
            raise
        self.length = length

    def _map(self, offset: int, length: int) -> None:
        flags = MAP_SHARED_VALIDATE | self.sync_flag | MAP_FIXED
        addr = _libc.mmap(self.addr + offset, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, self.fd, offset)
        if addr in (None, MAP_FAILED):
            err = ctypes.get_errno()
            hint = " (MAP_SYNC needs a DAX filesystem: mount -o dax=always)" if err in (95, 22) else ""
            raise MappingError(err, f"mmap(fd={self.fd}, offset={offset}, len={length}, MAP_SHARED_VALIDATE"
                                    f"{'|MAP_SYNC' if self.sync_flag else ''}): {os.strerror(err)}{hint}")

    def grow(self, new_length: int) -> None:
        """Map [length, new_length) of the file right after what is mapped; new_length <= reserve."""
        if new_length > self.reserve:
            raise ValueError(f"the mapping can grow to {self.reserve} bytes, not {new_length}")
        if new_length > self.length:
            self._map(self.length, new_length - self.length)
            self.length = new_length

    @property
    def closed(self) -> bool:
        return self.addr == 0

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return ctypes.string_at(self.addr + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        ctypes.memmove(self.addr + offset, data, len(data))

    def sync(self, offset: int = 0, length: int | None = None) -> None:
        """msync(MS_SYNC): make CPU stores to [offset, offset+length) durable."""
        length = self.length - offset if length is None else length
        page = offset & ~(mmap.PAGESIZE - 1)
        if _libc.msync(self.addr + page, length + (offset - page), MS_SYNC) != 0:
            err = ctypes.get_errno()
            raise MappingError(err, f"msync(len={length}): {os.strerror(err)}")

    def _check(self, offset: int, length: int) -> None:
        if self.closed:
            raise ValueError("mapping is closed")
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"[{offset}, {offset + length}) is outside the mapping of {self.length} bytes")

    def close(self) -> None:
        if self.addr:
            _libc.munmap(self.addr, self.reserve)
            self.addr = 0

    def __enter__(self) -> DaxMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
