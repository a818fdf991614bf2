"""RC connections: one QP + CQ, set up from endpoint info exchanged out of
band (QPN, GID, PSN, path MTU), and the data verbs posted on it —
RDMA WRITE / READ, FLUSH, ATOMIC_WRITE — with many outstanding work requests
and selective signalling. The hot loops run natively (rdma/fastpath) where that
module is built, through pyverbs otherwise."""
from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from errno import ENOENT
from typing import Any, NamedTuple

import pyverbs.enums as e
from pyverbs.addr import GID, AHAttr, GlobalRoute
from pyverbs.cq import CQEX, CqInitAttrEx, PollCqAttr
from pyverbs.pd import PD
from pyverbs.pyverbs_error import PyverbsError
from pyverbs.qp import QPAttr, QPCap, QPEx, QPInitAttrEx
from pyverbs.wr import SGE

try:   # the native post-and-poll (rdma/fastpath), built in the lab root and the node's image
    import rdax_fastpath as _fastpath
except ImportError:
    _fastpath = None

from .device import PORT, Device
from .errors import Abandoned, ConnectError, VerbsError, WorkCompletionError
from .mr import Access

# The posting loop's callbacks: `describe()` makes a verb's error arguments (only when it raises), and a tail posts
# one more request (FLUSH, ATOMIC_WRITE) on the QP being built, behind the chunks (Tail, below FlushTail).
Describe = Callable[[], dict[str, object]]

MTU_ENUM = {256: e.IBV_MTU_256, 512: e.IBV_MTU_512, 1024: e.IBV_MTU_1024,
            2048: e.IBV_MTU_2048, 4096: e.IBV_MTU_4096}
WC_STATUS = {
    0: "IBV_WC_SUCCESS", 1: "IBV_WC_LOC_LEN_ERR", 2: "IBV_WC_LOC_QP_OP_ERR", 3: "IBV_WC_LOC_EEC_OP_ERR",
    4: "IBV_WC_LOC_PROT_ERR", 5: "IBV_WC_WR_FLUSH_ERR", 6: "IBV_WC_MW_BIND_ERR", 7: "IBV_WC_BAD_RESP_ERR",
    8: "IBV_WC_LOC_ACCESS_ERR", 9: "IBV_WC_REM_INV_REQ_ERR", 10: "IBV_WC_REM_ACCESS_ERR",
    11: "IBV_WC_REM_OP_ERR", 12: "IBV_WC_RETRY_EXC_ERR", 13: "IBV_WC_RNR_RETRY_EXC_ERR",
    14: "IBV_WC_LOC_RDD_VIOL_ERR", 15: "IBV_WC_REM_INV_RD_REQ_ERR", 16: "IBV_WC_REM_ABORT_ERR",
    17: "IBV_WC_INV_EECN_ERR", 18: "IBV_WC_INV_EEC_STATE_ERR", 19: "IBV_WC_FATAL_ERR",
    20: "IBV_WC_RESP_TIMEOUT_ERR", 21: "IBV_WC_GENERAL_ERR", 22: "IBV_WC_TM_ERR",
    23: "IBV_WC_TM_RNDV_INCOMPLETE",
}
REM_ACCESS_ERR = 10
# Waiting for a completion: spin (yielding now and then) for SPIN_SECONDS, then nap between polls, from NAP_MIN
# doubling to NAP_MAX. A 4 KiB write+FLUSH in the lab completes within the spin; a longer wait costs at most NAP_MAX
# more, and gives the CPU to the node and other clients meanwhile (24 spinning soak clients slowed the node's
# control plane to seconds).
SPIN_SECONDS = 0.002
NAP_MIN, NAP_MAX = 0.0001, 0.001
# The native wait returns to Python this often while it waits (to see abandon() and the deadline).
NATIVE_SLICE_NS = 5_000_000
SIGNALED = e.IBV_SEND_SIGNALED
FLUSH_PERSISTENT, FLUSH_RANGE = e.IBV_FLUSH_PERSISTENT, e.IBV_FLUSH_RANGE
QP_STATE = {e.IBV_QPS_RESET: "RESET", e.IBV_QPS_INIT: "INIT", e.IBV_QPS_RTR: "RTR",
            e.IBV_QPS_RTS: "RTS", e.IBV_QPS_SQD: "SQD", e.IBV_QPS_SQE: "SQE", e.IBV_QPS_ERR: "ERR"}
SEND_OPS = (e.IBV_QP_EX_WITH_RDMA_WRITE | e.IBV_QP_EX_WITH_RDMA_READ | e.IBV_QP_EX_WITH_FLUSH
            | e.IBV_QP_EX_WITH_ATOMIC_WRITE | e.IBV_QP_EX_WITH_SEND | e.IBV_QP_EX_WITH_BIND_MW
            | e.IBV_QP_EX_WITH_LOCAL_INV)


@dataclass(frozen=True)
class EndpointInfo:
    """What the peer needs to connect an RC QP to ours."""

    qpn: int
    gid: str
    psn: int
    mtu: int = 4096


def native_available() -> bool:
    """Whether the native post-and-poll is built here (RDAX_FASTPATH=0 turns it off for new connections)."""
    return _fastpath is not None and os.environ.get("RDAX_FASTPATH", "1") != "0"


class FlushTail(NamedTuple):
    """A FLUSH(persistent, range) posted behind a batch of writes: a Tail the native path knows."""

    rkey: int
    raddr: int
    length: int

    def __call__(self, qp: QPEx) -> object:
        return qp.wr_flush(self.rkey, self.raddr, self.length, FLUSH_PERSISTENT, FLUSH_RANGE)


Tail = Callable[[QPEx], object] | FlushTail


class Chunk(NamedTuple):
    """One RDMA WRITE or READ: local bytes <-> remote bytes. (A named tuple:
    streams build one per request, and a tuple is the cheapest to build.)"""

    laddr: int
    lkey: int
    length: int
    rkey: int
    raddr: int


class Connection:
    """One RC queue pair and its completion queue, in a given PD.

    `depth` bounds the work requests in flight; completions are requested for
    one in `signal_every` of them (RC completes in order, so one completion
    retires every request posted before it).
    """

    def __init__(self, device: Device, pd: PD, depth: int = 64, signal_every: int = 16,
                 remote_access: Access = Access(0), native: bool | None = None) -> None:
        self.device = device
        self.pd = pd
        self.depth = depth
        # At most half the queue unsignalled: a completion then retires half of
        # it while the other half stays in flight (signalling every `depth`
        # requests would drain the pipeline at each completion).
        self.signal_every = max(1, min(signal_every, depth // 2))
        self.remote_access = remote_access
        self.spin_seconds = SPIN_SECONDS   # (sets _spin_ns too, what the native waits take)
        self.psn = secrets.randbits(24)   # not `random`: an initial PSN an attacker can guess helps forge packets
        self._unsignalled = 0   # posted since the last signalled request
        self._in_flight = 0     # posted and not yet retired by a completion
        self._abandoned: str | None = None   # why waiting is pointless (the peer's QP is gone): see abandon()
        # close() and state() may come from different threads (the node's reaper asks for the state of QPs that its
        # teardown thread destroys): neither may run during the other.
        self._teardown = threading.Lock()
        self._closed = False
        # The native waits run with the GIL released: close() must not destroy the CQ under one.
        self._polling = threading.Lock()
        self._lane: Any = None   # the native write_flush (rdax_fastpath.WriteFlush), below
        try:
            self.cq = CQEX(device.context, CqInitAttrEx(cqe=depth * 2))
            self._poll_attr = PollCqAttr()
            cap = QPCap(max_send_wr=depth, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
            init = QPInitAttrEx(qp_type=e.IBV_QPT_RC, pd=pd, scq=self.cq, rcq=self.cq, cap=cap,
                                comp_mask=e.IBV_QP_INIT_ATTR_PD | e.IBV_QP_INIT_ATTR_SEND_OPS_FLAGS,
                                send_ops_flags=SEND_OPS)
            self.qp = QPEx(device.context, init)
            # One SGE, refilled per request: wr_set_sge copies it into the WQE at
            # once. A new SGE per request costs a logger lookup and leaks its
            # malloc (pyverbs' SGE frees only on close()).
            self._sge = SGE(0, 0, 0)
        except PyverbsError as exc:
            raise VerbsError("ibv_create_qp_ex", {"device": device.name, "depth": depth}, detail=str(exc)) from exc
        # The native post-and-poll (`native`: None = where built, True = required), if it sees pyverbs' objects as
        # they are.
        if native is None:
            native = native_available()
        self._native = bool(native and _fastpath is not None and _fastpath.usable(self.qp, self.cq))
        if native and not self._native:
            self.close()
            raise VerbsError("rdax_fastpath", {"device": device.name},
                             detail="the native post-and-poll is not built here, or not for this pyverbs "
                                    "(rdma/fastpath; RDAX_FASTPATH=0 uses pyverbs alone)")
        # The latency case of write_flush in one C call, the rest handed back to the method below (an instance
        # attribute shadows it): in the lab each Python step of the call costs about a microsecond.
        self._lane = _fastpath.WriteFlush(self, self.qp, self.cq, Connection.write_flush) if self._native else None
        if self._lane is not None:
            self.write_flush = self._lane   # type: ignore[method-assign]

    @property
    def spin_seconds(self) -> float:
        """How long a wait for a completion spins before it naps between polls."""
        return self._spin_ns / 1e9

    @spin_seconds.setter
    def spin_seconds(self, seconds: float) -> None:
        self._spin_ns = int(seconds * 1e9)

    @property
    def native(self) -> bool:
        """Whether this connection posts and polls through rdma/fastpath."""
        return self._native

    # -- set-up ---------------------------------------------------------------
    def endpoint(self, mtu: int = 4096) -> EndpointInfo:
        return EndpointInfo(qpn=self.qp.qp_num, gid=self.device.gid, psn=self.psn, mtu=mtu)

    def connect(self, remote: EndpointInfo, mtu: int | None = None) -> None:
        """INIT -> RTR -> RTS towards `remote`, path MTU min(ours, theirs)."""
        mtu = min(mtu or remote.mtu, remote.mtu)
        if mtu not in MTU_ENUM:
            raise ConnectError("ibv_modify_qp", {"qpn": self.qp.qp_num, "mtu": mtu},
                               detail=f"path MTU must be one of {sorted(MTU_ENUM)}")
        attr = QPAttr(port_num=PORT)
        attr.qp_access_flags = self.remote_access.ibv_flags() if self.remote_access else 0
        attr.path_mtu = MTU_ENUM[mtu]
        attr.dest_qp_num = remote.qpn
        attr.rq_psn = remote.psn
        attr.sq_psn = self.psn
        attr.max_dest_rd_atomic = 16
        attr.max_rd_atomic = 16
        attr.min_rnr_timer = 12
        attr.timeout = 14
        # 6, not 7: rxe takes a transport retry count of 7 to mean "retry forever" (rxe_comp.c, COMPST_ERROR_RETRY:
        # `if (qp->comp.retry_cnt != 7) qp->comp.retry_cnt--`; the IB spec gives 7 that meaning only for the RNR
        # count), so a request towards a peer QP that is gone never completed. With 6 it fails with
        # IBV_WC_RETRY_EXC_ERR after 7 tries of 4.096 us * 2^14 = 67 ms each, about half a second.
        attr.retry_cnt = 6
        attr.rnr_retry = 7
        gr = GlobalRoute(dgid=GID(remote.gid), sgid_index=self.device.gid_index, hop_limit=64)
        attr.ah_attr = AHAttr(gr=gr, is_global=1, port_num=PORT)
        try:
            self.qp.to_rts(attr)
        except PyverbsError as exc:
            raise ConnectError("ibv_modify_qp", {"qpn": self.qp.qp_num, "dest_qpn": remote.qpn,
                                                 "dgid": remote.gid, "mtu": mtu}, detail=str(exc)) from exc
        self.mtu = mtu

    def state(self, timeout: float = -1) -> str:
        """The QP's state (RESET, INIT, RTR, RTS, SQD, SQE, ERR); CLOSED once close() destroyed it, CLOSING if
        close() is destroying it now and `timeout` (seconds, -1: no limit) ran out first.

        From any thread: pyverbs' query of a destroyed QP passes NULL to ibv_query_qp, and the process dies of
        SIGSEGV (the node did, when its reaper asked a session's QP for its state as the session closed)."""
        if not self._teardown.acquire(timeout=timeout):
            return "CLOSING"
        try:
            if self._closed:
                return "CLOSED"
            attr, _ = self.qp.query(e.IBV_QP_STATE)
        except PyverbsError as exc:
            raise VerbsError("ibv_query_qp", {"qpn": self.qp.qp_num}, detail=str(exc)) from exc
        finally:
            self._teardown.release()
        return QP_STATE.get(attr.qp_state, str(attr.qp_state))

    # -- posting --------------------------------------------------------------
    # The hot path: a 4 KiB write+flush costs a few hundred microseconds in the
    # lab, and every Python call in here is a measurable share of it, so the
    # posting loop works on locals, builds no objects per request, and makes
    # its error arguments only when it raises.
    def _post(self, verb: str, args: dict[str, object], build: Tail, signal: bool = False) -> None:
        """Post one work request built by `build(qp)`."""
        self._post_requests(verb, lambda: args, (), tail=build, signal_last=signal)

    def _post_requests(self, verb: str, describe: Describe, chunks: Sequence[Chunk], read: bool = False,
                       tail: Tail | None = None, signal_last: bool = True) -> None:
        """Post an RDMA WRITE (READ if `read`) per chunk, then `tail(qp)` if
        given, as many per wr_start/wr_complete as the queue has room for. A
        request is signalled when `signal_every` went unsignalled, and the last
        one when `signal_last`. `describe()` gives the error arguments."""
        nchunks = len(chunks)
        n = nchunks + (tail is not None)
        if self._native and (tail is None or type(tail) is FlushTail):
            self._post_native(verb, describe, chunks, n, read, tail, signal_last)
            return
        if n and signal_last and n <= self.depth - self._in_flight and self._unsignalled + n <= self.signal_every:
            self._post_fitting(verb, describe, chunks, n, read, tail)
            return
        qp, sge = self.qp, self._sge
        rdma = qp.wr_rdma_read if read else qp.wr_rdma_write
        every, last = self.signal_every, (n - 1 if signal_last else -1)
        i = 0
        while i < n:
            room = self.depth - self._in_flight
            if room <= 0:
                self._retire(verb, describe)
                continue
            end = min(n, i + room)
            unsignalled = self._unsignalled
            qp.wr_start()
            quiet = None   # what wr_flags holds: set it only when it changes
            for k in range(i, end):
                unsignalled += 1
                if unsignalled >= every or k == last:
                    # The wr_id of a signalled request counts the requests its completion retires.
                    qp.wr_id = unsignalled
                    qp.wr_flags = SIGNALED
                    unsignalled, quiet = 0, False
                elif quiet is not True:
                    qp.wr_id = 0
                    qp.wr_flags = 0
                    quiet = True
                if k < nchunks:
                    laddr, lkey, length, rkey, raddr = chunks[k]
                    rdma(rkey, raddr)
                    sge.addr, sge.length, sge.lkey = laddr, length, lkey
                    qp.wr_set_sge(sge)
                else:
                    assert tail is not None   # past the chunks: the tail's slot, which n counts only if there is one
                    tail(qp)
            self._complete(verb, describe)
            self._unsignalled = unsignalled
            self._in_flight += end - i
            i = end

    def _post_native(self, verb: str, describe: Describe, chunks: Sequence[Chunk], n: int,
                     read: bool, tail: FlushTail | None, signal_last: bool) -> None:
        """_post_requests through rdma/fastpath: a batch per call, as many as the queue has room for."""
        fkey, faddr, flen = tail if tail is not None else (0, 0, 0)
        last = n - 1 if signal_last else -1
        i = 0
        while i < n:
            room = self.depth - self._in_flight
            if room <= 0:
                self._retire(verb, describe)
                continue
            end = min(n, i + room)
            try:
                self._unsignalled = _fastpath.post(self.qp, chunks, i, end, self._unsignalled, self.signal_every,
                                                   last, read, fkey, faddr, flen)
            except OSError as exc:
                raise VerbsError(f"ibv_wr_complete[{verb}]", describe(), detail=os.strerror(exc.errno or 0)) from exc
            self._in_flight += end - i
            i = end

    def _post_fitting(self, verb: str, describe: Describe, chunks: Sequence[Chunk], n: int, read: bool,
                      tail: Tail | None) -> None:
        """_post_requests when all `n` fit in the queue and only the last needs
        a completion: the latency case (one write + its flush), with the
        fewest Python steps per request."""
        qp, sge = self.qp, self._sge
        rdma = qp.wr_rdma_read if read else qp.wr_rdma_write
        retires = self._unsignalled + n
        signalled = n - 1 if tail is None else -1
        qp.wr_start()
        if n > 1:
            qp.wr_flags = 0   # (an unsignalled request's wr_id is never read: errors stop at the first)
        for k, (laddr, lkey, length, rkey, raddr) in enumerate(chunks):
            if k == signalled:
                qp.wr_id = retires
                qp.wr_flags = SIGNALED
            rdma(rkey, raddr)
            sge.addr, sge.length, sge.lkey = laddr, length, lkey
            qp.wr_set_sge(sge)
        if tail is not None:
            qp.wr_id = retires
            qp.wr_flags = SIGNALED
            tail(qp)
        self._complete(verb, describe)
        self._unsignalled = 0
        self._in_flight += n

    def _complete(self, verb: str, describe: Describe) -> None:
        """wr_complete: hand the requests built since wr_start to the device.
        Callers count them as posted only once this returns."""
        try:
            self.qp.wr_complete()
        except PyverbsError as exc:
            raise VerbsError(f"ibv_wr_complete[{verb}]", describe(), detail=str(exc)) from exc

    def _spin(self, verb: str, describe: Describe, timeout: float) -> None:
        """Poll until a completion is there; returns with the CQ's poll batch
        open (cq.status/wr_id read it, cq.end_poll() closes it).

        The extended CQ's start_poll reads a completion in place, with no WC
        object per completion: against CQ.poll that took a third off a write+
        flush in the lab (README.md, Benchmarks: "where the time went")."""
        start, attr, spins, deadline, nap = self.cq.start_poll, self._poll_attr, 0, None, 0.0
        rc = start(attr)
        while rc == ENOENT:   # as few steps as possible between polls
            spins += 1
            if not spins & 0xF:
                # Let whatever else is runnable on this CPU have it (it does nothing when nothing is): many client
                # processes or threads waiting at once must not starve each other, the node beside them, or the
                # kernel's own RDMA work (soft-RoCE runs on these CPUs). It releases the GIL too.
                os.sched_yield()
            if not spins & 0x3F:   # the clock only now and then: it costs as much as a poll
                if self._abandoned is not None:
                    self._in_flight = self._unsignalled = 0
                    raise Abandoned(f"ibv_poll_cq[{verb}]", describe(), self._abandoned)
                now = time.monotonic()
                if deadline is None:
                    deadline, spin_until = now + timeout, now + self.spin_seconds
                elif now > deadline:
                    raise VerbsError(f"ibv_poll_cq[{verb}]", describe(),
                                     detail=f"no completion within {timeout:.0f} s ({self._in_flight} in flight)")
                elif now > spin_until:
                    # A long wait (a big transfer, a slow peer): spinning on would only take the CPU from whoever
                    # else needs it. Nap between polls instead, a little longer each time up to NAP_MAX, which
                    # bounds what a wait can overshoot its completion by.
                    nap = min(nap * 2 or NAP_MIN, NAP_MAX)
                    time.sleep(nap)
                    spins |= 0x3F   # look at the clock (and the abandon flag) after every nap
            rc = start(attr)
        if rc != 0:
            raise VerbsError(f"ibv_start_poll[{verb}]", describe(), detail=os.strerror(rc))

    def abandon(self, reason: str) -> None:
        """Stop waiting for completions, from any thread: a wait in progress or to come raises Abandoned.

        A peer that destroyed its QP sends nothing back, and rxe's retries were
        seen not to fire within 60 s (LAB-NOTES.md): whoever learns that the
        peer is gone (the node's Watch event) tells the connection instead.
        """
        self._abandoned = reason

    def _failed(self, verb: str, describe: Describe, status: int) -> WorkCompletionError:
        """A completion with an error: the QP is in error, nothing is in flight any more."""
        self._in_flight = 0
        self._unsignalled = 0
        return WorkCompletionError(verb, describe(), status, WC_STATUS.get(status, "?"))

    def _retire(self, verb: str, describe: Describe, until_empty: bool = False, timeout: float = 30.0) -> None:
        """Poll completions until there is room (or nothing is in flight)."""
        if self._native:
            self._retire_native(verb, describe, until_empty, timeout)
            return
        cq = self.cq
        while self._in_flight >= self.depth or (until_empty and self._in_flight > 0):
            self._spin(verb, describe, timeout)
            try:
                while True:
                    status = cq.status
                    if status != 0:
                        raise self._failed(verb, describe, status)
                    self._in_flight -= max(1, cq.wr_id)
                    if cq.poll_next() != 0:
                        break
            finally:
                cq.end_poll()

    def _retire_native(self, verb: str, describe: Describe, until_empty: bool, timeout: float,
                       spin: float | None = None) -> None:
        """_retire through rdma/fastpath: its waits (GIL released) return every NATIVE_SLICE_NS to see abandon()
        and the deadline here; the spin (`spin_seconds`, or `spin` left of it) counts from this call."""
        spin_ns = self._spin_ns if spin is None else int(spin * 1e9)
        deadline = None
        poll, cq = _fastpath.poll, self.cq
        while self._in_flight >= self.depth or (until_empty and self._in_flight > 0):
            if self._abandoned is not None:
                self._in_flight = self._unsignalled = 0
                raise Abandoned(f"ibv_poll_cq[{verb}]", describe(), self._abandoned)
            with self._polling:
                if self._closed:
                    raise Abandoned(f"ibv_poll_cq[{verb}]", describe(), "the connection was closed")
                rc, retired, status = poll(cq, spin_ns, NATIVE_SLICE_NS)
            if rc == ENOENT:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + timeout - NATIVE_SLICE_NS / 1e9
                elif now > deadline:
                    raise VerbsError(f"ibv_poll_cq[{verb}]", describe(),
                                     detail=f"no completion within {timeout:.0f} s ({self._in_flight} in flight)")
                spin_ns = 0
                continue
            if rc:
                raise VerbsError(f"ibv_start_poll[{verb}]", describe(), detail=os.strerror(rc))
            if status:
                raise self._failed(verb, describe, status)
            self._in_flight -= retired

    def wait(self, verb: str = "wait", args: dict[str, object] | None = None, timeout: float = 30.0) -> None:
        """Make sure the last posted request is signalled, then wait for all."""
        if self._unsignalled:
            # RC has no "signal the previous request": the last request of a
            # batch must be posted signalled (last=True) before waiting.
            raise RuntimeError(f"{verb}: {self._unsignalled} requests posted unsignalled; post the last with last=True")
        if self._in_flight:
            self._retire(verb, lambda: args or {}, until_empty=True, timeout=timeout)

    # -- verbs ----------------------------------------------------------------
    @staticmethod
    def _flush_wr(rkey: int, raddr: int, length: int) -> FlushTail:
        return FlushTail(rkey, raddr, length)

    def post_write(self, c: Chunk, last: bool = False) -> None:
        self._post_requests("RDMA_WRITE", lambda: {"rkey": c.rkey, "remote_addr": c.raddr, "len": c.length},
                            (c,), signal_last=last)

    def post_read(self, c: Chunk, last: bool = False) -> None:
        self._post_requests("RDMA_READ", lambda: {"rkey": c.rkey, "remote_addr": c.raddr, "len": c.length},
                            (c,), read=True, signal_last=last)

    def post_flush(self, rkey: int, raddr: int, length: int) -> None:
        """FLUSH(persistent, range): signalled, so wait() returns once it is durable."""
        self._post("FLUSH", {"rkey": rkey, "remote_addr": raddr, "len": length},
                   self._flush_wr(rkey, raddr, length), signal=True)

    def post_atomic_write(self, rkey: int, raddr: int, value: bytes) -> None:
        if len(value) != 8:
            raise ValueError(f"ATOMIC_WRITE carries exactly 8 bytes, not {len(value)}")
        args: dict[str, object] = {"rkey": rkey, "remote_addr": raddr}
        self._post("ATOMIC_WRITE", args, lambda qp: qp.wr_atomic_write(rkey, raddr, value), signal=True)

    def _transfer(self, verb: str, chunks: Iterable[Chunk], read: bool = False, tail: Tail | None = None,
                  timeout: float = 60.0) -> int:
        """Post every request (only the last signalled), then wait for all;
        returns the bytes the chunks carry."""
        if not isinstance(chunks, (list, tuple)):
            chunks = list(chunks)

        def describe() -> dict[str, object]:
            return {"requests": len(chunks) + (tail is not None), "bytes": sum(c.length for c in chunks)}
        self._post_requests(verb, describe, chunks, read=read, tail=tail)
        self._retire(verb, describe, until_empty=True, timeout=timeout)
        return chunks[0].length if len(chunks) == 1 else sum(c.length for c in chunks)

    def write(self, chunks: Iterable[Chunk], timeout: float = 60.0) -> int:
        """RDMA WRITE every chunk, pipelined; returns bytes written once all completed."""
        return self._transfer("RDMA_WRITE", chunks, timeout=timeout)

    def read(self, chunks: Iterable[Chunk], timeout: float = 60.0) -> int:
        """RDMA READ every chunk, pipelined; returns bytes read once all completed."""
        return self._transfer("RDMA_READ", chunks, read=True, timeout=timeout)

    def write_flush(self, chunks: Iterable[Chunk], rkey: int, raddr: int, length: int,
                    timeout: float = 60.0) -> int:
        """RDMA WRITE every chunk, then FLUSH(persistent) [raddr, raddr+length)
        behind them on the same QP (RC executes them in order): one wait, and
        the bytes are durable when it returns."""
        if self._closed and self._native:   # (what the native WriteFlush hands back, among others)
            raise Abandoned("ibv_poll_cq[RDMA_WRITE+FLUSH]", {"flush_addr": raddr, "flush_len": length},
                            "the connection was closed")
        if isinstance(chunks, (list, tuple)) and len(chunks) == 1 and not self._in_flight:
            # The latency case, written flat: in the lab every Python step
            # between the call and wr_complete() adds to the round trip (the
            # generic path costs about 100 us more per write+flush), while
            # the steps after it overlap with the packets in flight.
            # (Unpacked: a named tuple's fields are slow attributes in CPython.)
            (laddr, lkey, n, wkey, waddr), qp, sge = chunks[0], self.qp, self._sge
            qp.wr_start()
            qp.wr_flags = 0
            qp.wr_rdma_write(wkey, waddr)
            sge.addr, sge.length, sge.lkey = laddr, n, lkey
            qp.wr_set_sge(sge)
            qp.wr_id = 2
            qp.wr_flags = SIGNALED
            qp.wr_flush(rkey, raddr, length, FLUSH_PERSISTENT, FLUSH_RANGE)
            try:
                qp.wr_complete()
            except PyverbsError as exc:
                raise VerbsError("ibv_wr_complete[RDMA_WRITE+FLUSH]", {"requests": 2, "bytes": n},
                                 detail=str(exc)) from exc
            self._in_flight = 2

            def describe() -> dict[str, object]:
                return {"requests": 2, "bytes": n, "flush_addr": raddr, "flush_len": length}
            # Only the FLUSH is signalled and nothing else is in flight: its
            # completion (or the first error) is the one there is to read.
            self._spin("RDMA_WRITE+FLUSH", describe, timeout)
            cq = self.cq
            status = cq.status
            cq.end_poll()
            if status != 0:
                raise self._failed("RDMA_WRITE+FLUSH", describe, status)
            self._in_flight = 0
            return n
        return self._transfer("RDMA_WRITE+FLUSH", chunks, tail=self._flush_wr(rkey, raddr, length), timeout=timeout)

    def _native_post_failed(self, exc: OSError, n: int) -> VerbsError:
        """write_flush's native call raised: nothing went out ("ibv_wr_complete"), or both are in flight."""
        if exc.strerror == "ibv_start_poll":
            self._in_flight = 2
        return VerbsError(f"{exc.strerror}[RDMA_WRITE+FLUSH]", {"requests": 2, "bytes": n},
                          detail=os.strerror(exc.errno or 0))

    def _write_flush_native_wait(self, status: int, n: int, raddr: int, length: int, timeout: float) -> None:
        """write_flush's native call came back with an error status, or PENDING: wait on for its completion."""
        def describe() -> dict[str, object]:
            return {"requests": 2, "bytes": n, "flush_addr": raddr, "flush_len": length}
        if status == _fastpath.PENDING:
            self._in_flight = 2
            self._retire_native("RDMA_WRITE+FLUSH", describe, True, timeout, spin=0.0)
        else:
            raise self._failed("RDMA_WRITE+FLUSH", describe, status)

    def flush(self, rkey: int, raddr: int, length: int, timeout: float = 30.0) -> None:
        self.post_flush(rkey, raddr, length)
        self.wait("FLUSH", {"rkey": rkey, "remote_addr": raddr, "len": length}, timeout)

    def atomic_write(self, rkey: int, raddr: int, value: bytes, timeout: float = 30.0) -> None:
        self.post_atomic_write(rkey, raddr, value)
        self.wait("ATOMIC_WRITE", {"rkey": rkey, "remote_addr": raddr}, timeout)

    # -- teardown -------------------------------------------------------------
    def close(self) -> None:
        # A native wait in another thread holds `_polling` for at most NATIVE_SLICE_NS, then sees _closed; a
        # native write_flush (WriteFlush) saw _closed false and is in C until it lowers `busy`.
        with self._teardown, self._polling:
            self._closed = True
            while self._lane is not None and self._lane.busy:
                time.sleep(0.0002)
            for obj in (self.qp, self.cq):
                try:
                    obj.close()
                except PyverbsError:
                    pass
            sge, self._sge = self._sge, None
            if sge is not None:   # SGE.close() frees unconditionally: exactly once
                sge.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
