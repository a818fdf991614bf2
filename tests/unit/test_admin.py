"""`rdax-admin certs`: the files it writes, what the certificates say, and what it refuses."""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rdax.service.admin import AdminError, main, make_ca, make_client_cert, make_node_cert


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ext(cert: x509.Certificate, kind):
    return cert.extensions.get_extension_for_class(kind).value


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_certs_ca_writes_a_self_signed_ca_with_a_private_key(tmp_path: Path, capsys) -> None:
    old_umask = os.umask(0)     # the key must be 0600 whatever the umask
    try:
        assert main(["certs", "ca", "--dir", str(tmp_path / "pki"), "--name", "lab CA", "--days", "10"]) == 0
    finally:
        os.umask(old_umask)
    pem, key = tmp_path / "pki" / "ca.pem", tmp_path / "pki" / "ca.key"
    assert capsys.readouterr().out.split() == [str(pem), str(key)]
    assert mode(key) == 0o600
    assert mode(pem) == 0o644
    ca = load(pem)
    ca.verify_directly_issued_by(ca)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "lab CA"
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    assert ext(ca, x509.BasicConstraints).ca is True
    assert ext(ca, x509.KeyUsage).key_cert_sign is True
    assert ext(ca, x509.AuthorityKeyIdentifier).key_identifier == ext(ca, x509.SubjectKeyIdentifier).digest
    # Valid from five minutes ago (clock skew) for the days asked.
    assert abs(ca.not_valid_before_utc - (now() - dt.timedelta(minutes=5))) < dt.timedelta(seconds=30)
    assert abs(ca.not_valid_after_utc - (now() + dt.timedelta(days=10))) < dt.timedelta(seconds=30)
    assert list(tmp_path.joinpath("pki").iterdir()) and not any(
        p.name.startswith(".") for p in tmp_path.joinpath("pki").iterdir())     # no temporary files left


def test_certs_ca_refuses_to_overwrite_without_force_bad_flow(tmp_path: Path, capsys) -> None:
    assert main(["certs", "ca", "--dir", str(tmp_path)]) == 0
    first = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca.key").read_bytes()
    capsys.readouterr()
    assert main(["certs", "ca", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rdax-admin: {tmp_path / 'ca.pem'} and {tmp_path / 'ca.key'} already exist")
    assert "--force" in err
    assert ((tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca.key").read_bytes()) == first
    assert main(["certs", "ca", "--dir", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "ca.key").read_bytes() != first[1]
    assert mode(tmp_path / "ca.key") == 0o600


def test_certs_node_is_a_server_cert_for_its_addresses(tmp_path: Path) -> None:
    main(["certs", "ca", "--dir", str(tmp_path)])
    assert main(["certs", "node", "--dir", str(tmp_path), "--name", "node1", "--ip", "10.77.0.1", "127.0.0.1",
                 "--dns", "node1.rdax.test"]) == 0
    ca, node = load(tmp_path / "ca.pem"), load(tmp_path / "node1.pem")
    node.verify_directly_issued_by(ca)
    assert mode(tmp_path / "node1.key") == 0o600
    sans = ext(node, x509.SubjectAlternativeName)
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.77.0.1"),
                                                        ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["node1.rdax.test"]
    assert list(ext(node, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ext(node, x509.BasicConstraints).ca is False
    assert ext(node, x509.AuthorityKeyIdentifier).key_identifier == ext(ca, x509.SubjectKeyIdentifier).digest
    assert abs(node.not_valid_after_utc - (now() + dt.timedelta(days=825))) < dt.timedelta(seconds=30)
    assert node.serial_number != ca.serial_number


def test_certs_node_without_address_bad_flow(tmp_path: Path, capsys) -> None:
    main(["certs", "ca", "--dir", str(tmp_path)])
    capsys.readouterr()
    assert main(["certs", "node", "--dir", str(tmp_path), "--name", "node1"]) == 2
    assert "at least one --ip or --dns" in capsys.readouterr().err
    assert main(["certs", "node", "--dir", str(tmp_path), "--name", "node1", "--ip", "node1.rdax.test"]) == 2
    assert "--ip 'node1.rdax.test' is not an IP address (for a host name use --dns)" in capsys.readouterr().err
    assert not (tmp_path / "node1.pem").exists() and not (tmp_path / "node1.key").exists()


def test_certs_without_ca_bad_flow(tmp_path: Path, capsys) -> None:
    assert main(["certs", "client", "--dir", str(tmp_path), "--identity", "alice"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'ca.pem'} is missing: make the CA first with `rdax-admin certs ca --dir {tmp_path}`" in err
    assert main(["certs", "node", "--dir", str(tmp_path / "nowhere"), "--name", "n", "--ip", "10.77.0.1"]) == 2
    assert "does not exist: make the CA in it first" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def test_names_that_would_overwrite_the_ca_bad_flow(tmp_path: Path) -> None:
    make_ca(tmp_path)
    ca = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(AdminError, match="would overwrite the CA"):
        make_node_cert(tmp_path, "ca", ips=["127.0.0.1"])
    with pytest.raises(AdminError, match="would overwrite the CA"):
        make_client_cert(tmp_path, "ca")
    with pytest.raises(AdminError, match="cannot be a file name"):
        make_node_cert(tmp_path, "../escape", ips=["127.0.0.1"])
    assert (tmp_path / "ca.pem").read_bytes() == ca


def test_certs_client_uri_identity(tmp_path: Path) -> None:
    make_ca(tmp_path)
    identity = "spiffe://rdax.test/client/victim"
    assert main(["certs", "client", "--dir", str(tmp_path), "--identity", identity]) == 0
    cert = load(tmp_path / "spiffe_rdax.test_client_victim.pem")
    assert mode(tmp_path / "spiffe_rdax.test_client_victim.key") == 0o600
    sans = ext(cert, x509.SubjectAlternativeName)
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [identity]
    assert sans.get_values_for_type(x509.DNSName) == []
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert abs(cert.not_valid_after_utc - (now() + dt.timedelta(days=30))) < dt.timedelta(seconds=30)


def test_client_identity_kinds(tmp_path: Path) -> None:
    make_ca(tmp_path)
    long_uri = "spiffe://rdax.test/" + "x" * 80
    cert = load(make_client_cert(tmp_path, long_uri, name="long")[0])
    assert ext(cert, x509.SubjectAlternativeName).get_values_for_type(x509.UniformResourceIdentifier) == [long_uri]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == long_uri[:64]
    host = load(make_client_cert(tmp_path, "worker1.rdax.test")[0])
    assert ext(host, x509.SubjectAlternativeName).get_values_for_type(x509.DNSName) == ["worker1.rdax.test"]
    plain_path, _ = make_client_cert(tmp_path, "alice smith")
    assert plain_path.name == "alice_smith.pem"
    with pytest.raises(x509.ExtensionNotFound):
        ext(load(plain_path), x509.SubjectAlternativeName)


def test_long_plain_identity_bad_flow(tmp_path: Path) -> None:
    make_ca(tmp_path)
    with pytest.raises(AdminError, match="holds 64: shorten it or use a URI"):
        make_client_cert(tmp_path, "a user " * 10)


def test_certs_client_hours_and_seconds(tmp_path: Path) -> None:
    make_ca(tmp_path)
    assert main(["certs", "client", "--dir", str(tmp_path), "--identity", "bob", "--hours", "2"]) == 0
    cert = load(tmp_path / "bob.pem")
    assert abs(cert.not_valid_after_utc - (now() + dt.timedelta(hours=2))) < dt.timedelta(seconds=30)
    assert main(["certs", "client", "--dir", str(tmp_path), "--identity", "bob", "--seconds", "5"]) == 0
    cert = load(tmp_path / "bob.pem")
    assert dt.timedelta(seconds=3) <= cert.not_valid_after_utc - now() <= dt.timedelta(seconds=5)


def test_certs_client_lifetime_flags_exclusive_bad_flow(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["certs", "client", "--dir", str(tmp_path), "--identity", "bob", "--days", "1", "--seconds", "5"])
    assert caught.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    make_ca(tmp_path)
    with pytest.raises(AdminError, match="not in the future"):
        make_client_cert(tmp_path, "bob", not_after=now() - dt.timedelta(seconds=1))
