"""`make bench`: rdax against perftest on the lab's rxe devices, one run, one report (results/bench.json).

Runs in the lab guest's root namespace and drives both sides itself:

    python tests/bench/run.py --out results/bench.json

1. perftest baselines: ib_write_bw (4 KiB .. 4 MiB) and ib_write_lat (64 B, 4 KiB, 64 KiB), server in the
   storage namespace, client in the client namespace, IPv4 RoCE v2 GIDs.
2. rdax-server in the storage namespace (export root on the DAX mount), tests/bench/rdax_peer.py in the
   client namespace: write bandwidth at queue depth 1/8/64, write+FLUSH latency, Grant cost against size,
   node memory per session and per grant, control-plane latency and throughput, a cProfile of the loops.
3. Ratios to the perftest twins, results/bench.json, a plain table on stdout.

Every step is bounded (--budget seconds in all; each call has its own timeout): a step that would not fit
is skipped and listed under "problems". Exit status 0 when the three headline ratios could be computed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from perftest import Perftest, Side, roce_v2_ipv4_gid_index  # noqa: E402
from report import attach_ratios, size_label, table  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
BW_SIZES = [4 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB]
# ib_write_bw iterations: 16 MiB at 4 KiB, 64 MiB from 64 KiB up (tx depth is min(128, iters)).
BW_ITERS = {4 * KiB: 4096, 64 * KiB: 1024, 256 * KiB: 256, MiB: 64, 4 * MiB: 16}
LAT_SIZES = [64, 4 * KiB, 64 * KiB]   # 64 KiB has no perftest twin in the brief; it is cheap, so it gets one
LAT_ITERS = 1000
DEPTHS = [1, 8, 64]
GRANT_SIZES = [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB]
PORT = 7790

WHERE_GUEST = ("lab guest: qemu TCG (software-emulated CPU, 2 vCPUs), soft-RoCE (rxe) on a veth pair, "
               "MTU 9000 / path MTU 4096, client namespace -> storage namespace")


T0 = time.monotonic()


def say(what: str) -> None:
    print(f"[{time.monotonic() - T0:5.0f} s] bench: {what}", flush=True)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class Problems(list):
    def note(self, what: str) -> None:
        say(what)
        self.append(what)


def rss(pid: int) -> dict[str, int]:
    """VmRSS and its parts, in KiB, from /proc/<pid>/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "Threads"):
                out[key + ("" if key == "Threads" else "_kib")] = int(value.split()[0])
    out["file_shmem_kib"] = out.get("RssFile_kib", 0) + out.get("RssShmem_kib", 0)
    return out


class Server:
    """rdax-server in the storage namespace, exporting a directory on the DAX mount."""

    def __init__(self, lab: dict, root: Path, log: Path, timeout: float = 120) -> None:
        self.target = f"{lab['RDAX_STORAGE_IP']}:{PORT}"
        self.log = open(log, "w+")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab["RDAX_STORAGE_NS"], sys.executable, "-m", "rdax.service.cli",
             "--root", str(root), "--listen", self.target, "--device", lab["RDAX_STORAGE_DEV"]],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            self.log.seek(0)
            text = self.log.read()
            if "listening on" in text:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"rdax-server did not start (exit {self.proc.poll()}):\n{text[-2000:]}")
            time.sleep(0.2)
        self.pid = self._server_pid()

    def _server_pid(self) -> int:
        # `ip netns exec` execs the command in place; check, and look one level down if it did not.
        with open(f"/proc/{self.proc.pid}/cmdline", "rb") as f:
            if b"rdax.service.cli" in f.read():
                return self.proc.pid
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            return int(f.read().split()[0])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class PeerError(RuntimeError):
    pass


class Peer:
    """tests/bench/rdax_peer.py in the client namespace; call() answers within its timeout or raises."""

    def __init__(self, lab: dict, target: str, log: Path, timeout: float = 90) -> None:
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab["RDAX_CLIENT_NS"], sys.executable, str(HERE / "rdax_peer.py"), target],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self._buf = b""
        self._read(timeout)

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerError(f"no answer from the rdax peer within {timeout:.0f} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise PeerError(f"the rdax peer exited ({self.proc.wait()}); see its log")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def call(self, op: str, timeout: float, **args) -> dict:
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        self.proc.stdin.flush()
        reply = self._read(timeout)
        if not reply.pop("ok"):
            self.log.write(reply.get("trace", "") + "\n")
            self.log.flush()
            raise PeerError(f"{op}({args}): {reply['error']}")
        return reply

    def close(self) -> None:
        try:
            self.proc.stdin.write(b'{"op": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# -- the steps ---------------------------------------------------------------------------
def run_perftest(doc: dict, lab: dict, args, budget: Budget, problems: Problems, logs: Path) -> None:
    storage = Side(lab["RDAX_STORAGE_NS"], lab["RDAX_STORAGE_DEV"], roce_v2_ipv4_gid_index(lab["RDAX_STORAGE_DEV"]))
    client = Side(lab["RDAX_CLIENT_NS"], lab["RDAX_CLIENT_DEV"], roce_v2_ipv4_gid_index(lab["RDAX_CLIENT_DEV"]))
    version = subprocess.run(["ib_write_bw", "--version"], capture_output=True, text=True).stdout.strip()
    pt = doc["perftest"] = {"version": version, "gid_index": {storage.device: storage.gid_index,
                                                              client.device: client.gid_index},
                            "where": WHERE_GUEST, "write_bw": [], "write_bw_odp": [], "write_lat": []}
    with open(logs / "perftest.log", "w") as log:
        runner = Perftest(storage, client, lab["RDAX_STORAGE_IP"], log)
        for size in BW_SIZES:
            iters = max(16, BW_ITERS[size] // args.scale)
            if budget.left() < 60:
                problems.note(f"perftest ib_write_bw {size_label(size)} skipped: out of time")
                continue
            try:
                row = runner.run("ib_write_bw", size, iters)
                pt["write_bw"].append(row)
                say(f"ib_write_bw {size_label(size):>7}: {row['bw_mib_s']:.1f} MiB/s")
            except Exception as exc:  # noqa: BLE001 - a missing baseline is reported, not fatal
                problems.note(f"ib_write_bw {size_label(size)}: {exc}")
        # The same, with the target buffer registered ON_DEMAND as rdax's grants are (anonymous memory, not
        # DAX): tells the cost of ODP in rxe's responder apart from the cost of rdax.
        for size in BW_SIZES:
            iters = max(16, BW_ITERS[size] // args.scale)
            if budget.left() < 60 or args.no_odp_baseline:
                continue
            try:
                row = runner.run("ib_write_bw", size, iters, ["--odp"])
                pt["write_bw_odp"].append(row)
                say(f"ib_write_bw --odp {size_label(size):>7}: {row['bw_mib_s']:.1f} MiB/s")
            except Exception as exc:  # noqa: BLE001
                problems.note(f"ib_write_bw --odp {size_label(size)} (supplementary): {exc}")
        for size in LAT_SIZES:
            if budget.left() < 60:
                problems.note(f"perftest ib_write_lat {size_label(size)} skipped: out of time")
                continue
            try:
                row = runner.run("ib_write_lat", size, max(100, LAT_ITERS // args.scale))
                pt["write_lat"].append(row)
                say(f"ib_write_lat {size_label(size):>7}: p50 {row['p50_us']:.1f} us, "
                    f"p99 {row['p99_us']:.1f} us")
            except Exception as exc:  # noqa: BLE001
                problems.note(f"ib_write_lat {size_label(size)}: {exc}")
    pt["note"] = ("ib_write_bw: sender-side average MiB/s, tx depth min(128, iters), one QP; write_bw_odp: the "
                  "same with --odp (both buffers ON_DEMAND), a supplementary baseline, not a twin; ib_write_lat: "
                  "t_typical (median) and 99% percentile of half a ping-pong round trip")


def run_rdax(doc: dict, lab: dict, args, budget: Budget, problems: Problems, logs: Path) -> None:
    root = Path(lab["RDAX_DAX_MOUNT"]) / "bench"
    root.mkdir(exist_ok=True)
    rdax = doc["rdax"] = {"where": WHERE_GUEST + "; rdax-server exporting " + str(root) + " (XFS dax=always)",
                          "write_bw": [], "api_write_bw": [], "first_touch": [], "write_flush_lat": [],
                          "write_lat": [], "api_write_then_flush_lat": []}
    server = Server(lab, root, logs / "server.log")
    say(f"rdax-server listening on {server.target} (pid {server.pid})")
    peer = None
    try:
        time.sleep(1.0)
        idle = rss(server.pid)
        peer = Peer(lab, server.target, logs / "peer.log")
        say("rdax peer up in the client namespace")
        secs = args.seconds

        def call(op: str, need: float, **kw) -> dict | None:
            if budget.left() < need:
                problems.note(f"{op}({kw}) skipped: out of time ({budget.left():.0f} s left)")
                return None
            try:
                return peer.call(op, timeout=max(need * 4, 60), **kw)
            except PeerError as exc:
                problems.note(str(exc))
                if peer.proc.poll() is not None or "within" in str(exc):
                    raise
                return None

        for depth in DEPTHS:
            row = call("open_bw", 30, depth=depth)
            if row:
                rdax["first_touch"].append(row)
                say(f"rdax qd{depth}: first pass over a fresh 32 MiB grant {row['first_pass_mib_s']:.1f} MiB/s, "
                    f"second {row['second_pass_mib_s']:.1f} MiB/s")
        for size in BW_SIZES:
            for depth in DEPTHS:
                if depth in {r["depth"] for r in rdax["first_touch"]}:
                    row = call("write_bw", secs * 3 + 10, size=size, depth=depth, seconds=secs)
                    if row:
                        rdax["write_bw"].append(row)
                        say(f"rdax write {size_label(size):>7} qd{depth:<2}: {row['bw_mib_s']:.1f} MiB/s")
            if 64 in {r["depth"] for r in rdax["first_touch"]}:
                row = call("api_write_bw", secs * 2 + 10, size=size, seconds=secs, depth=64)
                if row:
                    rdax["api_write_bw"].append(row)
        for mode, key in (("write_flush", "write_flush_lat"), ("write", "write_lat"),
                          ("api_write_then_flush", "api_write_then_flush_lat")):
            for size in LAT_SIZES:
                row = call("latency", secs * 2 + 15, mode=mode, size=size, iters=args.lat_iters, seconds=secs)
                if row:
                    rdax[key].append(row)
                    say(f"rdax {mode} {size_label(size):>7}: p50 {row['p50_us']:.1f} us, "
                        f"p99 {row['p99_us']:.1f} us")

        cost = call("grant_cost", 60, sizes=GRANT_SIZES, reps=args.grant_reps, seconds=secs)
        if cost:
            cost["where"] = rdax["where"] + "; timed in the client around the RPC"
            rdax["grant_cost"] = cost
            points = ", ".join(f"{size_label(p['size'])} {p['grant_ms_p50']} ms" for p in cost["points"])
            say(f"Grant p50 by size: {points}")

        mem = rdax["server_memory"] = {"idle_kib": idle.get("VmRSS_kib"), "idle": idle, "pid": server.pid}
        mem["after_writes"] = rss(server.pid)
        before = rss(server.pid)
        if call("sessions_open", 60, n=args.mem_sessions) is not None:
            time.sleep(1.0)
            after = rss(server.pid)
            delta = after["VmRSS_kib"] - before["VmRSS_kib"]
            mem["per_session"] = {"count": args.mem_sessions, "delta_kib": delta,
                                  "kib_each": round(delta / args.mem_sessions, 1), "before": before, "after": after,
                                  "detail": "PD + RC QP + CQ on rxe_storage, a Watch stream (one server thread)"}
            call("sessions_close", 60)
            time.sleep(1.0)
            mem["per_session"]["after_close"] = rss(server.pid)
            say(f"node VmRSS per session: {mem['per_session']['kib_each']} KiB")
        if call("mem_prepare", 60, file_length=64 * MiB) is not None:
            for length in (MiB, 64 * MiB):
                before = rss(server.pid)
                if call("grants_open", 60, n=args.mem_grants, length=length) is None:
                    continue
                time.sleep(1.0)
                after = rss(server.pid)
                delta = after["VmRSS_kib"] - before["VmRSS_kib"]
                key = "per_grant" if length == MiB else "per_grant_64mib"
                mem[key] = {"count": args.mem_grants, "grant_length": length, "delta_kib": delta,
                            "kib_each": round(delta / args.mem_grants, 1), "before": before, "after": after,
                            "detail": f"{size_label(length)} ODP memory regions over one sealed 64 MiB file, "
                                      f"not yet written through"}
                say(f"node VmRSS per {size_label(length)} grant: {mem[key]['kib_each']} KiB")
                call("grants_close", 60)
        mem["where"] = rdax["where"] + "; VmRSS etc. from /proc/<rdax-server pid>/status"

        cp = call("control_plane", secs * 8 + 30, seconds=secs, threads=4, max_ops=args.cp_max_ops)
        if cp:
            cp["where"] = WHERE_GUEST + "; rdax.client Session -> rdax-server over gRPC/TCP, real ODP registration"
            rdax["control_plane"] = {"guest": cp}
            say("control plane: " + ", ".join(f"{op} p50 {v['p50_us'] / 1e3:.1f} ms"
                                              for op, v in cp["latency"].items()))

        prof = call("profile", secs * 4 + 30, seconds=secs)
        if prof:
            with open(logs / "profile.txt", "w") as f:
                for name, p in prof.items():
                    f.write(f"== {name}: {json.dumps(p['figures'])}\n{p['top']}\n")
            doc["profile"] = {name: {"figures": p["figures"], "own_time_s": p["buckets_s"]}
                              for name, p in prof.items()}
            doc["profile"]["where"] = "cProfile in the client process (slows the loop down; read the shares)"
            doc["profile"]["full_text"] = str(logs / "profile.txt")
    except PeerError:
        pass   # already noted; write what there is
    finally:
        if peer is not None:
            peer.close()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/bench.json")
    parser.add_argument("--budget", type=float, default=540, help="seconds for everything (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=2.0, help="per bandwidth/latency point (default %(default)s)")
    parser.add_argument("--scale", type=int, default=1, help="divide perftest iterations by this (smoke runs)")
    parser.add_argument("--lat-iters", type=int, default=500)
    parser.add_argument("--grant-reps", type=int, default=7)
    parser.add_argument("--mem-sessions", type=int, default=16)
    parser.add_argument("--mem-grants", type=int, default=64)
    parser.add_argument("--cp-max-ops", type=int, default=200)
    parser.add_argument("--skip-perftest", action="store_true")
    parser.add_argument("--no-odp-baseline", action="store_true", help="skip ib_write_bw --odp")
    args = parser.parse_args(argv)

    lab = dict(os.environ)
    if lab.get("RDAX_LAB") != "1":
        print("bench: not inside the rdax lab guest: run `make bench` (or lab/run.sh 'python tests/bench/run.py')",
              file=sys.stderr)
        return 2
    if lab.get("RDAX_LAB_ERRORS"):
        print(f"bench: the lab could not provide its devices: {lab['RDAX_LAB_ERRORS']}", file=sys.stderr)
        return 2
    out = Path(args.out)
    logs = out.parent / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    budget = Budget(args.budget)
    problems = Problems()
    doc: dict = {
        "schema": "rdax-bench/1",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "guest": {"kernel": platform.release(), "python": platform.python_version(), "cpus": os.cpu_count(),
                  "loadavg_start": open("/proc/loadavg").read().split()[:3]},
        "config": {k: v for k, v in vars(args).items()},
        "units": {"bw": "MiB/s (2^20 bytes per second)", "latency": "microseconds", "memory": "KiB",
                  "size": "bytes"},
    }
    if not args.skip_perftest:
        run_perftest(doc, lab, args, budget, problems, logs)
    try:
        run_rdax(doc, lab, args, budget, problems, logs)
    except Exception as exc:  # noqa: BLE001 - keep the baselines and whatever rdax figures there are
        problems.note(f"rdax: {type(exc).__name__}: {exc}")
    attach_ratios(doc)
    doc["guest"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    doc["elapsed_s"] = round(time.monotonic() - started, 1)
    doc["problems"] = list(problems)
    doc["logs"] = str(logs)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print()
    print(table(doc))
    print(f"\nbench: wrote {out} in {doc['elapsed_s']:.0f} s")
    r = doc["ratios"]
    return 0 if all(r.get(k) is not None for k in ("write_bw_ge_256k", "write_bw_4k", "write_flush_lat_4k_p50")) else 1


if __name__ == "__main__":
    sys.exit(main())
