"""Who is calling: the identity and expiry in a client's TLS certificate, as a gRPC handler sees them."""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

# gRPC's auth_context() key holding the peer's verified leaf certificate.
PEM_CERT_KEY = "x509_pem_cert"
CACHE_SIZE = 1024


@dataclass(frozen=True)
class PeerIdentity:
    name: str
    not_after: float | None     # unix seconds; None for anonymous


ANONYMOUS = PeerIdentity("anonymous", None)

# Every RPC asks; parsing a certificate costs ~50 us, a dict lookup nothing. Keyed by a digest so the cache
# holds no certificates, bounded so that many short-lived client certificates cannot grow it without end.
_cache: dict[bytes, PeerIdentity] = {}
_cache_lock = threading.Lock()


def identity_from_pem(pem: bytes) -> PeerIdentity:
    """The first URI SAN (spiffe://...), else the first DNS SAN, else the subject CN; and the expiry."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ValueError(f"the peer certificate is not a PEM X.509 certificate: {exc}") from None
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = None
    name: str | bytes | None = None   # (a CN's value is bytes only for a few OIDs, never COMMON_NAME)
    if sans is not None:
        for kind in (x509.UniformResourceIdentifier, x509.DNSName):
            found = sans.get_values_for_type(kind)
            if found:
                name = found[0]
                break
    if name is None:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = cns[0].value if cns else None
    if not name:
        # An empty name would match nothing and everything: refuse rather than guess.
        raise ValueError(f"the peer certificate (subject {cert.subject.rfc4514_string()!r}) has no URI or DNS SAN "
                         f"and no CN: re-issue it with `rdax-admin certs client --identity ...`")
    return PeerIdentity(str(name), cert.not_valid_after_utc.timestamp())


def identity_from_auth_context(auth: dict[str, list[bytes]]) -> PeerIdentity | None:
    """The identity in gRPC's context.auth_context(); None on a connection without a client certificate."""
    pems = auth.get(PEM_CERT_KEY)
    if not pems:
        return None
    pem = pems[0]
    digest = hashlib.sha256(pem).digest()
    with _cache_lock:
        identity = _cache.get(digest)
    if identity is not None:
        return identity
    identity = identity_from_pem(pem)
    with _cache_lock:
        if len(_cache) >= CACHE_SIZE:
            del _cache[next(iter(_cache))]     # the oldest entry
        _cache[digest] = identity
    return identity
