"""The `rdax` command line: put a local file into a remote file, get or cat one back, stat and list seals."""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Callable

from tqdm import tqdm

from rdax.rdma import Access, VerbsError

from .errors import RdaxClientError
from .session import PAGE, Readable, Session, connect
from .tls import tls_from_env


def session_for(args: argparse.Namespace) -> Session:
    """A session with --target over mTLS (the --tls-* flags, else RDAX_TLS_*), or plaintext with --insecure."""
    if args.insecure:
        return connect(args.target, device=args.device, insecure=True)
    return connect(args.target, device=args.device, tls=tls_from_env(args.tls_ca, args.tls_cert, args.tls_key))


def _aligned(n: int) -> int:
    return max(PAGE, (n + PAGE - 1) // PAGE * PAGE)


class _Hashing:
    """A reader that hashes what passes through it."""

    def __init__(self, f: Readable) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def readinto(self, view: memoryview) -> int | None:
        n = self.f.readinto(view)
        if n:
            self.sha.update(view[:n])
        return n


def cmd_put(args: argparse.Namespace) -> int:
    size = os.path.getsize(args.local)
    with session_for(args) as session, open(args.local, "rb", buffering=0) as src:
        # Only what a put needs: a policy may well not grant this identity READ or ATOMIC.
        with session.open(args.remote, _aligned(size), create=True, access=Access.WRITE | Access.FLUSH) as remote:
            reader = _Hashing(src)
            start = time.monotonic()
            with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, disable=args.quiet,
                      desc=f"put {args.remote}", file=sys.stderr) as bar:
                written = remote.write_from(reader, 0, size, progress=bar.update)
            remote.flush(0, _aligned(written))
            remote.size = written   # the file keeps the source's length, not the seal's whole pages
            elapsed = time.monotonic() - start
    rate = written / (1 << 20) / elapsed if elapsed else 0.0
    print(f"put: {written} bytes in {elapsed:.2f} s ({rate:.1f} MiB/s), flushed; sha256 {reader.sha.hexdigest()}")
    return 0


def _read_remote(session: Session, remote_path: str, sink: Callable[[bytes], object],
                 progress: Callable[[int], object] | None = None) -> tuple[int, str]:
    """Read a whole remote file over RDMA into `sink` (a write(bytes) callable); returns (bytes, sha256)."""
    size = session.stat_path(remote_path).file_size
    sha = hashlib.sha256()
    if size == 0:
        return 0, sha.hexdigest()
    with session.open(remote_path, _aligned(size), create=False, access=Access.READ) as remote:
        offset = 0
        while offset < size:
            n = min(session.chunk * 8, size - offset)
            data = remote.read(offset, n)
            sha.update(data)
            sink(data)
            offset += n
            if progress is not None:
                progress(n)
        remote.size = size   # leave it exactly as long as it was
    return size, sha.hexdigest()


def cmd_get(args: argparse.Namespace) -> int:
    with session_for(args) as session:
        size = session.stat_path(args.remote).file_size
        start = time.monotonic()
        with open(args.local, "wb") as out, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                                 disable=args.quiet, desc=f"get {args.remote}",
                                                 file=sys.stderr) as bar:
            got, digest = _read_remote(session, args.remote, out.write, bar.update)
        elapsed = time.monotonic() - start
    with open(args.local, "rb") as f:
        local = hashlib.file_digest(f, "sha256").hexdigest()
    if local != digest or os.path.getsize(args.local) != got:
        print(f"rdax: get {args.remote}: the local copy differs from what was read ({local} != {digest})",
              file=sys.stderr)
        return 1
    rate = got / (1 << 20) / elapsed if elapsed else 0.0
    print(f"get: {got} bytes in {elapsed:.2f} s ({rate:.1f} MiB/s); sha256 {digest}")
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    with session_for(args) as session:
        _read_remote(session, args.remote, sys.stdout.buffer.write)
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    with session_for(args) as session:
        for seal in session.list():
            if args.seal in (seal.seal_id, seal.path):
                print(seal)
                return 0
    print(f"rdax: no seal {args.seal!r}", file=sys.stderr)
    return 1


def cmd_ls(args: argparse.Namespace) -> int:
    with session_for(args) as session:
        for seal in session.list():
            print(f"{seal.seal_id}  {seal.state:8} epoch={seal.epoch:<4} len={seal.length:<12} "
                  f"grants={len(seal.grant_ids):<3} {seal.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rdax", description=__doc__)
    parser.add_argument("--target", default=os.environ.get("RDAX_TARGET", "127.0.0.1:7710"),
                        help="node address host:port (env RDAX_TARGET)")
    parser.add_argument("--device", default=os.environ.get("RDAX_DEVICE"),
                        help="local RDMA device (default: the one in this network namespace)")
    parser.add_argument("--tls-ca", help="CA that signed the node's certificate (env RDAX_TLS_CA)")
    parser.add_argument("--tls-cert", help="this client's certificate (env RDAX_TLS_CERT)")
    parser.add_argument("--tls-key", help="this client's key (env RDAX_TLS_KEY)")
    parser.add_argument("--insecure", action="store_true", help="plaintext, for a node started with --insecure")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("put", help="write a local file into a remote sealed file over RDMA")
    p.add_argument("local")
    p.add_argument("remote", help="path beneath the node's export root")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_put)
    p = sub.add_parser("get", help="read a remote file over RDMA into a local file (sha256 checked)")
    p.add_argument("remote", help="path beneath the node's export root")
    p.add_argument("local")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_get)
    p = sub.add_parser("cat", help="read a remote file over RDMA to stdout")
    p.add_argument("remote")
    p.set_defaults(func=cmd_cat)
    p = sub.add_parser("stat", help="describe one seal (by id or path)")
    p.add_argument("seal")
    p.set_defaults(func=cmd_stat)
    p = sub.add_parser("ls", help="list the node's seals")
    p.set_defaults(func=cmd_ls)
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func
    try:
        return command(args)
    except (RdaxClientError, VerbsError, OSError, ValueError) as exc:
        print(f"rdax: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
