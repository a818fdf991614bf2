"""mTLS over loopback with real gRPC servers and clients: identities, refusals, reload, TLS versions."""
from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import shutil
import socket
import ssl
import sys
import time
import warnings
from concurrent import futures
from pathlib import Path
from typing import cast

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rdax.service import identity as identity_module
from rdax.service.admin import main as admin_main
from rdax.service.admin import make_ca, make_client_cert, make_node_cert
from rdax.service.identity import identity_from_auth_context, identity_from_pem
from rdax.service.tls import ServerTls, TlsConfigError


def _import_client_tls():
    try:
        from rdax.client import tls
        return tls
    except ModuleNotFoundError as exc:
        if exc.name != "pyverbs":
            raise
    # rdax.client's __init__ imports the RDMA session, hence pyverbs, which a dev host lacks;
    # client/tls.py itself needs only grpc, so load that one file.
    package = importlib.util.find_spec("rdax.client")
    assert package is not None and package.submodule_search_locations is not None
    folder = package.submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("rdax.client.tls", os.path.join(folder, "tls.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


client_tls = _import_client_tls()

WHOAMI = "/rdax.test.Probe/WhoAmI"
# Each channel its own connections: otherwise gRPC's global subchannel pool could hand a new
# channel an old connection, and "new connections need the new CA" would test nothing.
OWN_CONNECTIONS = [("grpc.use_local_subchannel_pool", 1)]
VICTIM = "spiffe://rdax.test/client/victim"


class Probe:
    """A TLS server with health and one method that answers who it saw; `seen` records every call."""

    def __init__(self, tls: ServerTls) -> None:
        self.tls = tls
        self.seen: list[dict] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        health_servicer = health.HealthServicer()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(self._whoami)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("rdax.test.Probe",
                                                                                     {"WhoAmI": handler}),))
        self.port = self.server.add_secure_port("127.0.0.1:0", tls.credentials())
        self.server.start()

    def _whoami(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        # (The stubs say Mapping[str, bytes], with a FIXME: gRPC gives a list of bytes per key.)
        auth = cast("dict[str, list[bytes]]", context.auth_context())
        peer = identity_from_auth_context(auth)
        answer = {"name": peer.name if peer else None, "not_after": peer.not_after if peer else None,
                  "tls_version": b"".join(auth.get("ssl_tls_version", [])).decode()}
        self.seen.append(answer)
        return json.dumps(answer).encode()

    def stop(self) -> None:
        self.server.stop(None)


class Pki:
    """A CA folder with a node certificate for 127.0.0.1 (and node1.rdax.test)."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.ca, _ = make_ca(folder)
        self.node_cert, self.node_key = make_node_cert(folder, "node", ips=["127.0.0.1"], dns=["node1.rdax.test"])

    def client(self, identity: str = VICTIM, **kwargs):
        cert, key = make_client_cert(self.dir, identity, **kwargs)
        return client_tls.TlsFiles(str(self.ca), str(cert), str(key))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def probe(pki: Pki):
    server = Probe(ServerTls(str(pki.node_cert), str(pki.node_key), str(pki.ca)))
    yield server
    server.stop()


def whoami(port: int, tls, server_name: str | None = None) -> dict:
    with client_tls.secure_channel(f"127.0.0.1:{port}", tls, options=OWN_CONNECTIONS, server_name=server_name) as ch:
        return json.loads(ch.unary_unary(WHOAMI)(b"", timeout=5))


def whoami_fails(port: int, credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=OWN_CONNECTIONS) as ch:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(WHOAMI)
        with pytest.raises(grpc.RpcError) as caught:
            call(b"", timeout=5)
    return caught.value.code()


def raw_credentials(ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes() if key else None,
                                        cert.read_bytes() if cert else None)


# -- who is calling -------------------------------------------------------------------------------

def test_client_cert_uri_san_is_the_identity(pki: Pki, probe: Probe) -> None:
    tls = pki.client(VICTIM)
    answer = whoami(probe.port, tls)
    cert = x509.load_pem_x509_certificate(Path(tls.cert).read_bytes())
    assert answer["name"] == VICTIM
    assert answer["not_after"] == cert.not_valid_after_utc.timestamp()
    with client_tls.secure_channel(f"127.0.0.1:{probe.port}", tls, options=OWN_CONNECTIONS) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_dns_san_then_cn_fallbacks_over_the_wire(pki: Pki, probe: Probe) -> None:
    assert whoami(probe.port, pki.client("worker1.rdax.test"))["name"] == "worker1.rdax.test"
    # Not a host name: only the CN carries it.
    plain = pki.client("alice@lab", name="alice")
    assert not _sans(Path(plain.cert))
    assert whoami(probe.port, plain)["name"] == "alice@lab"
    assert len(probe.seen) == 2


def test_identity_prefers_uri_then_dns_then_cn() -> None:
    everything = _self_signed("cn-name", [x509.DNSName("dns.rdax.test"), x509.UniformResourceIdentifier("spiffe://x/y"),
                                          x509.DNSName("second.rdax.test")])
    assert identity_from_pem(everything).name == "spiffe://x/y"
    assert identity_from_pem(_self_signed("cn-name", [x509.DNSName("dns.rdax.test")])).name == "dns.rdax.test"
    assert identity_from_pem(_self_signed("cn-name", [])).name == "cn-name"


def test_identity_without_any_name_bad_flow() -> None:
    with pytest.raises(ValueError, match="no URI or DNS SAN and no CN"):
        identity_from_pem(_self_signed(None, []))


def test_auth_context_without_certificate_is_none_and_cache_is_bounded(monkeypatch) -> None:
    assert identity_from_auth_context({"transport_security_type": [b"insecure"]}) is None
    monkeypatch.setattr(identity_module, "CACHE_SIZE", 3)
    monkeypatch.setattr(identity_module, "_cache", {})
    pems = [_self_signed(f"c{i}", []) for i in range(5)]
    first = identity_from_auth_context({"x509_pem_cert": [pems[4]]})
    assert identity_from_auth_context({"x509_pem_cert": [pems[4]]}) is first     # a cache hit
    for pem in pems:
        identity_from_auth_context({"x509_pem_cert": [pem]})
    assert len(identity_module._cache) == 3
    assert [p.name for p in identity_module._cache.values()] == ["c2", "c3", "c4"]


# -- who is refused -------------------------------------------------------------------------------

def test_no_client_certificate_bad_flow(pki: Pki, probe: Probe) -> None:
    assert whoami_fails(probe.port, raw_credentials(pki.ca)) == grpc.StatusCode.UNAVAILABLE
    assert probe.seen == []


def test_client_cert_from_another_ca_bad_flow(pki: Pki, probe: Probe, tmp_path: Path) -> None:
    other = Pki(tmp_path / "other")
    stranger = other.client(VICTIM)
    # It trusts the right node CA, but its own certificate comes from elsewhere.
    credentials = raw_credentials(pki.ca, Path(stranger.cert), Path(stranger.key))
    assert whoami_fails(probe.port, credentials) == grpc.StatusCode.UNAVAILABLE
    assert probe.seen == []


def test_node_cert_from_another_ca_bad_flow(pki: Pki, probe: Probe, tmp_path: Path) -> None:
    other = Pki(tmp_path / "other")
    mine = pki.client(VICTIM)
    credentials = raw_credentials(other.ca, Path(mine.cert), Path(mine.key))
    assert whoami_fails(probe.port, credentials) == grpc.StatusCode.UNAVAILABLE
    assert probe.seen == []


def test_server_name_override_bad_flow(pki: Pki, probe: Probe) -> None:
    tls = pki.client(VICTIM)
    assert whoami(probe.port, tls, server_name="node1.rdax.test")["name"] == VICTIM
    with pytest.raises(grpc.RpcError) as caught:
        whoami(probe.port, tls, server_name="node2.rdax.test")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(probe.seen) == 1


def test_expired_client_cert_bad_flow(pki: Pki, probe: Probe) -> None:
    tls = pki.client("spiffe://rdax.test/client/brief", not_after=_now() + dt.timedelta(seconds=2))
    with client_tls.secure_channel(f"127.0.0.1:{probe.port}", tls, options=OWN_CONNECTIONS) as ch:
        answer = json.loads(ch.unary_unary(WHOAMI)(b"", timeout=5))
        time.sleep(max(0.0, answer["not_after"] + 1.1 - time.time()))
        # TLS checks expiry at the handshake only: a connection made before it keeps working,
        # which is why handlers get not_after and must check it themselves.
        again = json.loads(ch.unary_unary(WHOAMI)(b"", timeout=5))
    assert again["not_after"] < time.time()
    assert whoami_fails(probe.port, raw_credentials(pki.ca, Path(tls.cert), Path(tls.key))) == \
        grpc.StatusCode.UNAVAILABLE
    assert len(probe.seen) == 2


def test_seconds_flag_sets_not_after(pki: Pki, probe: Probe) -> None:
    before = time.time()
    assert admin_main(["certs", "client", "--dir", str(pki.dir), "--identity", VICTIM, "--name", "short",
                       "--seconds", "5"]) == 0
    tls = client_tls.TlsFiles(str(pki.ca), str(pki.dir / "short.pem"), str(pki.dir / "short.key"))
    answer = whoami(probe.port, tls)
    # X.509 times have whole seconds: the expiry is cut down to one.
    assert before + 4 <= answer["not_after"] <= time.time() + 5
    assert answer["name"] == VICTIM


# -- reload ---------------------------------------------------------------------------------------

def test_reload_switches_to_the_new_ca_for_new_connections(tmp_path: Path) -> None:
    old, new = Pki(tmp_path / "old"), Pki(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    _install(old, live)
    tls = ServerTls(str(live / "node.pem"), str(live / "node.key"), str(live / "client-ca.pem"))
    probe = Probe(tls)
    try:
        old_client, new_client = old.client(VICTIM), new.client("spiffe://rdax.test/client/new")
        with client_tls.secure_channel(f"127.0.0.1:{probe.port}", old_client, options=OWN_CONNECTIONS) as kept:
            assert json.loads(kept.unary_unary(WHOAMI)(b"", timeout=5))["name"] == VICTIM
            _install(new, live)
            with pytest.raises(grpc.RpcError):
                whoami(probe.port, new_client)      # files replaced, not yet reloaded
            tls.reload()
            assert whoami(probe.port, new_client)["name"] == "spiffe://rdax.test/client/new"
            with pytest.raises(grpc.RpcError) as caught:
                whoami(probe.port, old_client)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            # The connection made before the reload is not dropped.
            assert json.loads(kept.unary_unary(WHOAMI)(b"", timeout=5))["name"] == VICTIM
    finally:
        probe.stop()


def test_reload_with_broken_file_keeps_old_config_bad_flow(pki: Pki, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    _install(pki, live)
    tls = ServerTls(str(live / "node.pem"), str(live / "node.key"), str(live / "client-ca.pem"))
    probe = Probe(tls)
    try:
        client = pki.client(VICTIM)
        (live / "client-ca.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        with pytest.raises(TlsConfigError, match=r"--tls-client-ca .*client-ca.pem: not a PEM certificate"):
            tls.reload()
        assert whoami(probe.port, client)["name"] == VICTIM
        other = Pki(tmp_path / "other")
        shutil.copy(other.node_key, live / "node.key")      # a key that is not node.pem's
        (live / "client-ca.pem").write_bytes(pki.ca.read_bytes())
        with pytest.raises(TlsConfigError, match="do not match"):
            tls.reload()
        assert whoami(probe.port, client)["name"] == VICTIM
        assert len(probe.seen) == 2
    finally:
        probe.stop()


# -- check_files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("missing, flag", [("cert", "--tls-cert"), ("key", "--tls-key"),
                                           ("client_ca", "--tls-client-ca")])
def test_check_files_names_the_missing_file_bad_flow(pki: Pki, tmp_path: Path, missing: str, flag: str) -> None:
    paths = {"cert": str(pki.node_cert), "key": str(pki.node_key), "client_ca": str(pki.ca)}
    paths[missing] = str(tmp_path / "nowhere.pem")
    with pytest.raises(TlsConfigError) as caught:
        ServerTls(**paths).check_files()
    assert str(caught.value).startswith(f"{flag} {tmp_path / 'nowhere.pem'}: no such file")


def test_check_files_mismatched_key_bad_flow(pki: Pki, tmp_path: Path) -> None:
    other = Pki(tmp_path / "other")
    with pytest.raises(TlsConfigError) as caught:
        ServerTls(str(pki.node_cert), str(other.node_key), str(pki.ca)).check_files()
    message = str(caught.value)
    assert str(pki.node_cert) in message and str(other.node_key) in message and "do not match" in message


def test_check_files_unreadable_and_unparsable_bad_flow(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    with pytest.raises(TlsConfigError, match=r"^--tls-cert .*garbage.pem: not a PEM certificate"):
        ServerTls(str(garbage), str(pki.node_key), str(pki.ca)).check_files()
    with pytest.raises(TlsConfigError, match=r"^--tls-key .*garbage.pem: not a PEM private key"):
        ServerTls(str(pki.node_cert), str(garbage), str(pki.ca)).check_files()
    with pytest.raises(TlsConfigError, match=r"^--tls-client-ca .*: holds no CA certificate"):
        ServerTls(str(pki.node_cert), str(pki.node_key), str(pki.node_cert)).check_files()
    with pytest.raises(TlsConfigError, match=r"^--tls-key .*: is a directory"):
        ServerTls(str(pki.node_cert), str(tmp_path), str(pki.ca)).check_files()


def test_check_files_accepts_a_good_set(pki: Pki) -> None:
    files = ServerTls(str(pki.node_cert), str(pki.node_key), str(pki.ca)).check_files()
    assert files.cert == pki.node_cert.read_bytes()
    assert files.not_after > time.time() + 800 * 86400


# -- client side ----------------------------------------------------------------------------------

def test_tls_from_env(monkeypatch, tmp_path: Path) -> None:
    for name in ("RDAX_TLS_CA", "RDAX_TLS_CERT", "RDAX_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert client_tls.tls_from_env() is None
    monkeypatch.setenv("RDAX_TLS_CA", "/env/ca.pem")
    monkeypatch.setenv("RDAX_TLS_CERT", "/env/c.pem")
    monkeypatch.setenv("RDAX_TLS_KEY", "/env/c.key")
    assert client_tls.tls_from_env(cert="/flag/c.pem", key="/flag/c.key") == \
        client_tls.TlsFiles("/env/ca.pem", "/flag/c.pem", "/flag/c.key")


def test_tls_from_env_partial_bad_flow(monkeypatch) -> None:
    for name in ("RDAX_TLS_CA", "RDAX_TLS_CERT", "RDAX_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RDAX_TLS_CERT", "/env/c.pem")
    with pytest.raises(ValueError) as caught:
        client_tls.tls_from_env(ca="/ca.pem")
    assert str(caught.value) == "mTLS needs a CA, a certificate and a key; missing: --tls-key (or RDAX_TLS_KEY)"


def test_channel_credentials_missing_file_bad_flow(pki: Pki, tmp_path: Path) -> None:
    tls = pki.client(VICTIM)
    with pytest.raises(client_tls.TlsFileError, match=r"^--tls-key/RDAX_TLS_KEY .*nowhere.key: no such file"):
        client_tls.channel_credentials(client_tls.TlsFiles(tls.ca, tls.cert, str(tmp_path / "nowhere.key")))
    with pytest.raises(client_tls.TlsFileError, match=r"^--tls-ca/RDAX_TLS_CA .*: not a PEM certificate"):
        client_tls.channel_credentials(client_tls.TlsFiles(tls.key, tls.cert, tls.key))


# -- TLS versions ---------------------------------------------------------------------------------

def test_tls_versions_negotiated(pki: Pki, probe: Probe) -> None:
    """grpcio cannot set a minimum TLS version: gRPC core's default is 1.2 to 1.3 (see rdax.service.tls)."""
    tls = pki.client(VICTIM)
    assert whoami(probe.port, tls)["tls_version"] == "TLSv1.3"
    assert _handshake(probe.port, tls)[0] == "TLSv1.3"
    version, cipher = _handshake(probe.port, tls, maximum=ssl.TLSVersion.TLSv1_2)
    # Accepted, with forward secrecy and an AEAD.
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-ECDSA-") and ("GCM" in cipher or "CHACHA20" in cipher)


def test_tls_1_1_refused_bad_flow(pki: Pki, probe: Probe) -> None:
    if not ssl.HAS_TLSv1_1:
        pytest.skip("this Python's OpenSSL cannot offer TLS 1.1")
    with pytest.raises(ssl.SSLError) as caught:
        _handshake(probe.port, pki.client(VICTIM), maximum=ssl.TLSVersion.TLSv1_1)
    # The server hangs up; a client that could not even offer TLS 1.1 would say NO_PROTOCOLS_AVAILABLE.
    assert isinstance(caught.value, ssl.SSLEOFError) or "PROTOCOL_VERSION" in str(caught.value).upper()


# -- helpers --------------------------------------------------------------------------------------

def _handshake(port: int, tls, maximum: ssl.TLSVersion | None = None) -> tuple[str, str]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(tls.ca)
    context.load_cert_chain(tls.cert, tls.key)
    context.set_alpn_protocols(["h2"])
    if maximum is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.maximum_version = maximum
            if maximum < ssl.TLSVersion.TLSv1_2:
                context.minimum_version = maximum
                context.set_ciphers("DEFAULT:@SECLEVEL=0")  # else OpenSSL 3 itself refuses to offer TLS 1.1
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            version, cipher = conn.version(), conn.cipher()
            assert version is not None and cipher is not None   # (None only before the handshake)
            return version, cipher[0]


def _install(pki: Pki, live: Path) -> None:
    shutil.copy(pki.node_key, live / "node.key")
    shutil.copy(pki.node_cert, live / "node.pem")
    shutil.copy(pki.ca, live / "client-ca.pem")


def _sans(cert_path: Path) -> list:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _self_signed(common_name: str | None, sans: list[x509.GeneralName]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else
                     [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rdax tests")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(_now() - dt.timedelta(minutes=1)).not_valid_after(_now() + dt.timedelta(hours=1)))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
