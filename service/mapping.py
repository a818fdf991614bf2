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
    """[0, length) of a file descriptor mapped shared and synchronous."""

    def __init__(self, fd: int, length: int, sync: bool = True) -> None:
        flags = MAP_SHARED_VALIDATE | (MAP_SYNC if sync else 0)
        addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
        if addr in (None, MAP_FAILED):
            err = ctypes.get_errno()
            hint = " (MAP_SYNC needs a DAX filesystem: mount -o dax=always)" if err in (95, 22) else ""
            raise MappingError(err, f"mmap(fd={fd}, len={length}, MAP_SHARED_VALIDATE{'|MAP_SYNC' if sync else ''}): "
                                    f"{os.strerror(err)}{hint}")
        self.addr: int = addr
        self.length = length

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
            _libc.munmap(self.addr, self.length)
            self.addr = 0

    def __enter__(self) -> "DaxMapping":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
