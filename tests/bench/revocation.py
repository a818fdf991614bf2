"""Revocation latency in the lab: from a breaker's open() of a sealed file to
(a) its registrations invalidated — the open returns only after rdax has
deregistered every region and released the lease, so open()'s duration bounds
it from above — and (b) the client notified through Watch. Both sides read
CLOCK_MONOTONIC, which every namespace of the guest shares.

    ip netns exec storage python tests/bench/revocation.py --trials 20
"""
from __future__ import annotations

import argparse
import json
import statistics
import os
import subprocess
import sys
import uuid
from pathlib import Path

LAB = Path(__file__).resolve().parent.parent / "lab"
sys.path.insert(0, str(LAB))
from conftest import Client, Server  # noqa: E402  (the lab tests' server/client drivers)
from pki import make_pki  # noqa: E402

BREAKER = ("import os, sys, time; t0 = time.monotonic(); fd = os.open(sys.argv[1], os.O_RDONLY); "
           "t1 = time.monotonic(); os.close(fd); print(t0, t1)")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(lab: dict[str, str], trials: int) -> dict:
    root = Path(lab["RDAX_DAX_MOUNT"]) / f"bench-revoke-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    pki = make_pki(Path("/run/rdax-lab-pki"), [lab["RDAX_STORAGE_IP"], "127.0.0.1"])
    server = Server(lab, root, 7990, pki=pki)
    invalidated, notified = [], []
    try:
        client = Client(lab, server.target, pki)
        for i in range(trials):
            name = f"f{i}"
            assert client.call("open", name=name, path=name, length=1 << 20)["ok"]
            out = subprocess.run([sys.executable, "-c", BREAKER, str(root / name)],
                                 capture_output=True, text=True, check=True, timeout=120).stdout
            t0, t1 = map(float, out.split())
            notice = client.call("revoked", name=name)
            assert notice["revoked"], notice
            invalidated.append((t1 - t0) * 1000)
            notified.append((notice["notified_at"] - t0) * 1000)
        client.close()
    finally:
        server.stop()

    def stats(xs: list[float]) -> dict:
        return {"p50_ms": round(statistics.median(xs), 2), "p99_ms": round(percentile(xs, 0.99), 2),
                "max_ms": round(max(xs), 2), "trials": len(xs)}
    return {"breaker": "open(O_RDONLY) by another process",
            "to_registrations_invalidated": stats(invalidated), "to_client_notified": stats(notified)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    result = measure(dict(os.environ), args.trials)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
