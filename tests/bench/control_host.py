"""The control plane on the host, at native speed: the same Node and gRPC servicer as rdax-server, over a
fabric that registers nothing (the host has no RDMA), files on the host's filesystem with MAP_SYNC off,
served and called on 127.0.0.1, over mutual TLS and over plaintext in alternating blocks. Adds
rdax.control_plane.host (mTLS), .host_plaintext and ratios.mtls_vs_plaintext_* to a bench.json.

    .venv/bin/python tests/bench/control_host.py results/bench.json
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import json
import os
import sys
import tempfile
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

import control  # noqa: E402
from report import control_lines  # noqa: E402

from rdax.service.admin import make_ca, make_client_cert, make_node_cert  # noqa: E402
from rdax.service.fabric_api import Endpoint  # noqa: E402
from rdax.service.node import Node  # noqa: E402
from rdax.service.policy import Policy  # noqa: E402
from rdax.service.tls import ServerTls  # noqa: E402
from rdax.service.server import create_server  # noqa: E402
from rdax.v1 import rdax_pb2 as pb  # noqa: E402
from rdax.v1 import rdax_pb2_grpc  # noqa: E402

WHERE = ("host (native CPU): rdax Node + gRPC servicer in-process, NullFabric (no memory registration, no QP), "
         "files on the host filesystem without MAP_SYNC, client stub over 127.0.0.1")
IDENTITY = "spiffe://rdax.bench/client"
POLICY = f"""
[[allow]]
identity = "{IDENTITY}"
paths = ["**"]
create = true
access = ["write", "read", "atomic", "flush"]
[[allow]]
identity = "anonymous"
paths = ["**"]
create = true
access = ["write", "read", "atomic", "flush"]
"""


class NullRegion:
    _rkeys = itertools.count(0x100)

    def __init__(self) -> None:
        self.rkey = next(self._rkeys)

    def close(self) -> None:
        pass


class NullChannel:
    def __init__(self, qpn: int) -> None:
        self.endpoint = Endpoint(qpn=qpn, gid="::ffff:127.0.0.1", psn=1, mtu=4096)

    def register(self, addr: int, length: int, access: int) -> NullRegion:
        return NullRegion()

    def failed(self) -> bool:
        return False

    def close(self) -> None:
        pass


class NullFabric:
    """Stands in for RDMA so that the figures are the control plane's own (gRPC, locks, files, leases)."""

    def __init__(self) -> None:
        self._qpns = itertools.count(0x20)

    def open_channel(self, remote: Endpoint) -> NullChannel:
        return NullChannel(next(self._qpns))


class StubOps:
    """control.Ops over a bare gRPC stub and a session of its own."""

    def __init__(self, stub: rdax_pb2_grpc.RdaxStub) -> None:
        self.stub = stub
        self.sid = stub.OpenSession(pb.OpenSessionRequest(
            client_id="bench-host", endpoint=pb.Endpoint(qpn=0x11, gid="::ffff:127.0.0.1", psn=7, mtu=4096))
        ).session_id

    def heartbeat(self) -> None:
        self.stub.Heartbeat(pb.HeartbeatRequest(session_id=self.sid), timeout=30)

    def seal(self, path: str, length: int) -> str:
        return self.stub.Seal(pb.SealRequest(session_id=self.sid, path=path, length=length, create=True),
                              timeout=30).seal.seal_id

    def unseal(self, seal_id: str) -> None:
        self.stub.Unseal(pb.UnsealRequest(session_id=self.sid, seal_id=seal_id), timeout=30)

    def grant(self, seal_id: str, offset: int, length: int) -> str:
        return self.stub.Grant(pb.GrantRequest(session_id=self.sid, seal_id=seal_id, offset=offset, length=length,
                                               access=pb.ACCESS_WRITE | pb.ACCESS_READ), timeout=30).grant.grant_id

    def release(self, grant_id: str) -> None:
        self.stub.Release(pb.ReleaseRequest(session_id=self.sid, grant_id=grant_id), timeout=30)


def measure(seconds: float, threads: int, max_ops: int, tls: bool, tag: str = "host") -> dict:
    """One block: a node served over mTLS (tls=True) or plaintext, the control-plane figures of one client."""
    with tempfile.TemporaryDirectory(prefix="rdax-bench-") as root:
        pki = Path(root) / "pki"
        export = Path(root) / "export"
        export.mkdir()
        node = Node(export, NullFabric(), map_sync=False, policy=Policy.parse(POLICY, "bench"))
        credentials = None
        if tls:
            make_ca(pki)
            make_node_cert(pki, "node", ips=["127.0.0.1"])
            make_client_cert(pki, IDENTITY, name="client")
            credentials = ServerTls(str(pki / "node.pem"), str(pki / "node.key"), str(pki / "ca.pem")).credentials()
        server = create_server("127.0.0.1:0", node, credentials)
        port = server.start()
        target = f"127.0.0.1:{port}"
        # rdax.client would import pyverbs, which the host lacks: the same credentials, by hand.
        channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(
                       (pki / "ca.pem").read_bytes(), (pki / "client.key").read_bytes(),
                       (pki / "client.pem").read_bytes()))
                   if tls else grpc.insecure_channel(target))
        try:
            stub = rdax_pb2_grpc.RdaxStub(channel)
            figures = control.measure(StubOps(stub), tag, seconds=seconds, max_ops=max_ops, threads=threads)
        finally:
            channel.close()
            node.shutdown()
            server.stop(None)
    figures["where"] = WHERE + (", mutual TLS (ECDSA P-256)" if tls else ", plaintext")
    return figures


def measure_both(seconds: float, threads: int, max_ops: int, blocks: int) -> tuple[dict, dict, dict]:
    """Plaintext and mTLS blocks interleaved (ABAB...): each ratio is the median of the per-block ratios."""
    per_block: dict[str, list[float]] = {}
    last: dict[bool, dict] = {}
    for block in range(blocks):
        for tls in (False, True):
            last[tls] = measure(seconds, threads, max_ops, tls, tag=f"host{block}{'t' if tls else 'p'}")
        for op in ("seal", "grant"):
            for q in ("p50_us", "p99_us"):
                a, b = last[True]["latency"][op][q], last[False]["latency"][op][q]
                per_block.setdefault(f"mtls_vs_plaintext_{op}_{q[:3]}", []).append(a / b if b else float("nan"))
    ratios = {key: {"median": round(statistics.median(v), 3), "min": round(min(v), 3), "max": round(max(v), 3),
                    "blocks": len(v)} for key, v in per_block.items()}
    return last[True], last[False], ratios


def host_state() -> dict:
    """What else the host was doing when this ran (other lab VMs skew every guest figure: they share 2 cores)."""
    vms = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                vms += f.read().strip().startswith("qemu-system")
        except OSError:
            continue
    return {"cpus": os.cpu_count(), "loadavg_after_lab_run": [round(x, 2) for x in os.getloadavg()],
            "qemu_processes_after_lab_run": vms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bench_json", type=Path)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--max-ops", type=int, default=500)
    parser.add_argument("--blocks", type=int, default=3, help="plaintext/mTLS block pairs (default %(default)s)")
    args = parser.parse_args(argv)
    doc = json.loads(args.bench_json.read_text()) if args.bench_json.exists() else {}
    mtls, plain, ratios = measure_both(args.seconds, args.threads, args.max_ops, args.blocks)
    doc.setdefault("rdax", {}).setdefault("control_plane", {})["host"] = mtls
    doc["rdax"]["control_plane"]["host_plaintext"] = plain
    doc.setdefault("ratios", {}).update({key: value["median"] for key, value in ratios.items()})
    doc["rdax"]["control_plane"]["mtls_vs_plaintext"] = ratios
    doc["host"] = host_state()
    args.bench_json.write_text(json.dumps(doc, indent=2) + "\n")
    print("\n".join(control_lines(doc)))
    print("mTLS / plaintext, median of per-block ratios (goal <= 1.2): " +
          ", ".join(f"{key.removeprefix('mtls_vs_plaintext_')} {value['median']:.2f} "
                    f"[{value['min']:.2f}-{value['max']:.2f}]" for key, value in ratios.items()))
    host = doc["host"]
    print(f"host after the lab run: load average {host['loadavg_after_lab_run']}, "
          f"{host['qemu_processes_after_lab_run']} other qemu process(es) running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
