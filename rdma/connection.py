"""RC connections: one QP + CQ, set up from endpoint info exchanged out of
band (QPN, GID, PSN, path MTU), and the data verbs posted on it —
RDMA WRITE / READ, FLUSH, ATOMIC_WRITE — with many outstanding work requests
and selective signalling."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Iterable

import pyverbs.enums as e
from pyverbs.addr import AHAttr, GlobalRoute, GID
from pyverbs.cq import CQ
from pyverbs.pd import PD
from pyverbs.pyverbs_error import PyverbsError
from pyverbs.qp import QPAttr, QPCap, QPEx, QPInitAttrEx
from pyverbs.wr import SGE

from .device import PORT, Device
from .errors import ConnectError, VerbsError, WorkCompletionError
from .mr import Access

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


@dataclass(frozen=True)
class Chunk:
    """One RDMA WRITE or READ: local bytes <-> remote bytes."""

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
                 remote_access: Access = Access(0)) -> None:
        self.device = device
        self.pd = pd
        self.depth = depth
        # At most half the queue unsignalled: a completion then retires half of
        # it while the other half stays in flight (signalling every `depth`
        # requests would drain the pipeline at each completion).
        self.signal_every = max(1, min(signal_every, depth // 2))
        self.remote_access = remote_access
        self.psn = random.getrandbits(24)
        self._unsignalled = 0   # posted since the last signalled request
        self._in_flight = 0     # posted and not yet retired by a completion
        try:
            self.cq = CQ(device.context, depth * 2)
            cap = QPCap(max_send_wr=depth, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
            init = QPInitAttrEx(qp_type=e.IBV_QPT_RC, pd=pd, scq=self.cq, rcq=self.cq, cap=cap,
                                comp_mask=e.IBV_QP_INIT_ATTR_PD | e.IBV_QP_INIT_ATTR_SEND_OPS_FLAGS,
                                send_ops_flags=SEND_OPS)
            self.qp = QPEx(device.context, init)
        except PyverbsError as exc:
            raise VerbsError("ibv_create_qp_ex", {"device": device.name, "depth": depth}, detail=str(exc)) from exc

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
        attr.retry_cnt = 7
        attr.rnr_retry = 7
        gr = GlobalRoute(dgid=GID(remote.gid), sgid_index=self.device.gid_index, hop_limit=64)
        attr.ah_attr = AHAttr(gr=gr, is_global=1, port_num=PORT)
        try:
            self.qp.to_rts(attr)
        except PyverbsError as exc:
            raise ConnectError("ibv_modify_qp", {"qpn": self.qp.qp_num, "dest_qpn": remote.qpn,
                                                 "dgid": remote.gid, "mtu": mtu}, detail=str(exc)) from exc
        self.mtu = mtu

    def state(self) -> str:
        attr, _ = self.qp.query(e.IBV_QP_STATE)
        return QP_STATE.get(attr.qp_state, str(attr.qp_state))

    # -- posting --------------------------------------------------------------
    def _post(self, verb: str, args: dict, build, signal: bool = False) -> None:
        """Post one work request built by `build(qp)`; signalled when `signal`
        or when `signal_every` requests have gone unsignalled."""
        if self._in_flight >= self.depth:
            self._retire(verb, args)
        self._unsignalled += 1
        signalled = signal or self._unsignalled >= self.signal_every
        qp = self.qp
        qp.wr_start()
        # A signalled request's wr_id counts the requests its completion retires.
        qp.wr_id = self._unsignalled if signalled else 0
        qp.wr_flags = e.IBV_SEND_SIGNALED if signalled else 0
        build(qp)
        try:
            qp.wr_complete()
        except PyverbsError as exc:
            self._unsignalled -= 1
            raise VerbsError(f"ibv_wr_complete[{verb}]", args, detail=str(exc)) from exc
        self._in_flight += 1
        if signalled:
            self._unsignalled = 0

    def _retire(self, verb: str, args: dict, until_empty: bool = False, timeout: float = 30.0) -> None:
        """Poll completions until there is room (or nothing is in flight)."""
        deadline = time.monotonic() + timeout
        while self._in_flight >= self.depth or (until_empty and self._in_flight > 0):
            n, wcs = self.cq.poll(16)
            for wc in wcs[:n]:
                if wc.status != 0:
                    self._in_flight = 0
                    self._unsignalled = 0
                    raise WorkCompletionError(verb, args, wc.status, WC_STATUS.get(wc.status, "?"))
                self._in_flight -= max(1, wc.wr_id)
            if n == 0 and time.monotonic() > deadline:
                raise VerbsError(f"ibv_poll_cq[{verb}]", args,
                                 detail=f"no completion within {timeout:.0f} s ({self._in_flight} in flight)")

    def wait(self, verb: str = "wait", args: dict | None = None, timeout: float = 30.0) -> None:
        """Make sure the last posted request is signalled, then wait for all."""
        if self._unsignalled:
            # RC has no "signal the previous request": the last request of a
            # batch must be posted signalled (last=True) before waiting.
            raise RuntimeError(f"{verb}: {self._unsignalled} requests posted unsignalled; post the last with last=True")
        self._retire(verb, args or {}, until_empty=True, timeout=timeout)

    # -- verbs ----------------------------------------------------------------
    def post_write(self, c: Chunk, last: bool = False) -> None:
        args = {"rkey": c.rkey, "remote_addr": c.raddr, "len": c.length}

        def build(qp):
            qp.wr_rdma_write(c.rkey, c.raddr)
            qp.wr_set_sge(SGE(c.laddr, c.length, c.lkey))
        self._post("RDMA_WRITE", args, build, signal=last)

    def post_read(self, c: Chunk, last: bool = False) -> None:
        args = {"rkey": c.rkey, "remote_addr": c.raddr, "len": c.length}

        def build(qp):
            qp.wr_rdma_read(c.rkey, c.raddr)
            qp.wr_set_sge(SGE(c.laddr, c.length, c.lkey))
        self._post("RDMA_READ", args, build, signal=last)

    def post_flush(self, rkey: int, raddr: int, length: int) -> None:
        """FLUSH(persistent, range): signalled, so wait() returns once it is durable."""
        args = {"rkey": rkey, "remote_addr": raddr, "len": length}
        self._post("FLUSH", args, lambda qp: qp.wr_flush(rkey, raddr, length, e.IBV_FLUSH_PERSISTENT,
                                                          e.IBV_FLUSH_RANGE), signal=True)

    def post_atomic_write(self, rkey: int, raddr: int, value: bytes) -> None:
        if len(value) != 8:
            raise ValueError(f"ATOMIC_WRITE carries exactly 8 bytes, not {len(value)}")
        args = {"rkey": rkey, "remote_addr": raddr}
        self._post("ATOMIC_WRITE", args, lambda qp: qp.wr_atomic_write(rkey, raddr, value), signal=True)

    def _transfer(self, verb: str, post, chunks: Iterable[Chunk], timeout: float) -> int:
        """Post every chunk (only the last signalled), then wait for all."""
        chunks = list(chunks)
        for i, c in enumerate(chunks):
            post(c, last=(i == len(chunks) - 1))
        total = sum(c.length for c in chunks)
        self.wait(verb, {"chunks": len(chunks), "bytes": total}, timeout)
        return total

    def write(self, chunks: Iterable[Chunk], timeout: float = 60.0) -> int:
        """RDMA WRITE every chunk, pipelined; returns bytes written once all completed."""
        return self._transfer("RDMA_WRITE", self.post_write, chunks, timeout)

    def read(self, chunks: Iterable[Chunk], timeout: float = 60.0) -> int:
        """RDMA READ every chunk, pipelined; returns bytes read once all completed."""
        return self._transfer("RDMA_READ", self.post_read, chunks, timeout)

    def flush(self, rkey: int, raddr: int, length: int, timeout: float = 30.0) -> None:
        self.post_flush(rkey, raddr, length)
        self.wait("FLUSH", {"rkey": rkey, "remote_addr": raddr, "len": length}, timeout)

    def atomic_write(self, rkey: int, raddr: int, value: bytes, timeout: float = 30.0) -> None:
        self.post_atomic_write(rkey, raddr, value)
        self.wait("ATOMIC_WRITE", {"rkey": rkey, "remote_addr": raddr}, timeout)

    # -- teardown -------------------------------------------------------------
    def close(self) -> None:
        for obj in (self.qp, self.cq):
            try:
                obj.close()
            except PyverbsError:
                pass

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
