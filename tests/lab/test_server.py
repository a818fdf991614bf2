"""Lab: rdax-server as a process in the storage namespace — start-up, canary, health, and one grant used over RDMA."""
from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from labkit import pattern
from pki import client_env, server_args

MIB = 1 << 20
START_TIMEOUT = 90      # import grpc alone takes ~4 s under TCG
LISTENING = "rdax-server listening on "
REM_ACCESS_ERR = 10


class ServerProcess:
    """python -m rdax.service.cli in this (storage) namespace; stderr kept in a file for failure messages."""

    def __init__(self, root: Path, listen: str, device: str, *extra: str, pki: dict | None = None) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", prefix="rdax-server-", suffix=".log")
        argv = [sys.executable, "-m", "rdax.service.cli", "--root", str(root), "--listen", listen,
                "--device", device, *(server_args(pki) if pki else ()), *extra]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        self.address = ""

    def wait_listening(self, timeout: float = START_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None   # stdout=PIPE
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith(LISTENING):
                    self.address = line[len(LISTENING):].strip()
                    return self.address
                if not line:
                    break
        pytest.fail(f"rdax-server did not report listening (exit {self.proc.poll()}):\n{self.stderr()}", pytrace=False)

    def stderr(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"rdax-server did not stop within {timeout} s of SIGTERM:\n{self.stderr()[-3000:]}",
                        pytrace=False)


@pytest.fixture(scope="module")
def export_root(lab):
    root = Path(lab["RDAX_DAX_MOUNT"]) / f"server-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(lab, export_root, pki):
    """One server for the module; stopping it with SIGTERM must be clean (exit 0)."""
    process = ServerProcess(export_root, f"{lab['RDAX_STORAGE_IP']}:0", lab["RDAX_STORAGE_DEV"], pki=pki)
    process.wait_listening()
    yield process
    started = time.monotonic()
    status = process.stop()
    assert status == 0, f"rdax-server exited {status} on SIGTERM:\n{process.stderr()[-3000:]}"
    print(f"rdax-server stopped in {time.monotonic() - started:.1f} s")


@pytest.fixture(scope="module")
def grpc_channel(server, pki):
    from rdax.client.tls import secure_channel, tls_from_env  # grpc: seconds to import in the guest

    env = client_env(pki, "lab", {})
    tls = tls_from_env(env["RDAX_TLS_CA"], env["RDAX_TLS_CERT"], env["RDAX_TLS_KEY"])
    assert tls is not None
    with secure_channel(server.address, tls) as channel:
        yield channel


@pytest.fixture
def stub(grpc_channel):
    from rdax.v1 import rdax_pb2_grpc

    return rdax_pb2_grpc.RdaxStub(grpc_channel)


def connect(stub, peer, lab) -> str:
    """Open a session for `peer`'s QP and bring both QPs to RTS; returns the session id."""
    from rdax.v1 import rdax_pb2 as pb

    mine = peer.call("open", device=lab["RDAX_CLIENT_DEV"])
    endpoint = pb.Endpoint(qpn=mine["qpn"], gid=mine["gid"], psn=mine["psn"], mtu=4096)
    opened = stub.OpenSession(pb.OpenSessionRequest(client_id="lab-peer", endpoint=endpoint))
    node = opened.endpoint
    assert peer.call("connect", qpn=node.qpn, gid=node.gid, psn=node.psn, mtu=4096)["state"] == "RTS"
    return opened.session_id


def test_server_starts_listening_and_serving(server, grpc_channel) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    assert server.address.startswith(os.environ["RDAX_STORAGE_IP"] + ":")
    assert "canary" in server.stderr() and "landed intact at path MTU 4096" in server.stderr()
    checker = health_pb2_grpc.HealthStub(grpc_channel)
    for service in ("", "rdax.v1.Rdax"):
        reply = checker.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_server_mtu_1024_refuses_to_start_bad_flow(lab, export_root, pki) -> None:
    process = ServerProcess(export_root, f"{lab['RDAX_STORAGE_IP']}:0", lab["RDAX_STORAGE_DEV"], "--mtu", "1024",
                            pki=pki)
    try:
        status = process.proc.wait(START_TIMEOUT)
    finally:
        process.stop()
    message = process.stderr()
    assert status == 2, message
    assert "MTU 1024" in message and "ODP" in message, message
    assert process.proc.stdout.read() == "", "a refused server must not say it is listening"
    assert not (export_root / ".rdax-canary").exists()


def test_server_grant_write_commit_unseal_round_trip(server, stub, peer, lab, export_root) -> None:
    from rdax.v1 import rdax_pb2 as pb

    sid = connect(stub, peer, lab)
    seal = stub.Seal(pb.SealRequest(session_id=sid, path="round-trip.bin", length=4 * MIB, create=True)).seal
    grant = stub.Grant(pb.GrantRequest(session_id=sid, seal_id=seal.seal_id, offset=MIB, length=MIB,
                                       access=pb.ACCESS_WRITE | pb.ACCESS_FLUSH)).grant
    reply = peer.call("write", rkey=grant.rkey, raddr=grant.remote_addr, length=MIB, seed=21)
    assert reply["ok"], reply
    assert peer.call("flush", rkey=grant.rkey, raddr=grant.remote_addr, length=MIB)["ok"]
    assert stub.Commit(pb.CommitRequest(session_id=sid, seal_id=seal.seal_id)).bytes == 4 * MIB
    stub.Unseal(pb.UnsealRequest(session_id=sid, seal_id=seal.seal_id))
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    # Unsealed: the lease is gone, so reading the file breaks nothing.
    data = (export_root / "round-trip.bin").read_bytes()
    assert data[MIB:2 * MIB] == pattern(21, MIB)
    assert data[:MIB] == bytes(MIB) and data[2 * MIB:] == bytes(2 * MIB), "bytes outside the grant changed"


def test_server_lease_break_revokes_grant_bad_flow(server, stub, peer, lab, export_root) -> None:
    from rdax.v1 import rdax_pb2 as pb

    sid = connect(stub, peer, lab)
    seal = stub.Seal(pb.SealRequest(session_id=sid, path="broken.bin", length=MIB, create=True)).seal
    grant = stub.Grant(pb.GrantRequest(session_id=sid, seal_id=seal.seal_id, offset=0, length=MIB,
                                       access=pb.ACCESS_WRITE)).grant
    assert peer.call("write", rkey=grant.rkey, raddr=grant.remote_addr, length=4096, seed=31)["ok"]
    events = stub.Watch(pb.WatchRequest(session_id=sid), timeout=60)
    with pytest.raises(BlockingIOError):   # a lease breaker: any other process opening the file
        os.open(export_root / "broken.bin", os.O_RDONLY | os.O_NONBLOCK)
    event = next(events)
    assert event.kind == pb.Event.REVOKED and list(event.grant_ids) == [grant.grant_id], event
    assert event.epoch == 2 and event.reason.startswith("lease break")
    reply = peer.call("write", rkey=grant.rkey, raddr=grant.remote_addr + 8192, length=4096, seed=32)
    assert not reply["ok"] and reply["status"] == REM_ACCESS_ERR, reply
    with open(export_root / "broken.bin", "rb") as f:
        data = f.read(3 * 4096)
    assert data[:4096] == pattern(31, 4096) and data[8192:] == bytes(4096), "a write after revocation landed"
    # The write after the revocation put the node's QP in the error state: the node ends the session and says
    # so, without holding it against the identity (a revocation explains the error).
    event = next(events)
    assert event.kind == pb.Event.SESSION_ENDED and "after the node revoked" in event.reason, event
    events.cancel()
