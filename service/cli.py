"""rdax-server: run a storage node — check the data path with a canary, then serve the export root over gRPC."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

from .revocation import install_sigio_guard

if TYPE_CHECKING:   # for the annotations only: the functions import these when called, so --help needs no pyverbs
    from .canary import CanaryResult
    from .fabric import RdmaFabric
    from .node import Node
    from .policy import Policy
    from .tls import ServerTls

EXIT_REFUSED = 2   # bad configuration, no device, or a data path that loses writes

log = logging.getLogger("rdax.service")


class Refused(Exception):
    """The node will not start; the message says why and what to do."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rdax-server", description=__doc__)
    parser.add_argument("--root", required=True, help="export root: files beneath it can be sealed (a DAX mount)")
    parser.add_argument("--listen", default="127.0.0.1:7710", help="HOST:PORT for gRPC (default %(default)s)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--device", help="RDMA device name, e.g. rxe0 (default: the one device whose netdev is in this "
                                        "network namespace)")
    where.add_argument("--ip", help="pick the RDMA device that has this IPv4 address")
    parser.add_argument("--mtu", type=int, default=4096, help="RDMA path MTU (default %(default)s; rxe ODP needs 4096)")
    parser.add_argument("--lease-seconds", type=int, default=30, help="session lease (default %(default)s)")
    parser.add_argument("--grant-ttl-seconds", type=float, default=None,
                        help="revoke grants this long after granting (default: they end with their session)")
    parser.add_argument("--max-grants-per-session", type=int, default=1024, help="(default %(default)s)")
    parser.add_argument("--max-sessions", type=int, default=1024,
                        help="live sessions on the node (default %(default)s)")
    parser.add_argument("--open-session-rate", type=float, default=20.0,
                        help="OpenSession calls per second per identity, burst twice that (default %(default)s)")
    trust = parser.add_argument_group("trust", "mutual TLS and the policy (see README: Security); SIGHUP re-reads "
                                               "the certificates, the key and the policy without dropping sessions")
    trust.add_argument("--tls-cert", help="the node's certificate (PEM), with its IP/DNS names as SANs")
    trust.add_argument("--tls-key", help="the node's private key (PEM)")
    trust.add_argument("--tls-client-ca", help="CA certificate(s) (PEM) that sign client certificates")
    trust.add_argument("--insecure", action="store_true",
                       help="plaintext gRPC, no client certificates: every caller is the identity 'anonymous' (held "
                            "to the policy like any other); for a lab, never for a network")
    trust.add_argument("--policy", help="the authorization policy (TOML): who may seal which paths with which access, "
                                        "and their quotas; required, default deny")
    trust.add_argument("--audit-log", default="-",
                       help="append one JSON line per security-relevant event to this file ('-': stderr, the default)")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT",
                        help="serve Prometheus metrics over plaintext HTTP here (off unless given)")
    parser.add_argument("--health-listen", metavar="HOST:PORT",
                        help="also serve grpc.health.v1, and nothing else, in plaintext on HOST:PORT (for probes "
                             "that cannot present a client certificate, e.g. kubelet's gRPC probe); off by default")
    parser.add_argument("--log-level", default="INFO", help="(default %(default)s)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="json: one JSON object per line, for log collectors (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # First of all, before any thread exists: a lease break's SIGIO kills the process by default.
    install_sigio_guard()
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_format == "json":
        from .metrics import JsonFormatter
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    try:
        return run(args)
    except Refused as exc:
        print(f"rdax-server: {exc}", file=sys.stderr, flush=True)
        return EXIT_REFUSED


def run(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.root):
        raise Refused(f"--root {args.root!r} is not a directory")
    # Trust first: a node that would serve without credentials or policy must not even touch the device.
    tls = load_tls(args)
    policy = load_policy(args)
    fabric = open_fabric(args)
    canary = check_data_path(fabric, args)
    # Imported late: grpc takes seconds to import in the lab, and a refused start needs none of it.
    from .audit import Audit
    from .limits import Limits
    from .metrics import NodeMetrics
    from .node import Node
    from .server import serve

    stop, reload = threading.Event(), threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    audit = Audit(args.audit_log)
    limits = Limits(max_sessions=args.max_sessions, open_session_rate=args.open_session_rate,
                    open_session_burst=max(1, int(2 * args.open_session_rate)))
    metrics = NodeMetrics()
    metrics.canary_ok.set(1)   # a canary that lost bytes refused the start above
    metrics.write_alignment.set(canary.write_alignment)
    try:
        node = Node(args.root, fabric, lease_seconds=args.lease_seconds, grant_ttl_seconds=args.grant_ttl_seconds,
                    max_grants_per_session=args.max_grants_per_session, write_alignment=canary.write_alignment,
                    policy=policy, audit=audit, limits=limits, metrics=metrics)
    except OSError as exc:   # e.g. fanotify refused (service/fanotify.py says by what)
        audit.close()
        raise Refused(f"cannot watch sealed files: {exc}") from exc
    if args.metrics_listen:
        try:
            metrics.serve(args.metrics_listen)
        except (OSError, ValueError) as exc:
            node.shutdown()
            raise Refused(f"--metrics-listen {args.metrics_listen}: {exc}") from exc
        log.info("metrics on http://%s/metrics", args.metrics_listen)
    audit.event("node_started", root=args.root, listen=args.listen, insecure=tls is None, policy=policy.source)

    def on_reload() -> None:
        reload_trust(args, tls, node)

    try:
        serve(node, args.listen, stop, credentials=None if tls is None else tls.credentials(),
              on_ready=lambda where: print(f"rdax-server listening on {where}", flush=True),
              on_reload=on_reload, reload=reload, health_address=args.health_listen,
              on_health_ready=lambda where: print(f"rdax-server health (plaintext, grpc.health.v1 only) on {where}",
                                                  flush=True))
    except OSError as exc:
        node.shutdown()
        raise Refused(str(exc)) from exc
    finally:
        audit.close()
    log.info("stopped")
    return 0


def load_tls(args: argparse.Namespace) -> ServerTls | None:
    """The node's TLS files, checked; None with --insecure (after a warning)."""
    from .tls import ServerTls, TlsConfigError

    given = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key, "--tls-client-ca": args.tls_client_ca}
    if args.insecure:
        if any(given.values()):
            raise Refused("--insecure and TLS files together: choose one (drop --insecure to require client "
                          "certificates)")
        log.warning("--insecure: plaintext gRPC, no client certificates; every caller is 'anonymous' and anyone who "
                    "reaches %s may act as it. Use it in a lab only.", args.listen)
        return None
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise Refused(f"no TLS: {', '.join(missing)} missing. rdax-server requires mutual TLS: give --tls-cert, "
                      f"--tls-key and --tls-client-ca (`rdax-admin certs` makes them), or --insecure for a lab")
    tls = ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca)
    try:
        tls.check_files()
    except TlsConfigError as exc:
        raise Refused(str(exc)) from exc
    return tls


def load_policy(args: argparse.Namespace) -> Policy:
    from .policy import Policy, PolicyError

    if not args.policy:
        raise Refused("no --policy: rdax-server denies every identity by default, so it needs a policy file that "
                      "says who may seal what (README: Security, 'The policy file')")
    try:
        return Policy.load(args.policy)
    except PolicyError as exc:
        raise Refused(str(exc)) from exc


def reload_trust(args: argparse.Namespace, tls: ServerTls | None, node: Node) -> None:
    """SIGHUP: re-read certificates, key and policy; whatever does not load is refused and the old one kept."""
    from .policy import Policy, PolicyError
    from .tls import TlsConfigError

    if tls is not None:
        try:
            tls.reload()
            log.info("SIGHUP: TLS files re-read; new connections use them")
            node.audit_log.event("tls_reloaded", cert=args.tls_cert)
        except TlsConfigError as exc:
            log.error("SIGHUP: keeping the old TLS files: %s", exc)
            node.audit_log.event("tls_reload_refused", reason=str(exc))
    try:
        node.set_policy(Policy.load(args.policy))
    except PolicyError as exc:
        log.error("SIGHUP: keeping the old policy: %s", exc)
        node.audit_log.event("policy_reload_refused", source=args.policy, reason=str(exc))


def open_fabric(args: argparse.Namespace) -> RdmaFabric:
    try:
        from rdax.rdma import VerbsError

        from .fabric import RdmaFabric
    except ImportError as exc:
        raise Refused(f"RDMA support is missing ({exc}): rdax-server needs pyverbs "
                      "(Debian 13's python3-pyverbs)") from exc
    try:
        device = args.device
        if device is None and args.ip is None:
            # Neither named: the one device whose netdev lives in our network namespace (a container's, a netns's).
            from rdax.rdma import local_device
            device = local_device()
            log.info("RDMA device %s: the one with a netdev in this network namespace", device)
        return RdmaFabric(device=device, ip=args.ip, mtu=args.mtu)
    except VerbsError as exc:
        raise Refused(f"no usable RDMA device: {exc}") from exc


def check_data_path(fabric: RdmaFabric, args: argparse.Namespace) -> CanaryResult:
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
