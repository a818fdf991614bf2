"""--health-listen: a plaintext listener with grpc.health.v1 and nothing else, sharing the node's health status
(kubelet's gRPC probe cannot present a client certificate). The Rdax service must not be reachable there."""
from __future__ import annotations

import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rdax.service.admin import make_ca, make_client_cert, make_node_cert
from rdax.service.cli import parse_args
from rdax.service.node import Node
from rdax.service.server import SERVICE_NAME, create_server
from rdax.service.tls import ServerTls
from rdax.v1 import rdax_pb2 as pb
from rdax.v1 import rdax_pb2_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
OWN_CONNECTIONS = [("grpc.use_local_subchannel_pool", 1)]
ENDPOINT = pb.Endpoint(qpn=0x11, gid="::ffff:10.77.0.2", psn=7, mtu=4096)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "pki"
    ca, _ = make_ca(folder)
    cert, key = make_node_cert(folder, "node", ips=["127.0.0.1"])
    client_cert, client_key = make_client_cert(folder, "spiffe://rdax.test/client/lab", name="client")
    return {"ca": ca, "cert": cert, "key": key, "client_cert": client_cert, "client_key": client_key}


@pytest.fixture
def served(node: Node, pki):
    """A node served over mutual TLS on one port, with the plaintext health listener on another."""
    tls = ServerTls(str(pki["cert"]), str(pki["key"]), str(pki["ca"]))
    server = create_server("127.0.0.1:0", node, tls.credentials(), max_workers=4, health_address="127.0.0.1:0")
    server.start()
    assert server.health_port not in (0, server.port)
    yield server
    node.shutdown()
    server.stop(None)


def health_channel(server) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{server.health_port}", options=OWN_CONNECTIONS)


def check(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code()


def test_health_listener_answers_in_plaintext_what_the_node_answers(served) -> None:
    with health_channel(served) as channel:
        assert check(channel) == SERVING
        assert check(channel, SERVICE_NAME) == SERVING
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == SERVING
        served.set_serving(False)   # what drain() does first
        assert next(watch).status == NOT_SERVING
        assert check(channel) == NOT_SERVING
        assert check(channel, SERVICE_NAME) == NOT_SERVING
        assert served.health_status() == NOT_SERVING
        watch.cancel()


def test_health_listener_unknown_service_is_not_found_bad_flow(served) -> None:
    with health_channel(served) as channel:
        assert code_of(check, channel, "rdax.v1.Nope") == grpc.StatusCode.NOT_FOUND


def test_health_listener_serves_no_rdax_and_no_reflection_bad_flow(served, fabric) -> None:
    """A caller with no certificate reaches the health service and nothing else: every Rdax method and
    reflection are UNIMPLEMENTED there, and the node opened nothing."""
    with health_channel(served) as channel:
        stub = rdax_pb2_grpc.RdaxStub(channel)
        calls = [(stub.OpenSession, pb.OpenSessionRequest(client_id="intruder", endpoint=ENDPOINT)),
                 (stub.List, pb.ListRequest()),
                 (stub.Heartbeat, pb.HeartbeatRequest(session_id="x")),
                 (stub.Seal, pb.SealRequest(session_id="x", path="f", length=4096, create=True))]
        for method, request in calls:
            assert code_of(method, request, timeout=10) == grpc.StatusCode.UNIMPLEMENTED, method
        assert code_of(lambda: next(stub.Watch(pb.WatchRequest(session_id="x"), timeout=10))) \
            == grpc.StatusCode.UNIMPLEMENTED
        reflector = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflector.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10)
        assert code_of(lambda: next(replies)) == grpc.StatusCode.UNIMPLEMENTED
        raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/rdax.v1.Rdax/OpenSession")
        assert code_of(raw, b"\x0a\x01x", timeout=10) == grpc.StatusCode.UNIMPLEMENTED
    assert fabric.channels == [], "a call on the health port reached the node"


def test_health_listener_refuses_big_requests_bad_flow(served) -> None:
    with health_channel(served) as channel:
        assert code_of(check, channel, "x" * 4096) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert check(channel) == SERVING


def test_main_port_still_needs_a_client_certificate_bad_flow(served, pki) -> None:
    """The health listener opens nothing on the main port: plaintext and certificate-less TLS stay refused."""
    with grpc.insecure_channel(f"127.0.0.1:{served.port}", options=OWN_CONNECTIONS) as channel:
        assert code_of(check, channel) == grpc.StatusCode.UNAVAILABLE
    nocert = grpc.ssl_channel_credentials(pki["ca"].read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{served.port}", nocert, options=OWN_CONNECTIONS) as channel:
        assert code_of(check, channel) == grpc.StatusCode.UNAVAILABLE
    creds = grpc.ssl_channel_credentials(pki["ca"].read_bytes(), pki["client_key"].read_bytes(),
                                         pki["client_cert"].read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{served.port}", creds, options=OWN_CONNECTIONS) as channel:
        assert check(channel) == SERVING   # ... and with one, health is there too


def test_health_listener_speaks_no_tls_bad_flow(served, pki) -> None:
    creds = grpc.ssl_channel_credentials(pki["ca"].read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{served.health_port}", creds, options=OWN_CONNECTIONS) as channel:
        assert code_of(check, channel) == grpc.StatusCode.UNAVAILABLE


def test_health_listener_stops_with_the_server(node: Node) -> None:
    server = create_server("127.0.0.1:0", node, None, max_workers=2, health_address="127.0.0.1:0")
    server.start()
    port = server.health_port
    node.shutdown()
    server.stop(None)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the health port still accepts connections"


def test_health_listener_is_off_unless_asked(node: Node) -> None:
    server = create_server("127.0.0.1:0", node, None, max_workers=2)
    server.start()
    try:
        assert server.health_port == 0 and server.health_address is None
    finally:
        node.shutdown()
        server.stop(None)
    assert parse_args(["--root", "/x"]).health_listen is None
    assert parse_args(["--root", "/x", "--health-listen", "0.0.0.0:7711"]).health_listen == "0.0.0.0:7711"


def test_health_listener_address_in_use_bad_flow(node: Node) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        server = create_server("127.0.0.1:0", node, None, max_workers=2, health_address=f"127.0.0.1:{busy}")
        with pytest.raises(OSError, match="health"):
            server.start()
        server.stop(None)
