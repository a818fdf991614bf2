"""`make bench`: rdax against perftest on the lab's rxe devices, one run, one report (results/bench.json).

Runs in the lab guest's root namespace and drives both sides itself:

    python tests/bench/run.py --out results/bench.json

1. rdax-server in the storage namespace (export root on the DAX mount), tests/bench/rdax_peer.py in the
   client namespace, and perftest pairs (server in the storage namespace, client in the client namespace,
   IPv4 RoCE v2 GIDs), measured side by side in time so that both see the same host:
   - write bandwidth, 4 KiB .. 4 MiB, in --rounds rounds of: ib_write_bw, ib_write_bw --odp, rdax at queue
     depth 1/8/64, RemoteFile.write; the figures are the medians over rounds;
   - latency, 64 B / 4 KiB / 64 KiB: ib_write_lat, then rdax write+FLUSH, write, RemoteFile.write(flush=True);
2. the anchors (tests/bench/versus.py): rdax, librpma (our C program against librpma 1.3) and NFS v4.2 over
   RDMA (knfsd/svcrdma, fio) run the same durable-write workloads in --blocks interleaved blocks; every ratio is
   the median of its per-block ratios; then the storage side's CPU per GiB during a put;
3. rdax alone: Grant cost against size, node memory per session and per grant, control-plane latency and
   throughput, revocation latency, the scale of one node (tests/bench/scale.py: Grant, revocation and the audit
   against the work it holds), a cProfile of the client loops.
4. Ratios to the perftest twins and to the anchors, results/bench.json, a plain table on stdout.

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
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "lab"))

from perftest import Perftest, Side, roce_v2_ipv4_gid_index  # noqa: E402
from pki import client_env, make_pki, server_args  # noqa: E402  (the lab's mTLS material and policy)
from report import attach_ratios, size_label, table  # noqa: E402
import versus as versus_mod  # noqa: E402  (the anchors: librpma and NFS over RDMA)
import scale as scale_mod  # noqa: E402  (scale of one node: Grant, revocation and audit against the work held)

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


def lab_pki(lab: dict) -> dict:
    """The lab's throwaway CA, certificates and policy (tests/lab/pki.py): the bench talks mTLS like any client."""
    return make_pki(Path("/run/rdax-lab-pki"), [lab["RDAX_STORAGE_IP"], "127.0.0.1"])


class Server:
    """rdax-server in the storage namespace, exporting a directory on the DAX mount."""

    def __init__(self, lab: dict, root: Path, log: Path, timeout: float = 120) -> None:
        self.target = f"{lab['RDAX_STORAGE_IP']}:{PORT}"
        self.log = open(log, "w+")
        self.pki = lab_pki(lab)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab["RDAX_STORAGE_NS"], sys.executable, "-m", "rdax.service.cli",
             "--root", str(root), "--listen", self.target, "--device", lab["RDAX_STORAGE_DEV"],
             *server_args(self.pki, log.with_suffix(".audit.jsonl"))],
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
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=client_env(lab_pki(lab)))
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
def median_row(rounds: list[dict], key: str) -> dict:
    """The first round's row with `key` replaced by the median over rounds, and every round kept."""
    values = [r[key] for r in rounds if r.get(key) is not None]
    out = {**rounds[0], key: round(statistics.median(values), 2) if values else None,
           f"{key}_rounds": values, "rounds": rounds}
    return out


class Run:
    """One bench run: the perftest runner, rdax-server and the rdax peer, and the document they fill."""

    def __init__(self, doc: dict, lab: dict, args, budget: Budget, problems: Problems, logs: Path) -> None:
        self.doc, self.lab, self.args, self.budget, self.problems, self.logs = doc, lab, args, budget, problems, logs
        self.secs = args.seconds
        self.peer: Peer | None = None

    # perftest ----------------------------------------------------------------------------
    def perftest_setup(self) -> None:
        lab = self.lab
        storage = Side(lab["RDAX_STORAGE_NS"], lab["RDAX_STORAGE_DEV"],
                       roce_v2_ipv4_gid_index(lab["RDAX_STORAGE_DEV"]))
        client = Side(lab["RDAX_CLIENT_NS"], lab["RDAX_CLIENT_DEV"], roce_v2_ipv4_gid_index(lab["RDAX_CLIENT_DEV"]))
        version = subprocess.run(["ib_write_bw", "--version"], capture_output=True, text=True).stdout.strip()
        self.doc["perftest"] = {
            "version": version, "gid_index": {storage.device: storage.gid_index, client.device: client.gid_index},
            "where": WHERE_GUEST, "write_bw": [], "write_bw_odp": [], "write_lat": [],
            "note": "ib_write_bw: sender-side average MiB/s, tx depth min(128, iters), one QP, -F; write_bw_odp: "
                    "the same with --odp (buffers registered ON_DEMAND, as rdax's grants are), a supplementary "
                    "baseline, not a twin; ib_write_lat: t_typical (median) and 99% percentile of half a "
                    "ping-pong round trip. rdax-server and the rdax peer sit idle meanwhile (about 2 % of a vCPU)"}
        self.perftest_log = open(self.logs / "perftest.log", "w")
        self.runner = Perftest(storage, client, lab["RDAX_STORAGE_IP"], self.perftest_log)

    def perftest(self, tool: str, size: int, iters: int, extra: list[str] | None = None) -> dict | None:
        label = f"{tool}{' ' + ' '.join(extra) if extra else ''} {size_label(size)}"
        if self.budget.left() < 60:
            self.problems.note(f"{label} skipped: out of time")
            return None
        try:
            row = self.runner.run(tool, size, iters, extra)
        except Exception as exc:  # noqa: BLE001 - a missing baseline is reported, not fatal
            self.problems.note(f"{label}: {exc}")
            return None
        if "bw" in tool:
            say(f"{label:>26}: {row['bw_mib_s']:.1f} MiB/s")
        else:
            say(f"{label:>26}: p50 {row['p50_us']:.1f} us, p99 {row['p99_us']:.1f} us")
        return row

    # rdax ---------------------------------------------------------------------------------
    def rdax_setup(self) -> None:
        root = Path(self.lab["RDAX_DAX_MOUNT"]) / "bench"
        root.mkdir(exist_ok=True)
        self.rdax = self.doc["rdax"] = {
            "where": WHERE_GUEST + "; rdax-server exporting " + str(root) + " (XFS dax=always)",
            "write_bw": [], "api_write_bw": [], "first_touch": [], "write_flush_lat": [], "write_lat": [],
            "api_write_flush_lat": []}
        self.server = Server(self.lab, root, self.logs / "server.log")
        say(f"rdax-server listening on {self.server.target} (pid {self.server.pid})")
        time.sleep(1.0)
        self.idle = rss(self.server.pid)
        self.peer = Peer(self.lab, self.server.target, self.logs / "peer.log")
        say("rdax peer up in the client namespace")

    def call(self, op: str, need: float, **kw) -> dict | None:
        """One peer call, if `need` seconds are left; a failed call is noted and answers None."""
        if self.peer is None:
            return None
        if self.budget.left() < need:
            self.problems.note(f"{op}({kw}) skipped: out of time ({self.budget.left():.0f} s left)")
            return None
        try:
            return self.peer.call(op, timeout=max(need * 4, 60), **kw)
        except PeerError as exc:
            self.problems.note(str(exc))
            if self.peer.proc.poll() is not None or "within" in str(exc):
                raise   # the peer is gone or stuck: nothing more from it
            return None

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
        if getattr(self, "server", None) is not None:
            self.server.stop()
        if getattr(self, "perftest_log", None) is not None:
            self.perftest_log.close()

    # the plan ------------------------------------------------------------------------------
    def bandwidth(self) -> None:
        """Rounds of: per size, ib_write_bw, ib_write_bw --odp, rdax at each depth, RemoteFile.write — side by
        side in time, so that both see the same host; the medians over rounds are the figures."""
        args, secs = self.args, self.secs
        for depth in DEPTHS:
            row = self.call("open_bw", 30, depth=depth)
            if row:
                self.rdax["first_touch"].append(row)
                say(f"rdax qd{depth}: first pass over a fresh 32 MiB grant {row['first_pass_mib_s']:.1f} MiB/s, "
                    f"second {row['second_pass_mib_s']:.1f} MiB/s")
        depths = [r["depth"] for r in self.rdax["first_touch"]]
        pt, odp, rd, api = {}, {}, {}, {}
        for rnd in range(args.rounds):
            say(f"bandwidth round {rnd + 1} of {args.rounds}")
            for size in BW_SIZES:
                iters = max(16, BW_ITERS[size] // args.scale)
                if (row := self.perftest("ib_write_bw", size, iters)) is not None:
                    pt.setdefault(size, []).append(row)
                if not args.no_odp_baseline and (row := self.perftest("ib_write_bw", size, iters, ["--odp"])):
                    odp.setdefault(size, []).append(row)
                for depth in depths:
                    if row := self.call("write_bw", secs * 3 + 10, size=size, depth=depth, seconds=secs):
                        rd.setdefault((size, depth), []).append(row)
                        say(f"{f'rdax qd{depth} {size_label(size)}':>26}: {row['bw_mib_s']:.1f} MiB/s")
                if 64 in depths and (row := self.call("api_write_bw", secs * 2 + 10, size=size, seconds=secs)):
                    api.setdefault(size, []).append(row)
                    say(f"{f'RemoteFile.write {size_label(size)}':>26}: {row['bw_mib_s']:.1f} MiB/s")
        self.doc["perftest"]["write_bw"] = [median_row(pt[s], "bw_mib_s") for s in BW_SIZES if s in pt]
        self.doc["perftest"]["write_bw_odp"] = [median_row(odp[s], "bw_mib_s") for s in BW_SIZES if s in odp]
        self.rdax["write_bw"] = [median_row(rd[k], "bw_mib_s") for k in sorted(rd)]
        self.rdax["api_write_bw"] = [median_row(api[s], "bw_mib_s") for s in BW_SIZES if s in api]

    def latency(self) -> None:
        """Per size: ib_write_lat, then rdax write+flush, write, RemoteFile.write(flush=True)."""
        args = self.args
        for size in LAT_SIZES:
            iters = max(100, (LAT_ITERS if size <= 4 * KiB else LAT_ITERS // 2) // args.scale)
            if (row := self.perftest("ib_write_lat", size, iters)) is not None:
                self.doc["perftest"]["write_lat"].append(row)
            for mode, key in (("write_flush", "write_flush_lat"), ("write", "write_lat"),
                              ("api_write_flush", "api_write_flush_lat")):
                row = self.call("latency", self.secs * 2 + 15, mode=mode, size=size, iters=args.lat_iters,
                                seconds=self.secs)
                if row:
                    self.rdax[key].append(row)
                    say(f"{f'rdax {mode} {size_label(size)}':>26}: p50 {row['p50_us']:.1f} us, "
                        f"p99 {row['p99_us']:.1f} us")

    def registration(self) -> None:
        cost = self.call("grant_cost", 60, sizes=GRANT_SIZES, reps=self.args.grant_reps, seconds=self.secs)
        if cost:
            cost["where"] = self.rdax["where"] + "; timed in the client around the RPC"
            self.rdax["grant_cost"] = cost
            points = ", ".join(f"{size_label(p['size'])} {p['grant_ms_p50']} ms" for p in cost["points"])
            say(f"Grant p50 by size: {points}")

    def memory(self) -> None:
        if self.peer is None:
            return
        args, pid = self.args, self.server.pid
        mem = self.rdax["server_memory"] = {"idle_kib": self.idle.get("VmRSS_kib"), "idle": self.idle, "pid": pid,
                                            "after_writes": rss(pid)}
        before = rss(pid)
        if self.call("sessions_open", 60, n=args.mem_sessions) is not None:
            time.sleep(1.0)
            after = rss(pid)
            delta = after["VmRSS_kib"] - before["VmRSS_kib"]
            mem["per_session"] = {"count": args.mem_sessions, "delta_kib": delta,
                                  "kib_each": round(delta / args.mem_sessions, 1), "before": before, "after": after,
                                  "detail": "PD + RC QP + CQ on rxe_storage, a Watch stream (one server thread)"}
            self.call("sessions_close", 60)
            time.sleep(1.0)
            mem["per_session"]["after_close"] = rss(pid)
            say(f"node VmRSS per session: {mem['per_session']['kib_each']} KiB")
        if self.call("mem_prepare", 60, file_length=64 * MiB) is not None:
            for length in (MiB, 64 * MiB):
                before = rss(pid)
                if self.call("grants_open", 60, n=args.mem_grants, length=length) is None:
                    continue
                time.sleep(1.0)
                after = rss(pid)
                delta = after["VmRSS_kib"] - before["VmRSS_kib"]
                key = "per_grant" if length == MiB else "per_grant_64mib"
                mem[key] = {"count": args.mem_grants, "grant_length": length, "delta_kib": delta,
                            "kib_each": round(delta / args.mem_grants, 1), "before": before, "after": after,
                            "detail": f"{size_label(length)} ODP memory regions over one sealed 64 MiB file, "
                                      f"not yet written through"}
                say(f"node VmRSS per {size_label(length)} grant: {mem[key]['kib_each']} KiB")
                self.call("grants_close", 60)
        mem["where"] = self.rdax["where"] + "; VmRSS etc. from /proc/<rdax-server pid>/status"

    def control_plane(self) -> None:
        cp = self.call("control_plane", self.secs * 8 + 30, seconds=self.secs, threads=4,
                       max_ops=self.args.cp_max_ops)
        if cp:
            cp["where"] = WHERE_GUEST + "; rdax.client Session -> rdax-server over gRPC/TCP, real ODP registration"
            self.rdax["control_plane"] = {"guest": cp}
            say("control plane: " + ", ".join(f"{op} p50 {v['p50_us'] / 1e3:.1f} ms"
                                              for op, v in cp["latency"].items()))

    def revocation(self) -> None:
        """Breaker syscall -> registrations invalidated / client notified (tests/bench/revocation.py)."""
        if self.budget.left() < 90:
            self.problems.note("revocation latency skipped: out of time")
            return
        out = self.logs / "revocation.json"
        run = subprocess.run(["ip", "netns", "exec", self.lab["RDAX_STORAGE_NS"], sys.executable,
                              str(Path(__file__).with_name("revocation.py")), "--trials", "20", "--out", str(out)],
                             capture_output=True, text=True, timeout=max(60, self.budget.left()))
        if run.returncode != 0:
            self.problems.note(f"revocation latency failed: {run.stderr.strip()[-400:]}")
            return
        self.doc["revocation"] = json.loads(out.read_text())

    def versus(self) -> None:
        """The anchors (tests/bench/versus.py): rdax, librpma and NFS v4.2 over RDMA, the same durable-write
        workloads in interleaved blocks; then the storage side's CPU per GiB during one put through rdax and
        through NFS."""
        if self.args.blocks <= 0:
            return
        if self.budget.left() < 180:
            self.problems.note(f"versus skipped: out of time ({self.budget.left():.0f} s left)")
            return
        systems: dict = {}
        try:
            if self.peer is not None:
                try:
                    systems["rdax"] = versus_mod.Rdax(self.call, self.server.pid)
                    if systems["rdax"].info.get("native"):   # the A/B of rdma/fastpath: the same connection
                        systems["rdax_pyverbs"] = versus_mod.RdaxPyverbs(self.call, self.server.pid,
                                                                         opened=systems["rdax"].info)
                    else:
                        self.problems.note("versus: rdax is not using its native fast path (rdma/fastpath)")
                except RuntimeError as exc:
                    self.problems.note(f"versus: {exc}")
            for name, make in versus_mod.anchors(self.lab, self.logs):
                t0 = time.monotonic()
                try:
                    systems[name] = make()
                    say(f"versus: {name} up in {time.monotonic() - t0:.0f} s")
                except Exception as exc:  # noqa: BLE001 - a missing anchor is reported, not fatal
                    self.problems.note(f"versus: {name}: {type(exc).__name__}: {exc}")
            doc = versus_mod.versus(systems, self.args.blocks, self.budget.left, self.problems.note)
            if self.budget.left() > 120:
                try:
                    doc["cpu_put"] = versus_mod.cpu_put(systems.get("rdax"), systems.get("nfs"),
                                                        self.args.put_mib * MiB)
                except Exception as exc:  # noqa: BLE001
                    self.problems.note(f"versus: cpu per GiB during a put: {type(exc).__name__}: {exc}")
            else:
                self.problems.note("versus: cpu per GiB during a put skipped: out of time")
            doc["where"] = WHERE_GUEST + "; every system writes into a file on the same fsdax XFS (dax=always)"
            self.doc["versus"] = doc
        finally:
            for s in systems.values():
                try:
                    s.close()
                except Exception as exc:  # noqa: BLE001
                    self.problems.note(f"versus: closing {s.name}: {exc}")

    def scale(self) -> None:
        """Scale of one node (tests/bench/scale.py): Grant latency with 1/100/1000 live grants, revocation of one seal
        with 16 holders and 1000 grants, the audit with 1/100/1000 seals and Grant latency while it runs."""
        if self.budget.left() < 240:
            self.problems.note(f"scale skipped: out of time ({self.budget.left():.0f} s left)")
            return
        try:
            self.doc["scale"] = scale_mod.measure(self.lab, self.logs, self.budget.left, self.problems.note)
        except (scale_mod.ProcError, OSError, subprocess.SubprocessError) as exc:
            self.problems.note(f"scale: {type(exc).__name__}: {exc}")

    def profile(self) -> None:
        prof = self.call("profile", self.secs * 4 + 30, seconds=self.secs)
        if prof:
            with open(self.logs / "profile.txt", "w") as f:
                for name, p in prof.items():
                    f.write(f"== {name}: {json.dumps(p['figures'])}\n{p['top']}\n")
            self.doc["profile"] = {name: {"figures": p["figures"], "own_time_s": p["buckets_s"]}
                                   for name, p in prof.items()}
            self.doc["profile"]["where"] = "cProfile in the client process (slows the loop down; read the shares)"
            self.doc["profile"]["full_text"] = str(self.logs / "profile.txt")


# In the order they run; --only picks some.
STEPS = ("bandwidth", "latency", "versus", "registration", "memory", "control_plane", "revocation", "scale", "profile")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/bench.json")
    parser.add_argument("--budget", type=float, default=1200, help="seconds for everything (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=2.0, help="per bandwidth/latency point (default %(default)s)")
    parser.add_argument("--scale", type=int, default=1, help="divide perftest iterations by this (smoke runs)")
    parser.add_argument("--lat-iters", type=int, default=500)
    parser.add_argument("--grant-reps", type=int, default=7)
    parser.add_argument("--mem-sessions", type=int, default=8)
    parser.add_argument("--mem-grants", type=int, default=32)
    parser.add_argument("--cp-max-ops", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="bandwidth rounds; figures are medians (default %(default)s)")
    parser.add_argument("--no-odp-baseline", action="store_true", help="skip ib_write_bw --odp")
    parser.add_argument("--blocks", type=int, default=5,
                        help="interleaved blocks of rdax / librpma / NFS (0: no anchors; default %(default)s)")
    parser.add_argument("--put-mib", type=int, default=128, help="bytes of the CPU-per-GiB put (default %(default)s)")
    parser.add_argument("--only", default="", help="comma-separated steps to run, e.g. 'scale' (default: all of "
                        f"them: {', '.join(STEPS)}); perftest and rdax-server start only if a step needs them")
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
    run = Run(doc, lab, args, budget, problems, logs)
    steps = [s for s in args.only.split(",") if s] or list(STEPS)
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"--only: no step {', '.join(sorted(unknown))}; the steps are {', '.join(STEPS)}")
    try:
        if set(steps) & {"bandwidth", "latency"}:
            run.perftest_setup()
        if set(steps) - {"scale", "revocation"}:
            try:
                run.rdax_setup()
            except (RuntimeError, OSError, PeerError) as exc:
                problems.note(f"rdax: {exc}")   # the perftest figures still come
        for step in steps:
            getattr(run, step)()
    except PeerError:
        pass   # noted already: keep what there is
    except Exception as exc:  # noqa: BLE001 - keep whatever figures there are
        problems.note(f"{type(exc).__name__}: {exc}")
    finally:
        run.close()
    attach_ratios(doc)
    doc["guest"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    doc["elapsed_s"] = round(time.monotonic() - started, 1)
    doc["problems"] = list(problems)
    doc["logs"] = str(logs)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print()
    print(table(doc))
    print(f"\nbench: wrote {out} in {doc['elapsed_s']:.0f} s")
    if args.only:
        return 0 if not problems else 1
    r = doc["ratios"]
    return 0 if all(r.get(k) is not None for k in ("write_bw_ge_256k", "write_bw_4k", "write_flush_lat_4k_p50")) else 1


if __name__ == "__main__":
    sys.exit(main())
