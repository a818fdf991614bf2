"""rdax-server: run a storage node — check the data path with a canary, then serve the export root over gRPC."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from .revocation import install_sigio_guard

EXIT_REFUSED = 2   # bad configuration, no device, or a data path that loses writes

log = logging.getLogger("rdax.service")


class Refused(Exception):
    """The node will not start; the message says why and what to do."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rdax-server", description=__doc__)
    parser.add_argument("--root", required=True, help="export root: files beneath it can be sealed (a DAX mount)")
    parser.add_argument("--listen", default="127.0.0.1:7710", help="HOST:PORT for gRPC (default %(default)s)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--device", help="RDMA device name, e.g. rxe0")
    where.add_argument("--ip", help="pick the RDMA device that has this IPv4 address")
    parser.add_argument("--mtu", type=int, default=4096, help="RDMA path MTU (default %(default)s; rxe ODP needs 4096)")
    parser.add_argument("--lease-seconds", type=int, default=30, help="session lease (default %(default)s)")
    parser.add_argument("--grant-ttl-seconds", type=float, default=None,
                        help="revoke grants this long after granting (default: they end with their session)")
    parser.add_argument("--max-grants-per-session", type=int, default=1024, help="(default %(default)s)")
    parser.add_argument("--log-level", default="INFO", help="(default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # First of all, before any thread exists: a lease break's SIGIO kills the process by default.
    install_sigio_guard()
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except Refused as exc:
        print(f"rdax-server: {exc}", file=sys.stderr, flush=True)
        return EXIT_REFUSED


def run(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.root):
        raise Refused(f"--root {args.root!r} is not a directory")
    fabric = open_fabric(args)
    canary = check_data_path(fabric, args)
    # Imported late: grpc takes seconds to import in the lab, and a refused start needs none of it.
    from .node import Node
    from .server import serve

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    node = Node(args.root, fabric, lease_seconds=args.lease_seconds, grant_ttl_seconds=args.grant_ttl_seconds,
                max_grants_per_session=args.max_grants_per_session, write_alignment=canary.write_alignment)
    try:
        serve(node, args.listen, stop, on_ready=lambda where: print(f"rdax-server listening on {where}", flush=True))
    except OSError as exc:
        node.shutdown()
        raise Refused(str(exc)) from exc
    log.info("stopped")
    return 0


def open_fabric(args: argparse.Namespace):  # -> RdmaFabric; untyped so that --help needs no pyverbs
    try:
        from .fabric import RdmaFabric
        from rdax.rdma import VerbsError
    except ImportError as exc:
        raise Refused(f"RDMA support is missing ({exc}): rdax-server needs pyverbs (Debian 13's python3-pyverbs)") from exc
    try:
        return RdmaFabric(device=args.device, ip=args.ip, mtu=args.mtu)
    except VerbsError as exc:
        raise Refused(f"no usable RDMA device: {exc}") from exc


def check_data_path(fabric, args: argparse.Namespace):  # -> CanaryResult
    from .canary import CanaryFailed, run_canary
    from .errors import RdaxError

    try:
        result = run_canary(fabric.device, args.root, args.mtu)
    except CanaryFailed as exc:
        raise Refused(f"refusing to serve at path MTU {args.mtu}: {exc}") from exc
    except (RdaxError, OSError) as exc:
        raise Refused(f"the canary could not be prepared under {args.root!r}: {exc}") from exc
    log.info("canary: %d bytes landed intact at path MTU %d (%s region)", result.length, result.mtu,
             "ODP" if result.odp else "pinned")
    if result.write_alignment > 1:
        log.warning("canary: a write starting inside a page landed at the start of the page (rxe ODP kernel bug): "
                    "grants tell clients to start WRITEs and READs on %d-byte boundaries", result.write_alignment)
    return result


if __name__ == "__main__":
    sys.exit(main())
