"""rdax-admin: make the CA, node and client certificates of an mTLS deployment, with no openssl needed."""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_STEM = "ca"
DEFAULT_CA_NAME = "rdax CA"
CA_DAYS = 3650
NODE_DAYS = 825     # the longest lifetime browsers ever accepted for a server certificate
CLIENT_DAYS = 30
# Clocks of the node and its clients disagree a little; a certificate made
# just now must not be "not yet valid" on a machine that is behind.
CLOCK_SKEW = dt.timedelta(minutes=5)
CN_MAX = 64         # ub-common-name (RFC 5280)

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_SAFE_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")

EXIT_ERROR = 2

# The CA keys that sign with SHA-256: the EC key `rdax-admin certs ca` makes, or the RSA/DSA key of a CA made elsewhere.
CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | dsa.DSAPrivateKey
_CA_KEY_TYPES = (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, dsa.DSAPrivateKey)
_CA_PUBLIC_KEY_TYPES = (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, dsa.DSAPublicKey)


class AdminError(Exception):
    """A certificate cannot be made; the message says why and what to do."""


def make_ca(dir: str | os.PathLike[str], name: str = DEFAULT_CA_NAME, days: int = CA_DAYS,
            force: bool = False) -> tuple[Path, Path]:
    """Write DIR/ca.pem and DIR/ca.key (ECDSA P-256, self-signed); refuse to replace a CA unless `force`."""
    folder = _folder(dir, create=True)
    cert_path, key_path = folder / f"{CA_STEM}.pem", folder / f"{CA_STEM}.key"
    existing = [str(p) for p in (cert_path, key_path) if p.exists()]
    if existing and not force:
        # Replacing the CA silently would lock out every node and client it signed.
        raise AdminError(f"{' and '.join(existing)} already exist: a new CA invalidates every certificate the old "
                         f"one signed; pass --force to replace it anyway, or choose another --dir")
    if not name.strip():
        raise AdminError("--name is empty: give the CA a name, e.g. --name 'rdax CA'")
    _check_days(days)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _cn(name))])
    not_before = _now() - CLOCK_SKEW
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + CLOCK_SKEW + dt.timedelta(days=days))
        # path_length 0: this CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def make_node_cert(dir: str | os.PathLike[str], name: str, ips: Sequence[str] = (), dns: Sequence[str] = (),
                   days: int = NODE_DAYS) -> tuple[Path, Path]:
    """Write DIR/NAME.pem and DIR/NAME.key: a server certificate for `ips`/`dns`, signed by DIR/ca.pem."""
    folder = _folder(dir)
    _check_stem(name, "--name")
    if not ips and not dns:
        raise AdminError("a node certificate needs at least one --ip or --dns: clients check the address they "
                         "dial against it (e.g. --ip 10.77.0.1)")
    sans: list[x509.GeneralName] = []
    for ip in ips:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise AdminError(f"--ip {ip!r} is not an IP address (for a host name use --dns)") from None
    for host in dns:
        if not _is_hostname(host):
            raise AdminError(f"--dns {host!r} is not a host name (letters, digits, '-' and '.'; "
                             "for an address use --ip)")
        sans.append(x509.DNSName(host))
    _check_days(days)
    not_before = _now() - CLOCK_SKEW
    return _issue(folder, name, name, sans, ExtendedKeyUsageOID.SERVER_AUTH,
                  not_before, not_before + CLOCK_SKEW + dt.timedelta(days=days))


def make_client_cert(dir: str | os.PathLike[str], identity: str, name: str | None = None,
                     not_after: dt.datetime | None = None, days: int = CLIENT_DAYS) -> tuple[Path, Path]:
    """Write DIR/NAME.pem and DIR/NAME.key: a client certificate for `identity`, signed by DIR/ca.pem.

    A URI identity (one with "://", e.g. spiffe://rdax.test/client/a) goes in as a URI SAN, a host name as a
    DNS SAN; it is always the subject CN too. `not_after` (timezone-aware) overrides `days`.
    """
    folder = _folder(dir)
    identity = identity.strip()
    if not identity:
        raise AdminError("--identity is empty: give the name the node should know this client by")
    sans: list[x509.GeneralName] = []
    if "://" in identity:
        if not identity.isascii() or any(c.isspace() for c in identity):
            raise AdminError(f"--identity {identity!r}: a URI may hold no spaces or non-ASCII characters")
        sans.append(x509.UniformResourceIdentifier(identity))
    elif _is_hostname(identity):
        sans.append(x509.DNSName(identity))
    elif len(identity) > CN_MAX:
        # Only the CN would carry it, cut to 64 characters: two clients could end up with the same identity.
        raise AdminError(f"--identity is {len(identity)} characters; one that is neither a URI nor a host name "
                         f"is stored in the subject CN only, which holds {CN_MAX}: shorten it or use a URI")
    stem = name if name is not None else _stem_for(identity)
    _check_stem(stem, "--name")
    not_before = _now() - CLOCK_SKEW
    if not_after is None:
        _check_days(days)
        not_after = not_before + CLOCK_SKEW + dt.timedelta(days=days)
    elif not_after.tzinfo is None:
        raise AdminError("not_after must be timezone-aware (e.g. datetime.now(timezone.utc) + timedelta(hours=1))")
    elif not_after <= _now():
        raise AdminError(f"not_after {not_after.isoformat()} is not in the future: "
                         "the certificate would be born expired")
    return _issue(folder, stem, identity, sans, ExtendedKeyUsageOID.CLIENT_AUTH, not_before, not_after)


def _issue(folder: Path, stem: str, common_name: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier,
           not_before: dt.datetime, not_after: dt.datetime) -> tuple[Path, Path]:
    ca_cert, ca_key = _load_ca(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _cn(common_name))]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca_cert, ca_key), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    # Key first: a node that reloads between the two writes sees a pair that does not match, and keeps its old one.
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def _load_ca(folder: Path) -> tuple[x509.Certificate, CaKey]:
    cert_path, key_path = folder / f"{CA_STEM}.pem", folder / f"{CA_STEM}.key"
    for path in (cert_path, key_path):
        if not path.exists():
            raise AdminError(f"{path} is missing: make the CA first with `rdax-admin certs ca --dir {folder}`")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise AdminError(f"cannot read the CA in {folder} ({exc}): is {cert_path} a PEM certificate and "
                         f"{key_path} its unencrypted key?") from None
    if not isinstance(key, _CA_KEY_TYPES):   # (pyca would refuse to sign with it, or with SHA-256)
        raise AdminError(f"{key_path} is a {type(key).__name__}: a CA key must be EC (as `rdax-admin certs ca` "
                         "makes), RSA or DSA")
    ca_public = cert.public_key()
    if not isinstance(ca_public, _CA_PUBLIC_KEY_TYPES) or \
            ca_public.public_numbers() != key.public_key().public_numbers():
        raise AdminError(f"{key_path} is not the key of {cert_path}: restore the pair, or make a new CA with --force")
    return cert, key


def _authority_key_id(ca_cert: x509.Certificate, ca_key: CaKey) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        # The certificate's own public key: _load_ca checked that the two match.
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    _write_atomic(path, data, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # A node re-reading its files on SIGHUP never sees a half-written one; the key is 0600 from its first byte.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)     # O_CREAT's mode is cut by the umask, and a stale tmp file keeps its old one
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _folder(dir: str | os.PathLike[str], create: bool = False) -> Path:
    folder = Path(dir)
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AdminError(f"cannot use --dir {folder}: {exc.strerror}") from None
    elif not folder.exists():
        raise AdminError(f"--dir {folder} does not exist: make the CA in it first with "
                         f"`rdax-admin certs ca --dir {folder}`")
    if not folder.is_dir():
        raise AdminError(f"--dir {folder} is not a directory")
    return folder


def _check_stem(stem: str, flag: str) -> None:
    if not _SAFE_STEM.match(stem):
        raise AdminError(f"{flag} {stem!r} cannot be a file name: use letters, digits, '.', '_' and '-' only")
    if stem == CA_STEM:
        raise AdminError(f"{flag} {stem!r} would overwrite the CA's own files: choose another name")


def _check_days(days: int) -> None:
    if days <= 0:
        raise AdminError(f"--days {days}: a certificate must be valid for at least one day")


def _is_hostname(name: str) -> bool:
    name = name[:-1] if name.endswith(".") else name
    return 0 < len(name) <= 253 and all(_HOST_LABEL.match(label) for label in name.split("."))


def _stem_for(identity: str) -> str:
    """A file name for an identity: spiffe://rdax.test/client/a -> spiffe_rdax.test_client_a."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", identity).strip("._-")
    return stem[:100] or "client"


def _cn(text: str) -> str:
    return text[:CN_MAX]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rdax-admin", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    certs = commands.add_parser("certs", help="make mTLS certificates (CA, node, client)",
                                description="Make the certificates of an mTLS deployment: first the CA, then one "
                                            "server certificate per node and one client certificate per client.")
    kinds = certs.add_subparsers(dest="kind", required=True, metavar="KIND")

    ca = kinds.add_parser("ca", help="a new CA: DIR/ca.pem and DIR/ca.key")
    ca.add_argument("--dir", required=True, help="folder of the certificates (made if missing)")
    ca.add_argument("--name", default=DEFAULT_CA_NAME, help="the CA's subject CN (default %(default)r)")
    ca.add_argument("--days", type=int, default=CA_DAYS, help="lifetime (default %(default)s)")
    ca.add_argument("--force", action="store_true", help="replace an existing CA (every certificate it signed "
                                                         "stops working)")

    node = kinds.add_parser("node", help="a node's server certificate: DIR/NAME.pem and DIR/NAME.key")
    node.add_argument("--dir", required=True, help="folder holding ca.pem and ca.key")
    node.add_argument("--name", required=True, help="file stem and subject CN, e.g. node1")
    node.add_argument("--ip", nargs="+", action="extend", default=[], metavar="IP",
                      help="an address clients dial (repeatable), e.g. 10.77.0.1")
    node.add_argument("--dns", nargs="+", action="extend", default=[], metavar="DNS",
                      help="a host name clients dial (repeatable)")
    node.add_argument("--days", type=int, default=NODE_DAYS, help="lifetime (default %(default)s)")

    client = kinds.add_parser("client", help="a client certificate: DIR/NAME.pem and DIR/NAME.key")
    client.add_argument("--dir", required=True, help="folder holding ca.pem and ca.key")
    client.add_argument("--identity", required=True,
                        help="who the node sees: a URI (spiffe://rdax.test/client/a), a host name, or a plain name")
    client.add_argument("--name", help="file stem (default: the identity made file-name safe)")
    lifetime = client.add_mutually_exclusive_group()
    lifetime.add_argument("--days", type=int, default=CLIENT_DAYS, help="lifetime (default %(default)s)")
    lifetime.add_argument("--hours", type=float, help="lifetime in hours, for short-lived certificates")
    lifetime.add_argument("--seconds", type=float, help="lifetime in seconds (for testing expiry)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        written = run(args)
    except AdminError as exc:
        print(f"rdax-admin: {exc}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    for path in written:
        print(path)
    return 0


def run(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.kind == "ca":
        return make_ca(args.dir, name=args.name, days=args.days, force=args.force)
    if args.kind == "node":
        return make_node_cert(args.dir, args.name, ips=args.ip, dns=args.dns, days=args.days)
    lifetime = None
    if args.hours is not None:
        lifetime = dt.timedelta(hours=args.hours)
    elif args.seconds is not None:
        lifetime = dt.timedelta(seconds=args.seconds)
    if lifetime is not None and lifetime <= dt.timedelta(0):
        raise AdminError("--hours/--seconds must be positive")
    not_after = _now() + lifetime if lifetime is not None else None
    return make_client_cert(args.dir, args.identity, name=args.name, not_after=not_after, days=args.days)


if __name__ == "__main__":
    sys.exit(main())
