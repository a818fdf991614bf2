"""The client side of the scale bench (tests/bench/scale.py), run in the client namespace: one session through
rdax.client that times Grant (and Release) over gRPC + mutual TLS, each call stamped with CLOCK_MONOTONIC (shared
by every namespace of the guest) so the driver can tell which ones ran during a revocation or an audit. One JSON
command per stdin line, one JSON answer per stdout line.

    ip netns exec client python tests/bench/scale_peer.py 10.77.0.1:7791
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

from rdax.client import Session, connect

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lab"))
from labkit import serve  # noqa: E402  (the lab drivers' JSON-lines loop)

KiB = 1 << 10


class Probe:
    def __init__(self, target: str) -> None:
        self.target = target
        self.session: Session | None = None
        self.seal_id = ""

    def open(self, path: str, length: int) -> dict:
        self.session = connect(self.target, staging=64 * KiB, depth=4)
        self.seal_id = self.session.seal(path, length, create=True).seal_id
        return {"seal_id": self.seal_id}

    def grants(self, seconds: float, max_ops: int, length: int = 64 * KiB, min_ops: int = 5) -> dict:
        """Grant + Release of `length` bytes in a loop, for `seconds` (at least `min_ops`, at most `max_ops`):
        [start, end] of each Grant and each Release."""
        assert self.session is not None
        grants: list[tuple[float, float]] = []
        releases: list[tuple[float, float]] = []
        deadline = time.monotonic() + seconds
        while len(grants) < max_ops and (len(grants) < min_ops or time.monotonic() < deadline):
            t0 = time.monotonic()
            grant = self.session.grant(self.seal_id, 0, length)
            t1 = time.monotonic()
            self.session.release(grant.grant_id)
            releases.append((t1, time.monotonic()))
            grants.append((t0, t1))
        return {"grants": grants, "releases": releases}

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


def main() -> None:
    probe = Probe(sys.argv[1])
    print(json.dumps({"ok": True, "pid": os.getpid()}), flush=True)
    try:
        serve(probe, lambda exc: {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]})
    finally:
        probe.close()


if __name__ == "__main__":
    main()
