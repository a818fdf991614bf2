"""Memory regions: registration with the pinned -> ODP fallback (remembered per node), access flags,
and pinned local buffers for staging data."""
from __future__ import annotations

import ctypes
import enum
import logging

import pyverbs.enums as e
from pyverbs.mr import MR
from pyverbs.pd import PD
from pyverbs.pyverbs_error import PyverbsError, PyverbsRDMAError

from .errors import RegistrationError

log = logging.getLogger("rdax.rdma")

ENOMEM, EOPNOTSUPP = 12, 95
# A pinned registration is refused where an ODP one works: fsdax refuses long-term pins (EOPNOTSUPP), and
# RLIMIT_MEMLOCK refuses the pin's accounting before that (ENOMEM; 8 MiB in a container without IPC_LOCK).
PIN_REFUSED = (EOPNOTSUPP, ENOMEM)


class Access(enum.IntFlag):
    """What a remote peer may do through a region (rdax's names, not ibv's)."""

    WRITE = 1
    READ = 2
    ATOMIC = 4  # ATOMIC_WRITE (8-byte)
    FLUSH = 8   # FLUSH to persistence (global visibility included)

    def ibv_flags(self) -> int:
        flags: int = e.IBV_ACCESS_LOCAL_WRITE
        if self & Access.WRITE:
            flags |= e.IBV_ACCESS_REMOTE_WRITE
        if self & Access.READ:
            flags |= e.IBV_ACCESS_REMOTE_READ
        if self & Access.ATOMIC:
            # ATOMIC_WRITE is checked against REMOTE_WRITE|REMOTE_ATOMIC by rxe.
            flags |= e.IBV_ACCESS_REMOTE_ATOMIC | e.IBV_ACCESS_REMOTE_WRITE
        if self & Access.FLUSH:
            flags |= e.IBV_ACCESS_FLUSH_PERSISTENT | e.IBV_ACCESS_FLUSH_GLOBAL
        return flags

    def label(self) -> str:
        return "|".join(m.name for m in Access if m & self and m.name) or "NONE"


def _access_names(flags: int) -> str:
    names = [n[len("IBV_ACCESS_"):] for n in dir(e)
             if n.startswith("IBV_ACCESS_") and getattr(e, n) and flags & getattr(e, n) == getattr(e, n)]
    return "|".join(sorted(names)) or "0"


class MemoryRegion:
    """A registered range of this process's memory; .odp tells how."""

    def __init__(self, mr: MR, addr: int, length: int, access: Access, odp: bool) -> None:
        self.mr = mr
        self.addr = addr
        self.length = length
        self.access = access
        self.odp = odp

    @property
    def rkey(self) -> int:
        rkey: int = self.mr.rkey
        return rkey

    @property
    def lkey(self) -> int:
        lkey: int = self.mr.lkey
        return lkey

    @property
    def closed(self) -> bool:
        return self.mr is None

    def close(self) -> None:
        """Deregister. A remote access through the rkey fails from now on."""
        if self.mr is not None:
            mr, self.mr = self.mr, None
            mr.close()

    def __enter__(self) -> MemoryRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reg(pd: PD, addr: int, length: int, flags: int) -> MR:
    try:
        return MR(pd, length, flags, address=addr)
    except PyverbsRDMAError as exc:
        raise RegistrationError("ibv_reg_mr", {"addr": addr, "len": length, "access": _access_names(flags)},
                                errno=exc.error_code) from exc
    except PyverbsError as exc:
        raise RegistrationError("ibv_reg_mr", {"addr": addr, "len": length, "access": _access_names(flags)},
                                detail=str(exc)) from exc


class RegistrationMemo:
    """What one node's registrations learned: once a pinned registration was refused (EOPNOTSUPP on fsdax,
    ENOMEM under a memlock limit) and ODP worked, later registrations go ODP straight away — one probe per
    node, logged once, instead of a refused pin before every grant."""

    def __init__(self) -> None:
        self.odp_only = False
        self.reason = ""


def register(pd: PD, addr: int, length: int, access: Access, pinned: bool = True,
             odp_fallback: bool = True, mw_bind: bool = False,
             memo: RegistrationMemo | None = None) -> MemoryRegion:
    """Register [addr, addr+length) with `access`, pinned first, ODP as fallback.

    fsdax refuses long-term pins (EOPNOTSUPP), so DAX mappings end up ODP:
    the same fallback librpma makes ("maybe FSDAX?"). A memlock limit refuses
    the pin first (ENOMEM), and ODP needs no locked memory, so that falls back
    too: the node needs no CAP_IPC_LOCK. With a `memo`, the first refusal is
    remembered and later calls skip the pinned attempt.
    """
    flags = access.ibv_flags() | (e.IBV_ACCESS_MW_BIND if mw_bind else 0)
    refused: RegistrationError | None = None
    if pinned and not (memo is not None and memo.odp_only):
        try:
            return MemoryRegion(_reg(pd, addr, length, flags), addr, length, access, odp=False)
        except RegistrationError as exc:
            if exc.errno not in PIN_REFUSED or not odp_fallback:
                raise
            refused = exc
            if memo is None:
                log.info("%s; retrying with ON_DEMAND (maybe FSDAX, or a memlock limit?)", exc)
    try:
        mr = _reg(pd, addr, length, flags | e.IBV_ACCESS_ON_DEMAND)
    except RegistrationError as exc:
        if refused is not None:
            log.warning("ODP registration failed too, after the pinned one was refused (%s): %s", refused, exc)
        raise
    if refused is not None and memo is not None and not memo.odp_only:
        memo.odp_only, memo.reason = True, str(refused)
        log.info("pinned registration refused (%s): ODP worked, so this node registers ODP regions straight "
                 "away from now on", refused)
    return MemoryRegion(mr, addr, length, access, odp=True)


class LocalBuffer:
    """A pinned buffer allocated and registered by pyverbs, for staging data
    that this side writes to or reads from a peer."""

    def __init__(self, pd: PD, length: int, remote: Access = Access(0)) -> None:
        flags = e.IBV_ACCESS_LOCAL_WRITE | (remote.ibv_flags() if remote else 0)
        try:
            self.mr = MR(pd, length, flags)
        except PyverbsError as exc:
            raise RegistrationError("ibv_reg_mr", {"len": length, "access": _access_names(flags)},
                                    detail=str(exc)) from exc
        self.length = length
        self.addr = self.mr.buf
        # Plain attributes, and one view made once: the data path reads them
        # per request, and each pyverbs property or ctypes view costs there.
        self.lkey = self.mr.lkey
        self.rkey = self.mr.rkey
        self._view: memoryview | None = memoryview((ctypes.c_char * length).from_address(self.addr)).cast("B")

    def write(self, data: bytes | memoryview, offset: int = 0) -> None:
        # (Not a bytearray: ctypes.memmove refuses one.)
        if offset < 0 or offset + len(data) > self.length:
            raise ValueError(f"write of {len(data)} bytes at {offset} exceeds buffer of {self.length}")
        ctypes.memmove(self.addr + offset, bytes(data) if isinstance(data, memoryview) else data, len(data))

    def read(self, length: int, offset: int = 0) -> bytes:
        if offset < 0 or offset + length > self.length:
            raise ValueError(f"read of {length} bytes at {offset} exceeds buffer of {self.length}")
        return ctypes.string_at(self.addr + offset, length)

    def view(self) -> memoryview:
        """A writable view of the whole buffer (no copy); not valid after close()."""
        if self._view is None:
            raise ValueError("view() of a closed LocalBuffer: its memory is deregistered and freed")
        return self._view

    def close(self) -> None:
        self._view = None
        self.mr.close()

    def __enter__(self) -> LocalBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
