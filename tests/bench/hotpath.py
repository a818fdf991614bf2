"""Where a 4 KiB write+FLUSH's time goes: the bare pyverbs calls and the bare native call (rdma/fastpath)
against Connection.write_flush on either path and RemoteFile.write(flush=True), interleaved in one run (runs
far apart differ by 30 % and more).

    lab/run.sh 'python tests/bench/hotpath.py'

Starts an rdax-server in the storage namespace and runs itself again in the client namespace. Figures
only, like the rest of tests/bench: the gap between "bare" and "Connection.write_flush" is the Python the
library adds on the critical path.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from errno import ENOENT
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SIZE = 4096
# Many short rounds: the host's noise comes in bursts of seconds, and a variant's rounds must share them.
ROUNDS, PER_ROUND = 24, 50
# The walking variant writes page after page of this much, as versus.py's lat_4k does over its 32 MiB.
WALK = 32 << 20
# The pipelined A/B: BATCH 4 KiB writes and one FLUSH, up to the connection's depth in flight, per timed call.
BATCH, BATCH_ROUNDS = 512, 24


def tasks_run_ns(roles: dict[str, str]) -> dict[tuple[str, str], int]:
    """On-CPU nanoseconds of every task in the guest (kernel threads too), by (process, thread comm), the
    processes named by `roles` (pid -> name) or their comm: snapshots around a variant's rounds say what else
    ran while it did. The calling thread is left out: it reads all this, and otherwise times or spins.
    (Compared with each other only: the sum is not wall time.)"""
    me = str(threading.get_native_id())
    # this process's Python threads by their names (the OS knows them all as "python")
    named = {str(t.native_id): t.name.split(" ")[0] for t in threading.enumerate() if t.native_id}
    out: dict[tuple[str, str], int] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                pcomm = roles.get(pid) or f.read().strip()
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            if tid == me:
                continue
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    tcomm = named.get(tid) or f.read().strip()
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    ns = int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            # kworkers change names with their work; fold them (and per-CPU kernel threads) by prefix
            key = (pcomm.split("/")[0].split(":")[0] if pcomm.startswith(("kworker", "ksoftirqd", "migration"))
                   else pcomm, tcomm.split("/")[0].split(":")[0] if tcomm.startswith(("kworker", "ksoftirqd"))
                   else tcomm)
            out[key] = out.get(key, 0) + ns
    return out


def client(target: str, node_pid: int) -> None:
    import pyverbs.enums as e

    from rdax.client import connect
    from rdax.rdma import Chunk

    s = connect(target)
    f = s.open("hotpath", WALK)
    f.write(0, bytes(WALK), flush=True)   # fault the region in (ODP)
    conn, rkey, raddr = s.conn, f.grant.rkey, f.grant.remote_addr
    chunk = Chunk(s.staging.addr, s.staging.lkey, SIZE, rkey, raddr)
    qp, cq, sge, attr = conn.qp, conn.cq, conn._sge, conn._poll_attr
    signaled, persistent, ranged = e.IBV_SEND_SIGNALED, e.IBV_FLUSH_PERSISTENT, e.IBV_FLUSH_RANGE
    data = os.urandom(SIZE)

    def bare() -> None:
        """The fewest steps pyverbs allows: build WRITE + FLUSH, ring, spin on the extended CQ."""
        qp.wr_start()
        qp.wr_flags = 0
        qp.wr_rdma_write(rkey, raddr)
        sge.addr, sge.length, sge.lkey = chunk.laddr, SIZE, chunk.lkey
        qp.wr_set_sge(sge)
        qp.wr_id = 2
        qp.wr_flags = signaled
        qp.wr_flush(rkey, raddr, SIZE, persistent, ranged)
        qp.wr_complete()
        start = cq.start_poll
        while start(attr) == ENOENT:
            pass
        status = cq.status
        cq.end_poll()
        assert status == 0, status

    def bare_native(yield_mask: int | None = None, split: bool = False, pages: int = 1, keep_gil: bool = False):
        """rdax_fastpath.write_flush called directly: post both, spin (sched_yield every yield_mask + 1 polls),
        read the status."""
        mask = fastpath.YIELD_MASK if yield_mask is None else yield_mask
        at = iter(range(1 << 62))

        def run() -> None:
            off = raddr + next(at) % pages * SIZE
            status = fastpath.write_flush(qp, cq, chunk.laddr, chunk.lkey, SIZE, rkey, off, rkey, off, SIZE,
                                          10_000_000_000, 10_000_000_000, mask, split, keep_gil)
            assert status == 0, status
        return run

    def on(native: bool, op):
        def run() -> None:
            conn._native = native   # the same QP and CQ, either path (they share the connection's counters)
            op()
        return run

    write_flush = lambda: conn.write_flush([chunk], rkey, raddr, SIZE)   # noqa: E731
    pages = iter(range(1 << 62))

    def walking() -> None:
        """As versus.py's lat_4k does: each write to the next page of WALK bytes, a Chunk and a list built."""
        off = raddr + (next(pages) * SIZE) % WALK
        conn.write_flush([Chunk(s.staging.addr, s.staging.lkey, SIZE, rkey, off)], rkey, off, SIZE)
    file_write = lambda: f.write(0, data, flush=True)   # noqa: E731
    variants: dict[str, object] = {"bare pyverbs": bare,
                "Connection.write_flush (pyverbs)": on(False, write_flush),
                "RemoteFile.write (pyverbs)": on(False, file_write)}
    native = conn.native
    if native:
        import rdax_fastpath as fastpath
        variants.update({"bare native": bare_native(),
                         "bare native, never yields": bare_native(0xFFFFFFFF),
                         "bare native, pages 0-49": bare_native(pages=50),
                         "bare native, GIL kept": bare_native(keep_gil=True),
                         "a no-op native call (usable), timed alike": lambda: fastpath.usable(qp, cq),
                         "Connection.write_flush (native)": on(True, write_flush),
                         "Connection.write_flush (native), walking": on(True, walking),
                         "RemoteFile.write (native)": on(True, file_write)})
    else:
        print("hotpath: rdax_fastpath is not built or not usable here: the native variants are left out")
    # Variants whose rounds are timed in C: the round's samples (ns; none from librpma) and its p50 (us).
    in_c: dict[str, Callable[[], tuple[list[int], float]]] = {}
    if native and hasattr(fastpath, "write_flush_timed"):
        def c_loop(yield_mask: int, pages: int = 50):
            def run() -> tuple[list[int], float]:
                """rdax's verbs with no Python between them: fastpath's benchmark loop, as rpma_bench's."""
                ns = fastpath.write_flush_timed(qp, cq, chunk.laddr, chunk.lkey, SIZE, rkey, raddr, pages * SIZE,
                                                PER_ROUND, yield_mask)
                return ns, sorted(ns)[PER_ROUND // 2] / 1e3
            return run
        in_c["native loop in C, pages 0-49 (timed in C)"] = c_loop(fastpath.YIELD_MASK)
        in_c["native loop in C, never yields"] = c_loop(0xFFFFFFFF)
        in_c["native loop in C, page 0"] = c_loop(fastpath.YIELD_MASK, pages=1)
        variants.update(dict.fromkeys(in_c))
    rpma = None
    try:
        from versus import Librpma
        rpma = Librpma(dict(os.environ), Path("/tmp"), name="hotpath-rpma")
        in_c["librpma (C), pages 0-49"] = lambda: ([], rpma.run(SIZE, 1, PER_ROUND)["p50_us"])
        variants["librpma (C), pages 0-49"] = None
    except (OSError, RuntimeError) as exc:   # (a diagnostic: the rdax variants still say something without it)
        print(f"hotpath: no librpma anchor ({exc})")
    roles = {str(os.getpid()): "client", str(node_pid): "node"}
    clock = time.perf_counter_ns

    def measure(names: list[str], title: str) -> None:
        samples: dict[str, list[int]] = {name: [] for name in names}
        round_p50: dict[str, list[float]] = {name: [] for name in names}
        used: dict[str, dict[tuple[str, str], int]] = {name: {} for name in names}
        wall = dict.fromkeys(names, 0)
        for _ in range(ROUNDS):
            for name in names:
                op = variants[name]
                if op is not None:
                    for _ in range(10):
                        op()
                before, w0 = tasks_run_ns(roles), clock()
                if op is None:
                    got, p50 = in_c[name]()
                    samples[name] += got
                    round_p50[name].append(p50)
                else:
                    mine = []
                    for _ in range(PER_ROUND):
                        t0 = clock()
                        op()
                        mine.append(clock() - t0)
                    samples[name] += mine
                    round_p50[name].append(sorted(mine)[PER_ROUND // 2] / 1e3)
                wall[name] += clock() - w0
                for key, ns in tasks_run_ns(roles).items():
                    if ns > before.get(key, 0):
                        used[name][key] = used[name].get(key, 0) + ns - before.get(key, 0)
        print(f"{title}: {SIZE} B write + FLUSH(persistent), {ROUNDS} interleaved rounds of {PER_ROUND},"
              " microseconds (p50/round: the median of the rounds' p50s)")
        for name, v in samples.items():
            v.sort()
            r = sorted(round_p50[name])
            pooled = (f"p10 {v[len(v) // 10] / 1e3:7.1f}  p50 {v[len(v) // 2] / 1e3:7.1f}"
                      f"  p90 {v[9 * len(v) // 10] / 1e3:7.1f}") if v else f"{'':38s}"
            print(f"  {name:42s} {pooled}  p50/round {r[len(r) // 2]:7.1f}")
        print(f"{title}: on-CPU time of the guest's tasks (but the timing thread) while each variant ran, the busiest,"
              " % of the variant's wall time (2 vCPUs: 200 %)")
        for name, u in used.items():
            top = sorted(u.items(), key=lambda kv: -kv[1])[:10]
            print(f"  {name}: all {100 * sum(u.values()) / max(wall[name], 1):.0f}: "
                  + ", ".join(f"{p}/{t} {100 * ns / max(wall[name], 1):.1f}" for (p, t), ns in top))

    measure(list(variants), "node running")
    # Pipelined: BATCH 4 KiB writes through one grant and a FLUSH of them all, Connection.write_flush on either
    # path, the paths alternating call by call.
    region = min(f.length, BATCH * SIZE)   # (a region the batches rewrite)
    batch = [Chunk(s.staging.addr + (i * SIZE) % s.staging.length, s.staging.lkey, SIZE, rkey,
                   raddr + (i * SIZE) % region) for i in range(BATCH)]
    rates: dict[bool, list[float]] = {True: [], False: []} if native else {False: []}
    for _ in range(BATCH_ROUNDS):
        for path in rates:
            conn._native = path
            t0 = clock()
            conn.write_flush(batch, rkey, raddr, region)
            rates[path].append(BATCH * SIZE / 2**20 / ((clock() - t0) / 1e9))
    print(f"{BATCH} x {SIZE} B writes + one FLUSH, depth {conn.depth}, {BATCH_ROUNDS} alternating calls, MiB/s")
    for path, v in rates.items():
        v.sort()
        print(f"  Connection.write_flush ({'native' if path else 'pyverbs'}){'':8s} p10 {v[len(v) // 10]:7.1f}"
              f"  p50 {v[len(v) // 2]:7.1f}  p90 {v[9 * len(v) // 10]:7.1f}")
    conn._native = native
    # The node has no part in the data path: with it stopped (SIGSTOP), what is left is the client, the
    # kernel's rxe and the librpma anchor. (Connection-level variants only: the session's RPCs stall.)
    frozen = [n for n in ("bare native", "bare native, GIL kept", "native loop in C, pages 0-49 (timed in C)",
                          "native loop in C, page 0", "a no-op native call (usable), timed alike",
                          "Connection.write_flush (native)", "librpma (C), pages 0-49") if n in variants]
    os.kill(node_pid, signal.SIGSTOP)
    try:
        measure(frozen, "node stopped")
    finally:
        os.kill(node_pid, signal.SIGCONT)
    if rpma is not None:
        rpma.close()
    # (The node, stopped, missed the session's heartbeats: it may have ended the session by now.)
    try:
        f.close()
    finally:
        s.close()


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--client":
        client(sys.argv[2], int(sys.argv[3]))
        return 0
    from run import Server   # the bench driver's rdax-server in the storage namespace

    lab = dict(os.environ)
    if lab.get("RDAX_LAB") != "1":
        print("hotpath: run it in the lab: lab/run.sh 'python tests/bench/hotpath.py'", file=sys.stderr)
        return 2
    root = Path(lab["RDAX_DAX_MOUNT"]) / "hotpath"
    root.mkdir(exist_ok=True)
    server = Server(lab, root, Path("/tmp/hotpath-server.log"))
    try:
        from pki import client_env
        return subprocess.call(["ip", "netns", "exec", lab["RDAX_CLIENT_NS"], sys.executable, __file__,
                                "--client", server.target, str(server.pid)], env=client_env(server.pki))
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
