"""The node's mTLS server credentials; reload() (on SIGHUP) re-reads the files without dropping connections."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

# TLS versions. grpcio's Python API has no way to set them: ssl_server_credentials and
# dynamic_ssl_server_credentials build grpc_ssl_server_credentials_options with only a
# cert config (or fetcher) and a client-certificate policy, and gRPC core then uses its
# defaults, min TLS 1.2 / max TLS 1.3 (grpc_ssl_server_config in
# src/core/credentials/transport/ssl/ssl_security_connector.h). Measured with grpcio
# 1.85.1 (tests/unit/test_tls.py pins it): a gRPC client negotiates TLS 1.3 (X25519MLKEM768),
# a client capped at TLS 1.2 is accepted (ECDHE-ECDSA-AES256-GCM-SHA384), TLS 1.1 is refused.
# TLS 1.2 with ECDHE + AEAD and a verified client certificate is still sound. A node that
# must refuse it needs a proxy in front or a grpcio that exposes the version; the env var
# GRPC_SSL_CIPHER_SUITES=ECDHE-RSA-AES128-GCM-SHA256 with an ECDSA node certificate does leave
# TLS 1.2 clients no shared cipher (TLS 1.3 suites ignore it), but it is process-wide and
# silently stops refusing the day the node certificate is RSA, so rdax does not use it.


class TlsConfigError(Exception):
    """The TLS files cannot be used; the message names the flag, the file and what to do."""


@dataclass(frozen=True)
class _Files:
    cert: bytes
    key: bytes
    client_ca: bytes
    not_after: float    # of the node certificate, unix seconds


class ServerTls:
    """The node's certificate, key and client CA: check them, serve them, reload them."""

    def __init__(self, cert: str, key: str, client_ca: str) -> None:
        self.cert, self.key, self.client_ca = str(cert), str(key), str(client_ca)
        self._lock = threading.Lock()
        self._config: grpc.ServerCertificateConfiguration | None = None
        self._generation = 0
        self.not_after: float | None = None

    def check_files(self) -> _Files:
        """Read and validate the three files; raise TlsConfigError saying what is wrong."""
        cert_pem = _read("--tls-cert", self.cert)
        key_pem = _read("--tls-key", self.key)
        ca_pem = _read("--tls-client-ca", self.client_ca)
        chain = _load_certs("--tls-cert", self.cert, cert_pem)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            raise TlsConfigError(f"--tls-key {self.key}: the key is encrypted; gRPC needs it unencrypted "
                                 f"(protect it with mode 0600 instead)") from None
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise TlsConfigError(f"--tls-key {self.key}: not a PEM private key ({_first_line(exc)})") from None
        if _spki(chain[0].public_key()) != _spki(key.public_key()):
            raise TlsConfigError(f"--tls-cert {self.cert} and --tls-key {self.key} do not match: the key is not the "
                                 f"certificate's; give the key made with it (rdax-admin writes NAME.pem + NAME.key)")
        not_after = chain[0].not_valid_after_utc.timestamp()
        if not_after <= time.time():
            raise TlsConfigError(f"--tls-cert {self.cert} expired on {chain[0].not_valid_after_utc:%Y-%m-%d %H:%M} "
                                 f"UTC: re-issue it with `rdax-admin certs node`")
        cas = _load_certs("--tls-client-ca", self.client_ca, ca_pem)
        if all(_is_leaf(ca) for ca in cas):
            raise TlsConfigError(f"--tls-client-ca {self.client_ca}: holds no CA certificate (did you give a node or "
                                 f"client certificate?): give the ca.pem that signed the clients' certificates")
        return _Files(cert_pem, key_pem, ca_pem, not_after)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that require a client certificate signed by the client CA."""
        with self._lock:
            if self._config is None:
                self._install(self.check_files())
            initial, handed = self._config, self._generation
        assert initial is not None   # _install set it

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # gRPC calls this with the GIL held before every handshake, failed ones included: no file I/O here.
            nonlocal handed
            with self._lock:
                if handed == self._generation:
                    return None
                handed = self._generation
                return self._config

        # Each credentials() has its own `handed`, so a node listening on two ports gets a reload on both.
        # Ignored for mypy: the fetcher returns None for "no change" (grpc's docstring); the stubs leave that out.
        return grpc.dynamic_ssl_server_credentials(initial, fetch,  # type: ignore[arg-type]
                                                   require_client_authentication=True)

    def reload(self) -> None:
        """Re-read the files for the next handshakes; if they are bad, keep the old ones and raise TlsConfigError."""
        # Validate here: gRPC core logs a config it cannot load and keeps the old one, but never tells Python.
        files = self.check_files()
        with self._lock:
            self._install(files)

    def _install(self, files: _Files) -> None:
        self._config = grpc.ssl_server_certificate_configuration([(files.key, files.cert)],
                                                                 root_certificates=files.client_ca)
        self._generation += 1
        self.not_after = files.not_after


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TlsConfigError(f"{flag} {path}: no such file (make it with `rdax-admin certs`, "
                             "or fix the path)") from None
    except IsADirectoryError:
        raise TlsConfigError(f"{flag} {path}: is a directory; give the PEM file in it") from None
    except OSError as exc:
        raise TlsConfigError(f"{flag} {path}: cannot read it ({exc.strerror}); the node's user needs read "
                             f"access") from None


def _load_certs(flag: str, path: str, pem: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise TlsConfigError(f"{flag} {path}: not a PEM certificate ({_first_line(exc)})") from None
    return certs


def _is_leaf(cert: x509.Certificate) -> bool:
    try:
        return not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False    # old v1 CAs carry no extensions: give them the benefit of the doubt


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
