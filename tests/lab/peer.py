"""A remote RDMA client for lab tests, run in the client namespace:

    ip netns exec client python tests/lab/peer.py

It reads one JSON command per line on stdin and answers one JSON line on
stdout, so a test in the storage namespace can drive real remote writes.
"""
from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

from labkit import pattern, serve

from rdax.rdma import (
    Abandoned,
    Chunk,
    Connection,
    Device,
    EndpointInfo,
    LocalBuffer,
    VerbsError,
    WorkCompletionError,
    open_device,
)


class Peer:
    def __init__(self) -> None:
        self.dev: Device | None = None
        self.pd: Any = None   # a pyverbs PD
        self.conn: Connection | None = None
        self.buf: LocalBuffer | None = None

    def open(self, device: str, buffer: int = 4 << 20, depth: int = 64, native: bool | None = None,
             signal_every: int = 16) -> dict:
        """native: None as Connection's default (the native post-and-poll where built), True/False to choose."""
        self.dev = open_device(name=device)
        self.pd = self.dev.alloc_pd()
        self.conn = Connection(self.dev, self.pd, depth=depth, native=native, signal_every=signal_every)
        self.buf = LocalBuffer(self.pd, buffer)
        ep = self.conn.endpoint()
        return {"qpn": ep.qpn, "gid": ep.gid, "psn": ep.psn, "native": self.conn.native}

    def connect(self, qpn: int, gid: str, psn: int, mtu: int = 4096) -> dict:
        self.conn.connect(EndpointInfo(qpn, gid, psn, mtu), mtu=mtu)
        return {"state": self.conn.state()}

    def write(self, rkey: int, raddr: int, length: int, seed: int, chunk: int = 1 << 20) -> dict:
        self.buf.write(pattern(seed, length))
        chunks = [Chunk(self.buf.addr + off, self.buf.lkey, min(chunk, length - off), rkey, raddr + off)
                  for off in range(0, length, chunk)]
        return {"bytes": self.conn.write(chunks)}

    def write_flush(self, rkey: int, raddr: int, length: int, seed: int) -> dict:
        """One WRITE and a FLUSH of its range behind it (Connection's one-request path)."""
        self.buf.write(pattern(seed, length))
        c = Chunk(self.buf.addr, self.buf.lkey, length, rkey, raddr)
        return {"bytes": self.conn.write_flush([c], rkey, raddr, length)}

    def write_many(self, rkey: int, raddr: int, length: int, seed: int, chunk: int, flush: bool = False,
                   tail_first: bool = False) -> dict:
        """`length` bytes in `chunk`-sized requests, more than the queue holds, in reverse order if `tail_first`;
        with a FLUSH of the whole range behind them if `flush` (write_flush's batch path)."""
        self.buf.write(pattern(seed, length))
        chunks = [Chunk(self.buf.addr + off, self.buf.lkey, min(chunk, length - off), rkey, raddr + off)
                  for off in range(0, length, chunk)]
        if tail_first:
            chunks.reverse()
        if flush:
            return {"bytes": self.conn.write_flush(chunks, rkey, raddr, length)}
        return {"bytes": self.conn.write(chunks)}

    def read(self, rkey: int, raddr: int, length: int, chunk: int = 1 << 20) -> dict:
        """RDMA READ into the buffer; the bytes' sha256."""
        self.buf.write(bytes(length))
        chunks = [Chunk(self.buf.addr + off, self.buf.lkey, min(chunk, length - off), rkey, raddr + off)
                  for off in range(0, length, chunk)]
        n = self.conn.read(chunks)
        return {"bytes": n, "sha256": hashlib.sha256(self.buf.read(length)).hexdigest()}

    def write_flush_abandoned(self, rkey: int, raddr: int, length: int, after: float) -> dict:
        """write_flush towards a peer that will never answer, abandoned from another thread `after` s in."""
        c = Chunk(self.buf.addr, self.buf.lkey, length, rkey, raddr)
        timer = threading.Timer(after, self.conn.abandon, args=("the test abandoned it",))
        t0 = time.monotonic()
        timer.start()
        try:
            self.conn.write_flush([c], rkey, raddr, length, timeout=30)
        except Abandoned as exc:
            return {"abandoned": True, "seconds": time.monotonic() - t0, "error": str(exc)}
        except WorkCompletionError as exc:
            return {"abandoned": False, "seconds": time.monotonic() - t0, "status": exc.status}
        finally:
            timer.cancel()
        return {"abandoned": False, "seconds": time.monotonic() - t0}

    def write_flush_closed(self, rkey: int, raddr: int, length: int, after: float, spin: float) -> dict:
        """write_flush towards a peer that will never answer, spinning up to `spin` s, the connection closed
        from another thread `after` s in; then write_flush once more on the closed connection."""
        c = Chunk(self.buf.addr, self.buf.lkey, length, rkey, raddr)
        self.conn.spin_seconds = spin
        closed: dict[str, float] = {}

        def close() -> None:
            t = time.monotonic()
            self.conn.close()
            closed["close_s"] = time.monotonic() - t
        timer = threading.Timer(after, close)
        out: dict[str, Any] = {}
        t0 = time.monotonic()
        timer.start()
        try:
            self.conn.write_flush([c], rkey, raddr, length, timeout=30)
        except Abandoned as exc:
            out.update(abandoned=True, error=str(exc))
        out["seconds"] = time.monotonic() - t0
        timer.join()
        try:
            self.conn.write_flush([c], rkey, raddr, length, timeout=30)
        except Abandoned as exc:
            out["after_close"] = str(exc)
        return out | closed

    def flush(self, rkey: int, raddr: int, length: int) -> dict:
        self.conn.flush(rkey, raddr, length)
        return {}

    def atomic_write(self, rkey: int, raddr: int, value: str) -> dict:
        self.conn.atomic_write(rkey, raddr, bytes.fromhex(value))
        return {}

    def state(self) -> dict:
        return {"state": self.conn.state()}


def _error(exc: Exception) -> dict | None:
    if isinstance(exc, WorkCompletionError):
        return {"status": exc.status}
    if isinstance(exc, VerbsError):
        return {"status": None}
    return None


def main() -> None:
    serve(Peer(), _error)
    # Leave QP teardown to process exit: after a remote access error it can
    # take rxe tens of seconds (LAB-NOTES.md), so nothing waits on it here.


if __name__ == "__main__":
    main()
