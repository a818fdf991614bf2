"""Tests for service.servicer and service.server: every RPC's statuses through a real in-process gRPC server."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import grpc
import pytest
from conftest import MIB, PAGE, FakeFabric, open_from_another_process, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rdax.service.errors import RdaxError
from rdax.service.node import Node
from rdax.service.server import SERVICE_NAME, create_server
from rdax.service.servicer import status_of
from rdax.v1 import rdax_pb2 as pb
from rdax.v1 import rdax_pb2_grpc

RW = pb.ACCESS_WRITE | pb.ACCESS_READ
CLIENT = pb.Endpoint(qpn=0x11, gid="::ffff:10.77.0.2", psn=7, mtu=4096)
Code = grpc.StatusCode


@pytest.fixture
def served(node: Node):
    """(stub, health servicer, channel) of a server on 127.0.0.1:0 over `node`."""
    server = create_server("127.0.0.1:0", node, None, max_workers=8)
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield rdax_pb2_grpc.RdaxStub(channel), server, channel
    channel.close()
    node.shutdown()
    server.stop(None)


@pytest.fixture
def stub(served) -> rdax_pb2_grpc.RdaxStub:
    return served[0]


def open_session(stub, name: str = "c1") -> str:
    return stub.OpenSession(pb.OpenSessionRequest(client_id=name, endpoint=CLIENT)).session_id


def sealed(stub, sid: str, path: str = "f", length: int = MIB) -> str:
    return stub.Seal(pb.SealRequest(session_id=sid, path=path, length=length, create=True)).seal.seal_id


def code_of(call, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value.code(), info.value.details() or ""


# -- sessions -------------------------------------------------------------------
def test_open_session_returns_node_endpoint(stub, fabric: FakeFabric) -> None:
    reply = stub.OpenSession(pb.OpenSessionRequest(client_id="c", endpoint=CLIENT))
    assert reply.session_id and reply.lease_seconds == 30
    assert reply.endpoint.qpn == fabric.channels[0].endpoint.qpn and reply.endpoint.mtu == 4096
    # Any IPv6 text form is taken; verbs get the expanded one.
    assert fabric.channels[0].remote.gid == "0000:0000:0000:0000:0000:ffff:0a4d:0002"


def test_open_session_mtu_1024_bad_flow(stub) -> None:
    endpoint = pb.Endpoint(qpn=1, gid="::1", psn=1, mtu=1024)
    code, details = code_of(stub.OpenSession, pb.OpenSessionRequest(client_id="c", endpoint=endpoint))
    assert code == Code.FAILED_PRECONDITION and "4096" in details and "ODP" in details


def test_open_session_without_endpoint_bad_flow(stub) -> None:
    assert code_of(stub.OpenSession, pb.OpenSessionRequest(client_id="c"))[0] == Code.INVALID_ARGUMENT


def test_open_session_fabric_bug_is_internal_bad_flow(stub, fabric: FakeFabric) -> None:
    fabric.fail_open = ZeroDivisionError("oops")
    code, details = code_of(stub.OpenSession, pb.OpenSessionRequest(client_id="c", endpoint=CLIENT))
    assert code == Code.INTERNAL and "ZeroDivisionError: oops" in details


def test_heartbeat_and_close_session(stub) -> None:
    sid = open_session(stub)
    assert stub.Heartbeat(pb.HeartbeatRequest(session_id=sid)).lease_seconds == 30
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    code, details = code_of(stub.Heartbeat, pb.HeartbeatRequest(session_id=sid))
    assert code == Code.NOT_FOUND and "session closed" in details


def test_heartbeat_unknown_session_bad_flow(stub) -> None:
    assert code_of(stub.Heartbeat, pb.HeartbeatRequest(session_id="nope"))[0] == Code.NOT_FOUND


# -- seals ----------------------------------------------------------------------
def test_seal_returns_seal_info(stub, export_root: Path) -> None:
    sid = open_session(stub)
    seal = stub.Seal(pb.SealRequest(session_id=sid, path="./f", length=MIB, create=True)).seal
    assert seal.path == "f" and seal.length == MIB and seal.epoch == 1 and seal.state == "SEALED"
    assert seal.extents.count >= 1 and len(seal.extents.fingerprint) == 64
    assert seal.owner_session == sid and list(seal.holder_sessions) == [sid]
    assert (export_root / "f").stat().st_size == MIB


@pytest.mark.parametrize("path, length, create, code", [
    ("f", 100, True, Code.INVALID_ARGUMENT),
    ("../f", PAGE, True, Code.INVALID_ARGUMENT),
    ("missing", PAGE, False, Code.NOT_FOUND),
])
def test_seal_bad_request_bad_flow(stub, path: str, length: int, create: bool, code) -> None:
    sid = open_session(stub)
    request = pb.SealRequest(session_id=sid, path=path, length=length, create=create)
    assert code_of(stub.Seal, request)[0] == code


def test_seal_longer_than_sealed_bad_flow(stub) -> None:
    a, b = open_session(stub, "a"), open_session(stub, "b")
    sealed(stub, a, length=MIB)
    code, details = code_of(stub.Seal, pb.SealRequest(session_id=b, path="f", length=2 * MIB))
    assert code == Code.FAILED_PRECONDITION and str(MIB) in details


def test_seal_unknown_session_bad_flow(stub) -> None:
    assert code_of(stub.Seal, pb.SealRequest(session_id="x", path="f", length=PAGE, create=True))[0] == Code.NOT_FOUND


def test_stat_list_unseal(stub) -> None:
    a, b = open_session(stub, "a"), open_session(stub, "b")
    seal = sealed(stub, a)
    stub.Seal(pb.SealRequest(session_id=b, path="f", length=MIB))
    info = stub.Stat(pb.StatRequest(session_id=b, seal_id=seal))
    assert list(info.holder_sessions) == [b] and info.holder_count == 2 and info.owner_session == ""
    assert [s.seal_id for s in stub.List(pb.ListRequest(session_id=a)).seals] == [seal]
    assert stub.Unseal(pb.UnsealRequest(session_id=a, seal_id=seal)).epoch == 1   # a had no grants
    assert code_of(stub.Unseal, pb.UnsealRequest(session_id=a, seal_id=seal))[0] == Code.PERMISSION_DENIED
    assert stub.Unseal(pb.UnsealRequest(session_id=b, seal_id=seal)).epoch == 2
    assert code_of(stub.Stat, pb.StatRequest(session_id=a, seal_id=seal))[0] == Code.NOT_FOUND
    assert list(stub.List(pb.ListRequest(session_id=a)).seals) == []


# -- grants ---------------------------------------------------------------------
def test_grant_returns_descriptor(stub, fabric: FakeFabric) -> None:
    sid = open_session(stub)
    seal = sealed(stub, sid)
    access = pb.ACCESS_WRITE | pb.ACCESS_FLUSH
    grant = stub.Grant(pb.GrantRequest(session_id=sid, seal_id=seal, offset=PAGE, length=2 * PAGE,
                                       access=access)).grant
    region = fabric.regions[0]
    assert (grant.remote_addr, grant.rkey, grant.length, grant.access) == (region.addr, region.rkey, 2 * PAGE, access)
    assert grant.offset == PAGE and grant.epoch == 1 and grant.seal_id == seal and grant.expires_unix_ms == 0
    assert grant.write_alignment == 1   # a node whose canary saw writes land where aimed (the default)


@pytest.mark.parametrize("offset, length, access, code", [
    (4097, PAGE, RW, Code.INVALID_ARGUMENT),
    (0, 0, RW, Code.INVALID_ARGUMENT),
    (0, 2 * MIB, RW, Code.OUT_OF_RANGE),
    (0, PAGE, 0, Code.INVALID_ARGUMENT),
    (0, PAGE, 0x30, Code.INVALID_ARGUMENT),
])
def test_grant_bad_request_bad_flow(stub, fabric: FakeFabric, offset: int, length: int, access: int, code) -> None:
    sid = open_session(stub)
    seal = sealed(stub, sid)
    request = pb.GrantRequest(session_id=sid, seal_id=seal, offset=offset, length=length, access=access)
    assert code_of(stub.Grant, request)[0] == code
    assert fabric.regions == []


def test_grant_offset_message_says_why(stub) -> None:
    sid = open_session(stub)
    request = pb.GrantRequest(session_id=sid, seal_id=sealed(stub, sid), offset=4097, length=PAGE, access=RW)
    assert code_of(stub.Grant, request)[1] == "offset 4097 is not a multiple of 4096: grants cover whole pages"


def test_grant_unknown_seal_and_not_held_bad_flow(stub) -> None:
    a, b = open_session(stub, "a"), open_session(stub, "b")
    seal = sealed(stub, a)
    unknown = pb.GrantRequest(session_id=a, seal_id="seal-x", offset=0, length=PAGE, access=RW)
    assert code_of(stub.Grant, unknown)[0] == Code.NOT_FOUND
    not_held = pb.GrantRequest(session_id=b, seal_id=seal, offset=0, length=PAGE, access=RW)
    assert code_of(stub.Grant, not_held)[0] == Code.PERMISSION_DENIED


def test_grant_limit_bad_flow(make_node) -> None:
    node = make_node(max_grants_per_session=1)
    server = create_server("127.0.0.1:0", node, max_workers=4)
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rdax_pb2_grpc.RdaxStub(channel)
            sid = open_session(stub)
            seal = sealed(stub, sid)
            stub.Grant(pb.GrantRequest(session_id=sid, seal_id=seal, offset=0, length=PAGE, access=RW))
            request = pb.GrantRequest(session_id=sid, seal_id=seal, offset=PAGE, length=PAGE, access=RW)
            assert code_of(stub.Grant, request)[0] == Code.RESOURCE_EXHAUSTED
    finally:
        server.stop(None)


def test_release(stub, fabric: FakeFabric) -> None:
    a, b = open_session(stub, "a"), open_session(stub, "b")
    seal = sealed(stub, a)
    grant = stub.Grant(pb.GrantRequest(session_id=a, seal_id=seal, offset=0, length=PAGE, access=RW)).grant
    assert code_of(stub.Release, pb.ReleaseRequest(session_id=b, grant_id=grant.grant_id))[0] == Code.NOT_FOUND
    stub.Release(pb.ReleaseRequest(session_id=a, grant_id=grant.grant_id))
    assert fabric.live_regions == []
    assert code_of(stub.Release, pb.ReleaseRequest(session_id=a, grant_id=grant.grant_id))[0] == Code.NOT_FOUND


# -- commit ---------------------------------------------------------------------
def test_commit(stub) -> None:
    sid = open_session(stub)
    seal = sealed(stub, sid)
    ranges = [pb.Range(offset=0, length=PAGE), pb.Range(offset=MIB - 8, length=8)]
    assert stub.Commit(pb.CommitRequest(session_id=sid, seal_id=seal, ranges=ranges)).bytes == PAGE + 8
    assert stub.Commit(pb.CommitRequest(session_id=sid, seal_id=seal)).bytes == MIB
    past = pb.CommitRequest(session_id=sid, seal_id=seal, ranges=[pb.Range(offset=MIB, length=1)])
    assert code_of(stub.Commit, past)[0] == Code.OUT_OF_RANGE


# -- watch ----------------------------------------------------------------------
def test_watch_streams_revocation_then_ends_with_session(stub, export_root: Path) -> None:
    sid = open_session(stub)
    seal = sealed(stub, sid)
    grant = stub.Grant(pb.GrantRequest(session_id=sid, seal_id=seal, offset=0, length=PAGE, access=RW)).grant
    events = stub.Watch(pb.WatchRequest(session_id=sid), timeout=20)
    assert open_from_another_process(export_root / "f", block=False).returncode == 11
    event = next(events)
    assert event.kind == pb.Event.REVOKED and list(event.grant_ids) == [grant.grant_id]
    assert event.seal_id == seal and event.epoch == 2 and event.reason.startswith("lease break")
    revoked = pb.GrantRequest(session_id=sid, seal_id=seal, offset=0, length=PAGE, access=RW)
    assert code_of(stub.Grant, revoked)[0] == Code.FAILED_PRECONDITION
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    assert list(events) == []


def test_watch_unknown_session_bad_flow(stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        next(stub.Watch(pb.WatchRequest(session_id="nope"), timeout=10))
    assert info.value.code() == Code.NOT_FOUND


# -- server ---------------------------------------------------------------------
def test_health_serving_then_draining(served, node: Node) -> None:
    stub, server, channel = served
    checker = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        status = checker.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    sid = open_session(stub)
    node.revoke(sealed(stub, sid), "first")
    events = stub.Watch(pb.WatchRequest(session_id=sid), timeout=20)
    assert next(events).reason == "first"   # the stream is attached before the node drains
    server.set_serving(False)
    node.shutdown()
    assert checker.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert [(e.kind, e.seal_id) for e in events] == [(pb.Event.SHUTDOWN, "")]
    assert code_of(stub.Heartbeat, pb.HeartbeatRequest(session_id=sid))[0] == Code.UNAVAILABLE


def test_reflection_lists_services(served) -> None:
    _, _, channel = served
    reflector = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflector.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(replies).list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_status_of_verbs_error_maps_by_errno(monkeypatch) -> None:
    class VerbsError(Exception):
        def __init__(self, message: str, errno: int | None) -> None:
            super().__init__(message)
            self.errno = errno

    monkeypatch.setitem(sys.modules, "rdax.rdma", types.SimpleNamespace(VerbsError=VerbsError))
    assert status_of(VerbsError("ibv_reg_mr(...): errno 12", 12))[0] == Code.RESOURCE_EXHAUSTED
    assert status_of(VerbsError("ibv_create_qp_ex(...)", None))[0] == Code.UNAVAILABLE
    assert status_of(RdaxError("boom")) == (Code.INTERNAL, "boom")


def test_rpc_latency_by_method_and_code(stub, node: Node) -> None:
    sid = open_session(stub)
    code_of(stub.Heartbeat, pb.HeartbeatRequest(session_id="nope"))
    sample = node.metrics.registry.get_sample_value
    # Observed as the handler returns, which can be just after the client has its answer.
    assert wait_until(lambda: sample("rdax_rpc_seconds_count", {"method": "OpenSession", "code": "OK"}) == 1)
    assert wait_until(lambda: sample("rdax_rpc_seconds_count", {"method": "Heartbeat", "code": "NOT_FOUND"}) == 1)
    assert sid
