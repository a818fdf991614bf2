"""The rdax side of the benchmark, run in the client namespace: one JSON command per stdin line, one JSON
answer per stdout line (nothing else goes to stdout).

    ip netns exec client python tests/bench/rdax_peer.py 10.77.0.1:7790

Everything goes through rdax.client (Session, RemoteFile) and the session's rdax.rdma Connection; the
library itself is used as shipped. Every measurement is bounded in time.
"""
from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import resource
import sys
import time
import traceback

from rdax.client import RemoteFile, Session, connect
from rdax.rdma import Chunk
from rdax.v1 import rdax_pb2 as pb

import control
from report import summary_us

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lab"))
from labkit import serve  # noqa: E402  (the lab drivers' JSON-lines loop)

KiB = 1 << 10
MiB = 1 << 20
BW_REGION = 32 * MiB      # each bandwidth session's grant: written over and over, sequentially
LAT_FILE = MiB
CALIBRATE_BYTES = 4 * MiB
CALIBRATE_SECONDS = 0.3


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


class SessionOps:
    """control.Ops over an rdax.client.Session."""

    def __init__(self, session: Session) -> None:
        self.s = session

    def heartbeat(self) -> None:
        self.s.stub.Heartbeat(pb.HeartbeatRequest(session_id=self.s.session_id), timeout=30)

    def seal(self, path: str, length: int) -> str:
        return self.s.seal(path, length, create=True).seal_id

    def unseal(self, seal_id: str) -> None:
        self.s.unseal(seal_id)

    def grant(self, seal_id: str, offset: int, length: int) -> str:
        return self.s.grant(seal_id, offset, length).grant_id

    def release(self, grant_id: str) -> None:
        self.s.release(grant_id)


class Bench:
    def __init__(self, target: str) -> None:
        self.target = target
        self.sessions: list[Session] = []
        self.bw: dict[int, tuple[Session, RemoteFile]] = {}
        self.lat: tuple[Session, RemoteFile] | None = None
        self.extra_sessions: list[Session] = []
        self.mem: tuple[Session, str, int, list[str]] | None = None
        self.vs: tuple[Session, RemoteFile] | None = None

    def _connect(self, **kwargs) -> Session:
        s = connect(self.target, **kwargs)
        self.sessions.append(s)
        return s

    # -- sequential write bandwidth -------------------------------------------------
    def _stream(self, s: Session, f: RemoteFile, size: int, count: int, start: int) -> None:
        """`count` RDMA WRITEs of `size` bytes, one work request each, sequential through the grant; the
        Connection keeps up to its depth in flight, signals one in signal_every, waits once at the end."""
        laddr, lkey, stage = s.staging.addr, s.staging.lkey, s.staging.length
        rkey, raddr, region = f.grant.rkey, f.grant.remote_addr, f.length
        s.conn.write((Chunk(laddr + ((i * size) % region) % stage, lkey, size, rkey, raddr + (i * size) % region)
                      for i in range(start, start + count)), timeout=300)

    def open_bw(self, depth: int) -> dict:
        """A session whose Connection has `depth`, granted BW_REGION of one shared file; the first pass over
        the fresh grant (1 MiB writes) is timed: that is the ODP first-touch cost."""
        s = self._connect(depth=depth)
        f = s.open("bench-bw", BW_REGION)
        self.bw[depth] = (s, f)
        t0 = time.perf_counter()
        self._stream(s, f, MiB, BW_REGION // MiB, 0)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        self._stream(s, f, MiB, BW_REGION // MiB, 0)
        second = time.perf_counter() - t0
        return {"depth": depth, "signal_every": s.conn.signal_every, "bytes": BW_REGION,
                "first_pass_mib_s": round(BW_REGION / MiB / first, 2),
                "second_pass_mib_s": round(BW_REGION / MiB / second, 2)}

    def write_bw(self, size: int, depth: int, seconds: float) -> dict:
        s, f = self.bw[depth]
        # Short bursts, for at least CALIBRATE_SECONDS, size the timed run to about `seconds`.
        n = max(1, min(2 * depth, CALIBRATE_BYTES // size))
        sent, t0 = 0, time.perf_counter()
        while sent == 0 or time.perf_counter() - t0 < min(CALIBRATE_SECONDS, seconds / 4):
            self._stream(s, f, size, n, sent)
            sent += n
        rate = sent * size / (time.perf_counter() - t0)
        count = max(4, min(200_000, int(seconds * rate / size)))
        user0, sys0 = _cpu()
        t0 = time.perf_counter()
        self._stream(s, f, size, count, sent)
        elapsed = time.perf_counter() - t0
        user1, sys1 = _cpu()
        return {"size": size, "depth": depth, "signal_every": s.conn.signal_every, "messages": count,
                "bytes": count * size, "seconds": round(elapsed, 4),
                "bw_mib_s": round(count * size / MiB / elapsed, 2),
                "msg_per_s": round(count / elapsed, 1),
                "us_per_msg": round(elapsed / count * 1e6, 2),
                "cpu_user_s": round(user1 - user0, 3), "cpu_sys_s": round(sys1 - sys0, 3)}

    def api_write_bw(self, size: int, seconds: float, depth: int = 64) -> dict:
        """RemoteFile.write as an application calls it: copy into the staging buffer, 1 MiB work requests,
        wait for completion before returning; one call per message."""
        s, f = self.bw[depth]
        data = os.urandom(size)
        deadline = time.perf_counter() + seconds
        count, off = 0, 0
        user0, sys0 = _cpu()
        t0 = time.perf_counter()
        while True:
            f.write(off, data)
            count += 1
            off = (off + size) % f.length
            if count >= 4 and time.perf_counter() >= deadline or count >= 200_000:
                break
        elapsed = time.perf_counter() - t0
        user1, sys1 = _cpu()
        return {"size": size, "depth": depth, "messages": count, "bytes": count * size,
                "seconds": round(elapsed, 4), "bw_mib_s": round(count * size / MiB / elapsed, 2),
                "us_per_msg": round(elapsed / count * 1e6, 2),
                "cpu_user_s": round(user1 - user0, 3), "cpu_sys_s": round(sys1 - sys0, 3)}

    # -- latency ----------------------------------------------------------------------
    def _lat_session(self) -> tuple[Session, RemoteFile]:
        if self.lat is None:
            s = self._connect()   # the library's defaults: depth 64, 16 MiB staging
            f = s.open("bench-lat", LAT_FILE)
            f.write(0, bytes(LAT_FILE))   # fault the region in once (ODP)
            f.flush(0, LAT_FILE)
            self.lat = (s, f)
        return self.lat

    def latency(self, mode: str, size: int, iters: int, seconds: float, warmup: int = 20) -> dict:
        """write_flush: RDMA WRITE (unsignalled) + FLUSH(persistent, the range), one completion wait — the
        fewest round trips to durable bytes. write: one signalled WRITE, wait. api_write_flush:
        RemoteFile.write(flush=True), what an application calls: copy into staging, WRITE + FLUSH, one wait."""
        s, f = self._lat_session()
        conn, rkey, raddr = s.conn, f.grant.rkey, f.grant.remote_addr
        chunk = Chunk(s.staging.addr, s.staging.lkey, size, rkey, raddr)
        data = os.urandom(size)
        if mode == "write_flush":
            def op() -> None:
                conn.write_flush([chunk], rkey, raddr, size)
        elif mode == "write":
            def op() -> None:
                conn.write([chunk])
        elif mode == "api_write_flush":
            def op() -> None:
                f.write(0, data, flush=True)
        else:
            raise ValueError(f"unknown latency mode {mode!r}")
        for _ in range(warmup):
            op()
        samples: list[int] = []
        deadline = time.monotonic() + seconds
        clock = time.perf_counter_ns
        while len(samples) < iters and (len(samples) < 20 or time.monotonic() < deadline):
            t0 = clock()
            op()
            samples.append(clock() - t0)
        return {"size": size, "mode": mode, **summary_us(samples)}

    # -- the anchors' workloads (tests/bench/versus.py): durable writes, the same for every system ----------
    def versus_open(self, region: int, depth: int = 64) -> dict:
        """A session of `depth` and one grant over a fresh sealed file of `region` bytes, faulted in once
        (one pass of 1 MiB writes and a FLUSH, untimed), like librpma's and NFS's first pass."""
        s = self._connect(depth=depth)
        f = s.open("bench-versus", region)
        self.vs = (s, f)
        t0 = time.perf_counter()
        first = self.versus_run(MiB, depth, region // MiB)
        return {"depth": depth, "signal_every": s.conn.signal_every, "region": region, "native": s.conn.native,
                "first_pass_s": round(time.perf_counter() - t0, 3), "first_pass_mib_s": first["bw_mib_s"]}

    def versus_run(self, size: int, depth: int, count: int) -> dict:
        """`count` writes of `size`, sequential from offset 0 of the grant (wrapping). depth 1: each one
        Connection.write_flush (RDMA WRITE + FLUSH(persistent) of its range, one wait), timed one by one.
        depth > 1: one Connection.write_flush over all of them (up to the connection's depth in flight, one
        FLUSH of the range written at the end, one wait)."""
        s, f = self.vs
        conn, rkey, raddr, region = s.conn, f.grant.rkey, f.grant.remote_addr, f.length
        laddr, lkey, stage = s.staging.addr, s.staging.lkey, s.staging.length
        slots = region // size
        if depth == 1:
            clock = time.perf_counter_ns
            samples = []
            t0 = time.perf_counter()
            for i in range(count):
                off = raddr + (i % slots) * size
                chunk = [Chunk(laddr + (i * size) % stage, lkey, size, rkey, off)]
                s0 = clock()
                conn.write_flush(chunk, rkey, off, size)
                samples.append(clock() - s0)
            elapsed = time.perf_counter() - t0
        else:
            if depth != conn.depth:
                raise ValueError(f"the versus session has depth {conn.depth}, not {depth}")
            chunks = [Chunk(laddr + (i * size) % stage, lkey, size, rkey, raddr + (i % slots) * size)
                      for i in range(count)]
            t0 = time.perf_counter()
            conn.write_flush(chunks, rkey, raddr, min(count * size, region), timeout=300)
            elapsed = time.perf_counter() - t0
        row = {"size": size, "depth": depth, "messages": count, "bytes": count * size,
               "seconds": round(elapsed, 6), "bw_mib_s": round(count * size / MiB / elapsed, 3)}
        if depth == 1:
            row.update(summary_us(samples))
        return row

    def versus_block(self, workloads: list, native: bool | None = None) -> dict:
        """One block of the workloads; `native` False: through the pure-pyverbs path of the same connection
        (the A/B of rdma/fastpath), True or None: as the connection is."""
        conn = self.vs[0].conn
        was = conn.native
        if native is not None:
            if native and not was:
                raise ValueError("the native post-and-poll is not in use here (rdma/fastpath not built?)")
            conn._native = native
        try:
            return {"rows": {name: self.versus_run(size, depth, count) for name, size, depth, count in workloads},
                    "native": conn.native}
        finally:
            conn._native = was

    def put(self, size: int, name: str, server_pid: int | None = None) -> dict:
        """What `rdax put` does, from a source that costs nothing to read: a new session, Seal + Grant of a new
        file, RemoteFile.write_from (1 MiB work requests from the staging buffer), FLUSH, close. With the
        node's `server_pid` (the guest's namespaces share one PID namespace): the node's on-CPU time during the
        data phase alone (write_from + FLUSH: what the node does while bytes move, control plane apart)."""
        from versus import proc_run_s
        class Zeros:
            def __init__(self, n: int) -> None:
                self.left = n

            def readinto(self, view) -> int:
                n = min(len(view), self.left)
                self.left -= n
                return n

        t0 = time.perf_counter()
        s = connect(self.target)
        try:
            with s.open(name, size, create=True) as remote:
                r0, d0 = (proc_run_s(server_pid) if server_pid else 0.0), time.perf_counter()
                written = remote.write_from(Zeros(size), 0, size)
                remote.flush(0, size)
                data_s = time.perf_counter() - d0
                data_run = proc_run_s(server_pid) - r0 if server_pid else None
        finally:
            s.close()
        elapsed = time.perf_counter() - t0
        out = {"bytes": written, "seconds": round(elapsed, 3), "mib_s": round(written / MiB / elapsed, 2),
               "data_phase_s": round(data_s, 3), "native": s.conn.native}
        if data_run is not None:
            out["data_phase_server_run_s"] = round(data_run, 5)
        return out

    # -- registration cost --------------------------------------------------------------
    def grant_cost(self, sizes: list[int], reps: int, seconds: float) -> dict:
        """Grant (one ODP memory region over [0, size) of a sealed file) and Release, timed from the client."""
        s = self._connect(staging=MiB)
        t0 = time.perf_counter()
        seal_id = s.seal("bench-reg", max(sizes), create=True).seal_id
        seal_ms = (time.perf_counter() - t0) * 1e3
        floor = []
        for _ in range(50):
            t0 = time.perf_counter_ns()
            s.stub.Heartbeat(pb.HeartbeatRequest(session_id=s.session_id), timeout=30)
            floor.append(time.perf_counter_ns() - t0)
        points = []
        for size in sizes:
            g_ns, r_ns = [], []
            deadline = time.monotonic() + seconds
            while len(g_ns) < reps and (len(g_ns) < 3 or time.monotonic() < deadline):
                t0 = time.perf_counter_ns()
                grant = s.grant(seal_id, 0, size)
                t1 = time.perf_counter_ns()
                s.release(grant.grant_id)
                t2 = time.perf_counter_ns()
                g_ns.append(t1 - t0)
                r_ns.append(t2 - t1)
            g, r = summary_us(g_ns), summary_us(r_ns)
            points.append({"size": size, "samples": len(g_ns), "grant_ms_p50": round(g["p50_us"] / 1e3, 3),
                           "grant_ms_min": round(g["min_us"] / 1e3, 3), "grant_ms_max": round(g["max_us"] / 1e3, 3),
                           "release_ms_p50": round(r["p50_us"] / 1e3, 3)})
        s.unseal(seal_id)
        return {"seal_ms": round(seal_ms, 1), "seal_length": max(sizes),
                "rpc_floor_ms_p50": round(summary_us(floor)["p50_us"] / 1e3, 3), "points": points}

    # -- memory on the node (the driver reads its VmRSS between these) --------------------------
    def sessions_open(self, n: int) -> dict:
        for _ in range(n):
            self.extra_sessions.append(connect(self.target, staging=MiB, depth=4))
        return {"open": len(self.extra_sessions)}

    def sessions_close(self) -> dict:
        for s in self.extra_sessions:
            s.close()
        self.extra_sessions.clear()
        return {}

    def mem_prepare(self, file_length: int) -> dict:
        s = self._connect(staging=MiB)
        seal_id = s.seal("bench-mem", file_length, create=True).seal_id
        self.mem = (s, seal_id, file_length, [])
        return {}

    def grants_open(self, n: int, length: int) -> dict:
        s, seal_id, file_length, grants = self.mem
        for i in range(n):
            grants.append(s.grant(seal_id, (i * length) % file_length, length).grant_id)
        return {"open": len(grants)}

    def grants_close(self) -> dict:
        s, _seal_id, _length, grants = self.mem
        for g in grants:
            s.release(g)
        grants.clear()
        return {}

    # -- control plane -----------------------------------------------------------------------
    def control_plane(self, seconds: float, threads: int, max_ops: int) -> dict:
        s = self._connect(staging=MiB)
        return control.measure(SessionOps(s), "guest", seconds=seconds, max_ops=max_ops, threads=threads)

    # -- where the time goes ------------------------------------------------------------------
    def profile(self, seconds: float, size: int = 4 * KiB, depth: int = 64) -> dict:
        """cProfile of the bandwidth loop (size, depth) and of the write+flush latency loop."""
        out = {}
        for name, run in (("write_bw", lambda: self.write_bw(size, depth, seconds)),
                          ("write_flush_lat", lambda: self.latency("write_flush", size, 100_000, seconds))):
            prof = cProfile.Profile()
            prof.enable()
            figures = run()
            prof.disable()
            stats = pstats.Stats(prof)
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
            out[name] = {"figures": figures, "buckets_s": _buckets(stats), "top": text.getvalue()}
        return out

    def close(self) -> None:
        for s in self.extra_sessions + self.sessions:
            try:
                s.close()
            except Exception:  # noqa: BLE001 - closing at exit
                pass


# cProfile does not see calls into pyverbs (Cython): their time is the own time of the Python function
# that makes them, so the buckets go by caller.
BUCKETS = (
    ("posting: Connection._post_requests/_post_fitting/write_flush (incl. pyverbs wr_start/wr_rdma_write/"
     "wr_set_sge/wr_complete)", lambda f, fn: f.endswith("rdma/connection.py") and fn != "_retire"),
    ("completion wait: Connection._retire (CQEX start_poll busy loop, incl. time.monotonic)",
     lambda f, fn: (f.endswith("rdma/connection.py") and fn == "_retire") or "time.monotonic" in fn),
    ("logging.getLogger (pyverbs runs it per object it creates)", lambda f, fn: f.endswith("logging/__init__.py")),
    ("bench loop and Chunk construction", lambda f, fn: "tests/bench" in f or f == "<string>"),
    ("other threads: gRPC Watch/heartbeat of the sessions (wall time, mostly blocked, not CPU)",
     lambda f, fn: "grpc" in f or "threading.py" in f or "_thread" in fn),
)


def _buckets(stats: pstats.Stats) -> dict[str, float]:
    """Own time (tottime) of the profiled run, by what it was spent on. cProfile (Python >= 3.12) records
    every thread, so the sessions' background threads show up too, with their blocked time."""
    out = {name: 0.0 for name, _ in BUCKETS}
    out["other"] = 0.0
    for (filename, _line, func), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():
        key = next((name for name, match in BUCKETS if match(filename, func)), "other")
        out[key] += tottime
    return {k: round(v, 4) for k, v in out.items()}


def main() -> None:
    bench = Bench(sys.argv[1])
    print(json.dumps({"ok": True, "pid": os.getpid()}), flush=True)
    try:
        # Every failure goes back to the driver, with its trace.
        serve(bench, lambda exc: {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]})
    finally:
        bench.close()


if __name__ == "__main__":
    main()
