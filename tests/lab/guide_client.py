"""A client of an rdax node written from docs/protocol.md alone: raw pyverbs, grpc and the generated stubs.

It uses nothing of rdax but `rdax.v1.rdax_pb2` / `rdax_pb2_grpc` (the code generated from the .proto, which any
language would generate for itself): not rdax.client, not rdax.rdma. The comments name the guide's sections
("guide 3.4") so that the guide and this client can be checked against each other.

    ip netns exec client python tests/lab/guide_client.py --target 10.77.0.1:7710 put SRC REMOTE_PATH
    ip netns exec client python tests/lab/guide_client.py --target 10.77.0.1:7710 revoke SRC REMOTE_PATH \\
        --atomic-at 4096 8256
    ip netns exec client python tests/lab/guide_client.py --target 10.77.0.1:7710 probe \\
        --cases '[{"gid": "not-a-gid"}, {"mtu": 5000}]'

TLS files come from RDAX_TLS_CA, RDAX_TLS_CERT and RDAX_TLS_KEY. The client's RDMA device is the one with a
RoCE v2 GID for --ip (default $RDAX_CLIENT_IP). Prints one JSON object on stdout (revoke: a {"phase": "sealed"}
line before it); exits 1 on failure.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import ipaddress
import json
import os
import secrets
import sys
import threading
import time
from errno import ENOENT

import grpc
import pyverbs.enums as e
from pyverbs.addr import GID, AHAttr, GlobalRoute
from pyverbs.cq import CQEX, CqInitAttrEx, PollCqAttr
from pyverbs.device import Context
from pyverbs.mr import MR
from pyverbs.pd import PD
from pyverbs.qp import QPAttr, QPCap, QPEx, QPInitAttrEx
from pyverbs.wr import SGE

from rdax.v1 import rdax_pb2 as pb
from rdax.v1 import rdax_pb2_grpc as pb_grpc

PORT = 1
PAGE = 4096
CHUNK = 1 << 20           # bytes per RDMA WRITE: a multiple of any write_alignment up to 1 MiB
DEPTH = 16                # work requests in flight
WRITE, READ, ATOMIC, FLUSH = 1, 2, 4, 8
SYSFS = "/sys/class/infiniband"


class Failed(Exception):
    """The guide's flow failed; the message says where."""


# -- guide 2: connecting ------------------------------------------------------------------------------------------
def channel(target: str) -> grpc.Channel:
    """Mutual TLS: verify the node against the CA, present our certificate (our identity is in it)."""
    def read(var: str) -> bytes:
        path = os.environ.get(var)
        if not path:
            raise Failed(f"{var} is not set: the node requires mutual TLS")
        with open(path, "rb") as f:
            return f.read()
    creds = grpc.ssl_channel_credentials(root_certificates=read("RDAX_TLS_CA"), private_key=read("RDAX_TLS_KEY"),
                                         certificate_chain=read("RDAX_TLS_CERT"))
    return grpc.secure_channel(target, creds)


# -- guide 3.1: the RDMA device and its GID --------------------------------------------------------------------------
def roce_v2_gid(ip: str, device: str | None) -> tuple[str, int, str]:
    """(device, GID index, GID) of the RoCE v2 GID that is the IPv4-mapped form of `ip`, read from sysfs."""
    want = ipaddress.IPv6Address(f"::ffff:{ip}")
    devices = [device] if device else sorted(os.listdir(SYSFS))
    for dev in devices:
        gids = f"{SYSFS}/{dev}/ports/{PORT}/gids"
        for index in sorted(os.listdir(gids), key=int):
            try:
                with open(f"{gids}/{index}") as f:
                    raw = f.read().strip()
                with open(f"{SYSFS}/{dev}/ports/{PORT}/gid_attrs/types/{index}") as f:
                    kind = f.read().strip()
            except OSError:      # an unused slot of the table cannot be read
                continue
            if kind == "RoCE v2" and ipaddress.IPv6Address(raw) == want:
                return dev, int(index), raw
    raise Failed(f"no RoCE v2 GID for {ip} on {devices}")


class Rdma:
    """guide 3.2: PD, CQ, an extended RC QP with WRITE, READ, FLUSH and ATOMIC_WRITE, one registered buffer."""

    def __init__(self, device: str, gid_index: int, buffer_bytes: int) -> None:
        self.ctx = Context(name=device)
        self.gid_index = gid_index
        self.pd = PD(self.ctx)
        self.cq = CQEX(self.ctx, CqInitAttrEx(cqe=2 * DEPTH))
        cap = QPCap(max_send_wr=DEPTH, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
        ops = (e.IBV_QP_EX_WITH_RDMA_WRITE | e.IBV_QP_EX_WITH_RDMA_READ | e.IBV_QP_EX_WITH_FLUSH
               | e.IBV_QP_EX_WITH_ATOMIC_WRITE)
        init = QPInitAttrEx(qp_type=e.IBV_QPT_RC, pd=self.pd, scq=self.cq, rcq=self.cq, cap=cap,
                            comp_mask=e.IBV_QP_INIT_ATTR_PD | e.IBV_QP_INIT_ATTR_SEND_OPS_FLAGS, send_ops_flags=ops)
        self.qp = QPEx(self.ctx, init)
        self.psn = secrets.randbits(24)     # guide 3.3: random, 24 bits
        # Local memory the QP sends from: pinned, local write only (the node never touches it).
        self.buf = MR(self.pd, max(buffer_bytes, PAGE), e.IBV_ACCESS_LOCAL_WRITE)
        self.poll_attr = PollCqAttr()
        self.sge = SGE(0, 0, 0)             # one scatter/gather entry, refilled per request
        self.lost: str | None = None        # set by Watch/Heartbeat when the node ended the session (guide 8.3)

    def connect(self, node: pb.Endpoint) -> None:
        """guide 3.5: RESET -> INIT -> RTR -> RTS towards the node's QP, with the attributes the guide gives."""
        attr = QPAttr(port_num=PORT)
        attr.qp_access_flags = 0                        # the node never reads or writes our memory
        attr.path_mtu = e.IBV_MTU_4096                  # min(ours, node.mtu); the node only ever says 4096
        if node.mtu != 4096:
            raise Failed(f"the node answered mtu {node.mtu}; the guide says it is always 4096")
        attr.dest_qp_num = node.qpn
        attr.rq_psn = node.psn
        attr.sq_psn = self.psn
        attr.max_rd_atomic = 16                         # <= the node's max_dest_rd_atomic (16)
        attr.max_dest_rd_atomic = 16
        attr.min_rnr_timer = 12
        attr.timeout = 14
        attr.retry_cnt = 7
        attr.rnr_retry = 7
        route = GlobalRoute(dgid=GID(node.gid), sgid_index=self.gid_index, hop_limit=64)
        attr.ah_attr = AHAttr(gr=route, is_global=1, port_num=PORT)
        self.qp.to_rts(attr)

    def post(self, build, signalled: bool, wr_id: int) -> None:
        qp = self.qp
        qp.wr_start()
        qp.wr_id = wr_id
        qp.wr_flags = e.IBV_SEND_SIGNALED if signalled else 0
        build(qp)
        qp.wr_complete()

    def write(self, local_off: int, length: int, rkey: int, raddr: int, wr_id: int) -> None:
        def build(qp):
            qp.wr_rdma_write(rkey, raddr)
            self.sge.addr, self.sge.length, self.sge.lkey = self.buf.buf + local_off, length, self.buf.lkey
            qp.wr_set_sge(self.sge)
        self.post(build, True, wr_id)

    def flush(self, rkey: int, raddr: int, length: int, wr_id: int) -> None:
        # guide 5.3: FLUSH, persistent type, range placement.
        self.post(lambda qp: qp.wr_flush(rkey, raddr, length, e.IBV_FLUSH_PERSISTENT, e.IBV_FLUSH_RANGE), True,
                  wr_id)

    def completion(self, timeout: float = 60.0) -> tuple[int, int]:
        """(wr_id, status) of the next completion. Stops waiting as soon as the node ended the session
        (guide 8.3: its QP is gone and rxe's retries will not tell us)."""
        deadline = time.monotonic() + timeout
        spins = 0
        while True:
            rc = self.cq.start_poll(self.poll_attr)
            if rc == 0:
                break
            if rc != ENOENT:
                raise Failed(f"ibv_start_poll: {os.strerror(rc)}")
            spins += 1
            if not spins & 0xFF:
                if self.lost is not None:
                    raise Failed(f"session lost while waiting for a completion: {self.lost}")
                if time.monotonic() > deadline:
                    raise Failed(f"no completion within {timeout} s")
                time.sleep(0.0005)      # be kind to a shared machine: this is a test, not a benchmark
        wr_id, status = self.cq.wr_id, self.cq.status
        self.cq.end_poll()
        return wr_id, status

    def close(self) -> None:
        for obj in (self.qp, self.buf, self.cq, self.pd, self.ctx):
            obj.close()


# -- guide 3.6 and 8: heartbeat and Watch ------------------------------------------------------------------------------
class Background:
    def __init__(self, stub: pb_grpc.RdaxStub, session_id: str, lease_seconds: int, rdma: Rdma) -> None:
        self.stub, self.session_id, self.lease, self.rdma = stub, session_id, lease_seconds, rdma
        self.events: list[dict] = []
        self.watch_end: str | None = None   # how the Watch stream ended: "OK" or a status code name
        self.heartbeats = 0
        self.stop = threading.Event()
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.heart = threading.Thread(target=self._heartbeat, daemon=True)
        self.watcher.start()
        self.heart.start()

    def _watch(self) -> None:
        try:
            for event in self.stub.Watch(pb.WatchRequest(session_id=self.session_id)):
                self.events.append({"kind": pb.Event.Kind.Name(event.kind), "seal_id": event.seal_id,
                                    "grant_ids": list(event.grant_ids), "reason": event.reason,
                                    "epoch": event.epoch})
                if event.kind in (pb.Event.SESSION_EXPIRED, pb.Event.SESSION_ENDED, pb.Event.SHUTDOWN):
                    self.rdma.lost = event.reason
            self.watch_end = "OK"           # the stream ends when the session does
        except grpc.RpcError as exc:
            self.watch_end = exc.code().name

    def _heartbeat(self) -> None:
        while not self.stop.wait(max(1.0, self.lease / 3)):
            try:
                self.stub.Heartbeat(pb.HeartbeatRequest(session_id=self.session_id), timeout=10)
                self.heartbeats += 1
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND and not self.stop.is_set():
                    self.rdma.lost = exc.details()


def open_session(stub: pb_grpc.RdaxStub, rdma: Rdma, gid: str, mtu: int = 4096) -> pb.OpenSessionResponse:
    """guide 3.4: our QP's endpoint in, the node's out."""
    return stub.OpenSession(pb.OpenSessionRequest(
        client_id=f"guide_client pid {os.getpid()}",
        endpoint=pb.Endpoint(qpn=rdma.qp.qp_num, gid=gid, psn=rdma.psn, mtu=mtu)), timeout=30)


def gid_form(gid: str, form: str) -> str:
    """The same GID in another IPv6 text form (the node takes any)."""
    addr = ipaddress.IPv6Address(gid)
    if form == "expanded":
        return gid
    if form == "compressed":
        return f"::ffff:{addr.ipv4_mapped}" if addr.ipv4_mapped else addr.compressed
    raise ValueError(form)


def seal_dict(info: pb.SealInfo) -> dict:
    return {"seal_id": info.seal_id, "path": info.path, "length": info.length, "epoch": info.epoch,
            "state": info.state, "grant_ids": list(info.grant_ids), "holder_count": info.holder_count,
            "holder_sessions": len(info.holder_sessions), "owner_is_me": bool(info.owner_session),
            "extents": info.extents.count}


# -- the flows ---------------------------------------------------------------------------------------------------
def start_session(args: argparse.Namespace, data: bytes, gid_text_form: str = "expanded"):
    """guide 3: device, QP, OpenSession, connect, Watch and Heartbeat. Returns (stub, rdma, session id, bg, out)."""
    device, gid_index, gid = roce_v2_gid(args.ip, args.device)
    rdma = Rdma(device, gid_index, len(data))
    ctypes.memmove(rdma.buf.buf, data, len(data))
    out: dict = {"device": device, "gid_index": gid_index, "sent_gid": gid_form(gid, gid_text_form)}
    stub = pb_grpc.RdaxStub(channel(args.target))
    opened = open_session(stub, rdma, out["sent_gid"])                                  # guide 3.4
    out["node_endpoint"] = {"qpn": opened.endpoint.qpn, "gid": opened.endpoint.gid, "mtu": opened.endpoint.mtu}
    out["lease_seconds"] = opened.lease_seconds
    rdma.connect(opened.endpoint)                                                         # guide 3.5
    bg = Background(stub, opened.session_id, opened.lease_seconds, rdma)                  # guide 3.6, 8
    return stub, rdma, opened.session_id, bg, out


def end_session(stub: pb_grpc.RdaxStub, rdma: Rdma, sid: str, bg: Background, out: dict) -> None:
    """guide 6.4: CloseSession; the Watch stream then ends with OK; the id is NOT_FOUND from then on."""
    bg.stop.set()
    try:
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10)
    except grpc.RpcError as exc:
        out["close_error"] = f"{exc.code().name}: {exc.details()}"
    bg.watcher.join(10)
    out["events"] = bg.events
    out["watch_end"] = bg.watch_end
    try:
        stub.Heartbeat(pb.HeartbeatRequest(session_id=sid), timeout=10)
        out["heartbeat_after_close"] = "OK"
    except grpc.RpcError as exc:
        out["heartbeat_after_close"] = exc.code().name
    rdma.close()


def grant_dict(grant: pb.GrantDescriptor) -> dict:
    align = max(1, grant.write_alignment)
    return {"grant_id": grant.grant_id, "offset": grant.offset, "length": grant.length, "access": grant.access,
            "epoch": grant.epoch, "write_alignment": grant.write_alignment,
            "expires_unix_ms": grant.expires_unix_ms, "remote_addr_aligned": grant.remote_addr % align == 0}


def remote(grant: pb.GrantDescriptor, offset: int) -> int:
    """guide 5.2: file offset -> remote address."""
    return grant.remote_addr + (offset - grant.offset)


def write_and_flush(rdma: Rdma, grant: pb.GrantDescriptor, nbytes: int) -> None:
    """guide 5.2, 5.3: the buffer's first nbytes to file offset grant.offset in CHUNK-sized WRITEs, each starting on
    a multiple of write_alignment, at most DEPTH in flight; then one FLUSH(persistent) of the range behind them."""
    align = max(1, grant.write_alignment)
    starts = list(range(0, nbytes, CHUNK))
    for start in starts:
        if remote(grant, grant.offset + start) % align:
            raise Failed(f"a write would start at {remote(grant, grant.offset + start):#x}, not a multiple of {align}")
    posted = done = 0
    while done < len(starts):
        while posted < len(starts) and posted - done < DEPTH:
            start = starts[posted]
            rdma.write(start, min(CHUNK, nbytes - start), grant.rkey, remote(grant, grant.offset + start), posted + 1)
            posted += 1
        wr_id, status = rdma.completion()
        if status != 0:
            raise Failed(f"RDMA WRITE {wr_id} completed with status {status}")
        done += 1
    rdma.flush(grant.rkey, remote(grant, grant.offset), nbytes, 1 << 32)
    wr_id, status = rdma.completion()
    if status != 0 or wr_id != 1 << 32:
        raise Failed(f"FLUSH completed with status {status} (wr_id {wr_id})")


def code_of(call, request) -> str:
    """The status name a call gets ("OK" if it succeeds)."""
    try:
        call(request, timeout=30)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def put(args: argparse.Namespace) -> dict:
    """Seal, one WRITE|FLUSH grant, stream the file and flush it, look at it, give everything back."""
    with open(args.src, "rb") as f:
        data = f.read()
    stub, rdma, sid, bg, out = start_session(args, data, args.gid_form)
    try:
        # guide 4.1: seal length a multiple of 4096, at least the data.
        length = max(PAGE, -(-len(data) // PAGE) * PAGE)
        seal = stub.Seal(pb.SealRequest(session_id=sid, path=args.path, length=length, create=True)).seal
        out["seal"] = seal_dict(seal)
        # guide 5.1: one grant over the whole seal, WRITE | FLUSH.
        grant = stub.Grant(pb.GrantRequest(session_id=sid, seal_id=seal.seal_id, offset=0, length=length,
                                           access=WRITE | FLUSH)).grant
        out["grant"] = grant_dict(grant)
        write_and_flush(rdma, grant, len(data))
        out["written"] = len(data)
        # guide 4.3: what Stat and List show.
        out["stat"] = seal_dict(stub.Stat(pb.StatRequest(session_id=sid, seal_id=seal.seal_id)))
        out["listed"] = [s.seal_id for s in stub.List(pb.ListRequest(session_id=sid)).seals]
        # guide 6.1: Commit (node-side msync) of one range; guide 3.6: Heartbeat answers the lease.
        out["commit_bytes"] = stub.Commit(pb.CommitRequest(session_id=sid, seal_id=seal.seal_id,
                                                           ranges=[pb.Range(offset=0, length=len(data))])).bytes
        out["heartbeat_lease"] = stub.Heartbeat(pb.HeartbeatRequest(session_id=sid)).lease_seconds
        # guide 6.2, 6.3: Release (no epoch change), then Unseal (the last holder: the seal is revoked, epoch + 1).
        stub.Release(pb.ReleaseRequest(session_id=sid, grant_id=grant.grant_id))
        out["stat_after_release"] = seal_dict(stub.Stat(pb.StatRequest(session_id=sid, seal_id=seal.seal_id)))
        out["unseal_epoch"] = stub.Unseal(pb.UnsealRequest(session_id=sid, seal_id=seal.seal_id)).epoch
        out["stat_after_unseal"] = code_of(stub.Stat, pb.StatRequest(session_id=sid, seal_id=seal.seal_id))
    finally:
        end_session(stub, rdma, sid, bg, out)
    out["sha256"] = hashlib.sha256(data).hexdigest()
    return out


def revoke(args: argparse.Namespace) -> dict:
    """guide 8.2: write through a grant, wait for the seal to be broken on the node (prints {"phase": "sealed"} and
    waits for a REVOKED event), handle the revocation as the guide says, seal again, and ATOMIC_WRITE (guide 5.4)."""
    with open(args.src, "rb") as f:
        data = f.read()
    stub, rdma, sid, bg, out = start_session(args, data)
    try:
        length = max(PAGE, -(-len(data) // PAGE) * PAGE)
        seal = stub.Seal(pb.SealRequest(session_id=sid, path=args.path, length=length, create=True)).seal
        grant = stub.Grant(pb.GrantRequest(session_id=sid, seal_id=seal.seal_id, offset=0, length=length,
                                           access=WRITE | FLUSH)).grant
        write_and_flush(rdma, grant, len(data))
        out["seal"], out["grant"] = seal_dict(seal), grant_dict(grant)
        print(json.dumps({"phase": "sealed", "seal_id": seal.seal_id}), flush=True)
        deadline = time.monotonic() + 60
        while not any(ev["kind"] == "REVOKED" for ev in bg.events):
            if time.monotonic() > deadline:
                raise Failed("no REVOKED event within 60 s of the seal being broken")
            time.sleep(0.05)
        # The grant is gone: post nothing more through it. The seal is REVOKED: Grant and Commit are refused,
        # the revoked grant cannot be released, Unseal drops the hold.
        out["stat_revoked"] = seal_dict(stub.Stat(pb.StatRequest(session_id=sid, seal_id=seal.seal_id)))
        out["revoked_reason"] = stub.Stat(pb.StatRequest(session_id=sid, seal_id=seal.seal_id)).revoked_reason
        out["grant_on_revoked"] = code_of(stub.Grant, pb.GrantRequest(
            session_id=sid, seal_id=seal.seal_id, offset=0, length=PAGE, access=WRITE))
        out["commit_on_revoked"] = code_of(stub.Commit, pb.CommitRequest(session_id=sid, seal_id=seal.seal_id))
        out["release_revoked"] = code_of(stub.Release, pb.ReleaseRequest(session_id=sid, grant_id=grant.grant_id))
        out["unseal_revoked_epoch"] = stub.Unseal(pb.UnsealRequest(session_id=sid, seal_id=seal.seal_id)).epoch
        # Seal again once the breaker is done (UNAVAILABLE while it still has the file open: retry).
        for _ in range(40):
            try:
                again = stub.Seal(pb.SealRequest(session_id=sid, path=args.path, length=length)).seal
                break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(0.5)
        else:
            raise Failed("the path could not be sealed again within 20 s")
        out["resealed"] = seal_dict(again)
        # guide 5.4: ATOMIC_WRITE, 8 bytes, through a grant with ATOMIC (which needs WRITE); FLUSH to persist.
        g2 = stub.Grant(pb.GrantRequest(session_id=sid, seal_id=again.seal_id, offset=0, length=length,
                                        access=WRITE | ATOMIC | FLUSH)).grant
        out["grant2"] = grant_dict(g2)
        out["atomics"] = []
        for offset in args.atomic_at:
            value = secrets.token_bytes(8)
            rdma.post(lambda qp, o=offset, v=value: qp.wr_atomic_write(g2.rkey, remote(g2, o), v), True, 7)
            wr_id, status = rdma.completion()
            if status != 0:
                raise Failed(f"ATOMIC_WRITE at {offset} completed with status {status}")
            out["atomics"].append({"offset": offset, "value": value.hex()})
        rdma.flush(g2.rkey, remote(g2, 0), length, 8)
        if rdma.completion()[1] != 0:
            raise Failed("FLUSH after the ATOMIC_WRITEs failed")
        # Unseal with the grant still live: it is revoked with reason "unseal" (guide 6.3).
        out["unseal_epoch"] = stub.Unseal(pb.UnsealRequest(session_id=sid, seal_id=again.seal_id)).epoch
    finally:
        end_session(stub, rdma, sid, bg, out)
    out["sha256"] = hashlib.sha256(data).hexdigest()
    return out


def probe(args: argparse.Namespace) -> dict:
    """OpenSession with a real QP's endpoint, each case overriding some fields: the status each one gets."""
    device, gid_index, gid = roce_v2_gid(args.ip, args.device)
    rdma = Rdma(device, gid_index, PAGE)
    stub = pb_grpc.RdaxStub(channel(args.target))
    results = []
    for case in json.loads(args.cases):
        try:
            opened = open_session(stub, rdma, case.get("gid", gid), case.get("mtu", 4096))
            results.append({"code": "OK", "details": "", "node_gid": opened.endpoint.gid})
            stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id))
        except grpc.RpcError as exc:
            results.append({"code": exc.code().name, "details": exc.details() or ""})
    rdma.close()
    return {"results": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="the node's HOST:PORT")
    parser.add_argument("--ip", default=os.environ.get("RDAX_CLIENT_IP"), help="this client's IPv4 address")
    parser.add_argument("--device", help="the RDMA device (default: the one with a RoCE v2 GID for --ip)")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("put", help="write a local file into REMOTE_PATH: WRITE + FLUSH through one grant")
    p.add_argument("src")
    p.add_argument("path")
    p.add_argument("--gid-form", choices=("expanded", "compressed"), default="expanded")
    p.set_defaults(run=put)
    p = commands.add_parser("revoke", help="write, wait for the seal to be broken, handle it, seal again, atomics")
    p.add_argument("src")
    p.add_argument("path")
    p.add_argument("--atomic-at", type=int, nargs="+", default=[4096], help="file offsets of 8-byte ATOMIC_WRITEs")
    p.set_defaults(run=revoke)
    p = commands.add_parser("probe", help="OpenSession with overridden endpoint fields; the status of each")
    p.add_argument("--cases", required=True, help='a JSON list such as [{"gid": "x"}, {"mtu": 5000}]')
    p.set_defaults(run=probe)
    args = parser.parse_args()
    if not args.ip:
        parser.error("--ip (or RDAX_CLIENT_IP) is needed to find this client's GID")
    try:
        print(json.dumps({"ok": True, **args.run(args)}), flush=True)
        return 0
    except (Failed, grpc.RpcError) as exc:
        detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
        print(json.dumps({"ok": False, "error": detail}), flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
