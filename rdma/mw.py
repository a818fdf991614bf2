"""Type-2 memory windows: bound to one QP over part of a region, invalidated
locally. rdax grants are memory regions, not windows: rxe does not enforce a
window's range (LAB-NOTES.md), only its QP binding. This wrapper exists so the
lab can keep checking that behaviour."""
from __future__ import annotations

import pyverbs.enums as e
from pyverbs.mr import MW, MWBindInfo
from pyverbs.pd import PD
from pyverbs.pyverbs_error import PyverbsError

from .connection import Connection
from .errors import VerbsError
from .mr import Access, MemoryRegion


def next_rkey(rkey: int) -> int:
    """A type-2 window takes a new key on each bind: same index, next 8-bit tag."""
    return (rkey & 0xFFFFFF00) | ((rkey + 1) & 0xFF)


class MemoryWindow:
    def __init__(self, pd: PD) -> None:
        try:
            self.mw = MW(pd, e.IBV_MW_TYPE_2)
        except PyverbsError as exc:
            raise VerbsError("ibv_alloc_mw", {"type": 2}, detail=str(exc)) from exc
        self.rkey = self.mw.rkey

    def bind(self, conn: Connection, region: MemoryRegion, addr: int, length: int, access: Access) -> int:
        """Bind [addr, addr+length) of `region` to `conn`'s QP; returns the window's new rkey."""
        rkey = next_rkey(self.rkey)
        info = MWBindInfo(region.mr, addr, length, access.ibv_flags() & ~e.IBV_ACCESS_LOCAL_WRITE)
        args = {"rkey": rkey, "addr": addr, "len": length, "access": access.label()}
        conn._post("BIND_MW", args, lambda qp: qp.wr_bind_mw(self.mw, rkey, info), signal=True)
        conn.wait("BIND_MW", args)
        self.rkey = rkey
        return rkey

    def invalidate(self, conn: Connection) -> None:
        """LOCAL_INV on `conn`'s QP: the window's rkey stops working."""
        args = {"rkey": self.rkey}
        conn._post("LOCAL_INV", args, lambda qp: qp.wr_local_inv(self.rkey), signal=True)
        conn.wait("LOCAL_INV", args)

    def close(self) -> None:
        self.mw.close()

    def __enter__(self) -> MemoryWindow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
