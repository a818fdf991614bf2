"""Control-plane figures, the same in the guest and on the host: latency and throughput of Heartbeat, Seal,
Unseal, Grant and Release, sequentially and from several threads. Bounded by count and by time."""
from __future__ import annotations

import threading
import time
from typing import Callable, Protocol

from report import summary_us

KiB = 1 << 10
MiB = 1 << 20


class Ops(Protocol):
    """One client session's control-plane calls (rdax.client.Session in the guest, a bare stub on the host)."""

    def heartbeat(self) -> None: ...
    def seal(self, path: str, length: int) -> str: ...
    def unseal(self, seal_id: str) -> None: ...
    def grant(self, seal_id: str, offset: int, length: int) -> str: ...
    def release(self, grant_id: str) -> None: ...


def _timed(fn: Callable[[], object]) -> tuple[object, int]:
    t0 = time.perf_counter_ns()
    out = fn()
    return out, time.perf_counter_ns() - t0


def _latency(samples: list[int]) -> dict:
    out = summary_us(samples)
    total_s = sum(samples) / 1e9
    out["ops_per_s"] = round(len(samples) / total_s, 1) if total_s else None
    return out


def measure(ops: Ops, tag: str, seconds: float = 2.0, max_ops: int = 200, threads: int = 4,
            make_ops: Callable[[], Ops] | None = None) -> dict:
    """Latency of each call (time-boxed to `seconds` per call kind, at most `max_ops`), then throughput of
    Grant+Release and Seal+Unseal cycles from `threads` threads (each with make_ops(), or sharing `ops`)."""
    lat: dict[str, list[int]] = {k: [] for k in ("heartbeat", "seal", "unseal", "grant", "release")}

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(lat["heartbeat"]) < max_ops:
        lat["heartbeat"].append(_timed(ops.heartbeat)[1])

    # Seal a new 64 KiB file (create, preallocate, zero-fill, FIEMAP, lease, map), then let it go.
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline and i < max_ops:
        seal_id, t = _timed(lambda: ops.seal(f"cp-{tag}-{i}", 64 * KiB))
        lat["seal"].append(t)
        lat["unseal"].append(_timed(lambda: ops.unseal(seal_id))[1])
        i += 1

    # Grant 64 KiB of a sealed 1 MiB file (one memory region), then release it.
    seal_id = ops.seal(f"cp-{tag}-grants", MiB)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(lat["grant"]) < max_ops:
        grant_id, t = _timed(lambda: ops.grant(seal_id, 0, 64 * KiB))
        lat["grant"].append(t)
        lat["release"].append(_timed(lambda: ops.release(grant_id))[1])

    concurrent = {
        "grant+release": _throughput(threads, seconds, max_ops, make_ops or (lambda: ops),
                                     lambda o, t, n: o.release(o.grant(seal_id, (t * 64 * KiB) % MiB, 64 * KiB))),
        "seal+unseal": _throughput(threads, seconds, max_ops, make_ops or (lambda: ops),
                                   lambda o, t, n: o.unseal(o.seal(f"cp-{tag}-t{t}-{n}", 64 * KiB))),
    }
    ops.unseal(seal_id)
    return {"latency": {k: _latency(v) for k, v in lat.items() if v}, "concurrent": concurrent}


def _throughput(threads: int, seconds: float, max_ops: int, make_ops: Callable[[], Ops],
                cycle: Callable[[Ops, int, int], None]) -> dict:
    counts = [0] * threads
    errors: list[str] = []
    start = threading.Barrier(threads + 1)
    clients = [make_ops() for _ in range(threads)]

    def worker(t: int) -> None:
        start.wait()
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline and counts[t] < max_ops:
                cycle(clients[t], t, counts[t])
                counts[t] += 1
        except Exception as exc:  # noqa: BLE001 - reported with the figure
            errors.append(f"{type(exc).__name__}: {exc}")

    pool = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for th in pool:
        th.start()
    start.wait()
    t0 = time.monotonic()
    for th in pool:
        th.join(seconds * 10 + 30)
    elapsed = time.monotonic() - t0
    out = {"threads": threads, "ops": sum(counts), "seconds": round(elapsed, 3),
           "ops_per_s": round(sum(counts) / elapsed, 1) if elapsed else None}
    if errors:
        out["errors"] = errors[:3]
    return out
