"""The control plane on the host, at native speed: the same Node and gRPC servicer as rdax-server, over a
fabric that registers nothing (the host has no RDMA), files on the host's filesystem with MAP_SYNC off,
served and called on 127.0.0.1. Adds rdax.control_plane.host to a bench.json.

    .venv/bin/python tests/bench/control_host.py results/bench.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

import control  # noqa: E402
from report import control_lines  # noqa: E402

from rdax.service.fabric_api import Endpoint  # noqa: E402
from rdax.service.node import Node  # noqa: E402
from rdax.service.server import create_server  # noqa: E402
from rdax.v1 import rdax_pb2 as pb  # noqa: E402
from rdax.v1 import rdax_pb2_grpc  # noqa: E402

WHERE = ("host (native CPU): rdax Node + gRPC servicer in-process, NullFabric (no memory registration, no QP), "
         "files on the host filesystem without MAP_SYNC, client stub over 127.0.0.1")


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


def measure(seconds: float, threads: int, max_ops: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="rdax-bench-") as root:
        node = Node(root, NullFabric(), map_sync=False)
        server, port = create_server("127.0.0.1:0", node)
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            stub = rdax_pb2_grpc.RdaxStub(channel)
            figures = control.measure(StubOps(stub), "host", seconds=seconds, max_ops=max_ops, threads=threads)
        finally:
            channel.close()
            node.shutdown()
            server.stop(None).wait()
    figures["where"] = WHERE
    return figures


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
    args = parser.parse_args(argv)
    doc = json.loads(args.bench_json.read_text()) if args.bench_json.exists() else {}
    figures = measure(args.seconds, args.threads, args.max_ops)
    doc.setdefault("rdax", {}).setdefault("control_plane", {})["host"] = figures
    doc["host"] = host_state()
    args.bench_json.write_text(json.dumps(doc, indent=2) + "\n")
    print("\n".join(control_lines(doc)))
    host = doc["host"]
    print(f"host after the lab run: load average {host['loadavg_after_lab_run']}, "
          f"{host['qemu_processes_after_lab_run']} other qemu process(es) running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
