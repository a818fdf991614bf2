"""Client mTLS: which CA, certificate and key to use (flags or RDAX_TLS_*), and a verified secure channel."""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

# Only grpc and the standard library here: this module must not pull in pyverbs or rdax.service.

ENV_CA, ENV_CERT, ENV_KEY = "RDAX_TLS_CA", "RDAX_TLS_CERT", "RDAX_TLS_KEY"
_SOURCES = {"ca": ("--tls-ca", ENV_CA), "cert": ("--tls-cert", ENV_CERT), "key": ("--tls-key", ENV_KEY)}


class TlsFileError(OSError):
    """A TLS file cannot be used; the message names it, where it was set, and what to do."""


@dataclass(frozen=True)
class TlsFiles:
    ca: str     # the CA that signed the node's certificate
    cert: str   # this client's certificate
    key: str    # and its key


def tls_from_env(ca: str | None = None, cert: str | None = None, key: str | None = None) -> TlsFiles | None:
    """TLS files from the arguments, else from RDAX_TLS_CA/CERT/KEY; None if none is set. All three or none."""
    given = {"ca": ca, "cert": cert, "key": key}
    for field, value in given.items():
        if not value:
            given[field] = os.environ.get(_SOURCES[field][1]) or None
    missing = [field for field, value in given.items() if value is None]
    if len(missing) == len(given):
        return None
    if missing:
        # Half a TLS setup must not quietly become plaintext.
        names = ", ".join(f"{_SOURCES[f][0]} (or {_SOURCES[f][1]})" for f in missing)
        raise ValueError(f"mTLS needs a CA, a certificate and a key; missing: {names}")
    return TlsFiles(**{field: value for field, value in given.items() if value is not None})   # (all three)


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """Credentials that verify the node against tls.ca and present tls.cert/tls.key."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read("ca", tls.ca, b"-----BEGIN CERTIFICATE-----"),
        private_key=_read("key", tls.key, b"PRIVATE KEY-----"),
        certificate_chain=_read("cert", tls.cert, b"-----BEGIN CERTIFICATE-----"),
    )


def secure_channel(target: str, tls: TlsFiles, options: Iterable[tuple[str, str | int]] = (),
                   server_name: str | None = None) -> grpc.Channel:
    """A channel to `target` over mTLS. The node's certificate must name the host or IP in `target`, or
    `server_name` when given (a node reached through another name); verification is never turned off."""
    options = list(options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, channel_credentials(tls), options=options)


def _read(field: str, path: str, marker: bytes) -> bytes:
    flag, env = _SOURCES[field]
    where = f"{flag}/{env} {path}"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TlsFileError(f"{where}: no such file (rdax-admin certs makes it; check the path)") from None
    except OSError as exc:
        raise TlsFileError(f"{where}: cannot read it ({exc.strerror})") from None
    # gRPC would only say "handshake failed" at the first call; name the wrong file now.
    if marker not in data:
        kind = "private key" if field == "key" else "certificate"
        raise TlsFileError(f"{where}: not a PEM {kind} (expected a '-----BEGIN ...' block)")
    if field == "key" and (b"ENCRYPTED PRIVATE KEY" in data or b"Proc-Type: 4,ENCRYPTED" in data):
        raise TlsFileError(f"{where}: the key is encrypted; gRPC needs it unencrypted (keep it mode 0600)")
    return data
