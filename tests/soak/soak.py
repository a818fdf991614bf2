"""`make soak`: one rdax node under many clients, breakers and churn at once, for a bounded time (issue 11 §3).

Runs in the lab guest (any namespace; it reaches the others with `ip netns exec`):

    python tests/soak/soak.py --writers 16 --seconds 180 --out results/soak.json

rdax-server in the storage namespace; in the client namespace, one process per client (tests/soak/worker.py),
each with a session of its own: writers stream 64 KiB durable writes to files of their own, victims write to
files that this process breaks on a schedule (open, truncate, rename: the storage side, as another program on
the node would), and churners Grant/Release and Seal/Unseal. Meanwhile it samples the node's RSS, descriptors
and `rdma res` counts on the storage device. At the end it checks every writer's file byte for byte against
what the node acknowledged, waits for the node's RDMA resources to return to the baseline, runs
`ib_write_bw -q N` with as many QPs as there were writers, and writes the figures (results/soak.json).
The lab suite's short version is tests/lab/test_soak.py; it calls run() and asserts on the same document.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "lab"))
sys.path.insert(0, str(HERE.parent / "bench"))

import worker as W  # noqa: E402
from perftest import Perftest, Side, roce_v2_ipv4_gid_index  # noqa: E402
from pki import client_env, make_pki, server_args  # noqa: E402

BREAKS = ("open", "truncate", "rename")
RES_KINDS = ("pd", "cq", "qp", "mr")
BREAK_NOTICE_SECONDS = 15.0   # a break not revoked within this long counts as missed


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summary(values: list[float], unit: str) -> dict:
    return {"count": len(values), f"p50_{unit}": round(percentile(values, 50), 1),
            f"p99_{unit}": round(percentile(values, 99), 1), f"max_{unit}": round(max(values, default=0.0), 1)}


# -- the node and its resources -----------------------------------------------------------------
class Node:
    """rdax-server in the storage namespace over mutual TLS with the lab's policy."""

    def __init__(self, lab: dict, root: Path, port: int, pki: dict, log: Path) -> None:
        self.target = f"{lab['RDAX_STORAGE_IP']}:{port}"
        self.log = open(log, "w+")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab["RDAX_STORAGE_NS"], sys.executable, "-m", "rdax.service.cli",
             "--root", str(root), "--listen", self.target, "--device", lab["RDAX_STORAGE_DEV"],
             *server_args(pki, log.with_suffix(".audit.jsonl"))],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while "listening on" not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"rdax-server did not start (exit {self.proc.poll()}):\n{self.text()[-2000:]}")
            time.sleep(0.2)
        self.pid = self.proc.pid   # `ip netns exec` execs the command in place

    def text(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def sample(self, device: str) -> dict:
        """RSS (MB), open descriptors and the RDMA resources of the storage device (only the node uses it)."""
        with open(f"/proc/{self.pid}/status") as f:
            rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        out = subprocess.run(["rdma", "-j", "res", "show"], capture_output=True, text=True, check=True).stdout
        res = next((r for r in json.loads(out or "[]") if r.get("ifname") == device), {})
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime
        return {"t": time.monotonic(), "rss_mb": round(rss_kb / 1024, 1), "fds": len(os.listdir(f"/proc/{self.pid}/fd")),
                "cpu_s": round(cpu_s, 2),
                **{kind: int(res.get(kind, 0)) for kind in RES_KINDS}}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- the clients ------------------------------------------------------------------------------------
@dataclass
class Worker:
    role: str
    name: str
    proc: subprocess.Popen
    events: "queue.Queue[dict]" = field(default_factory=queue.Queue)
    done: dict | None = None
    last_sealed: dict | None = None
    revoked: list[dict] = field(default_factory=list)   # every "revoked" event, in order

    def read(self) -> None:
        """Reader thread: every JSON line the worker prints, in order."""
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("ev") == "sealed":
                self.last_sealed = event
            if event.get("ev") == "revoked":
                self.revoked.append(event)
            if event.get("ev") == "done":
                self.done = event
            self.events.put(event)


def start_worker(lab: dict, pki: dict, target: str, role: str, name: str, seconds: float, logs: Path) -> Worker:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab["RDAX_CLIENT_NS"], sys.executable, str(HERE / "worker.py"), role, name, target,
         "--seconds", str(seconds)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(logs / f"{role}-{name}.log", "w"), text=True,
        bufsize=1, env=client_env(pki, "lab"))
    w = Worker(role, name, proc)
    threading.Thread(target=w.read, daemon=True).start()
    return w


def wait_for(w: Worker, ev: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        if ev == "done" and w.done is not None:   # the breakers may have taken it off a victim's queue
            return w.done
        if time.monotonic() > deadline:
            raise RuntimeError(f"{w.role} {w.name}: no {ev!r} within {timeout:.0f} s (exit {w.proc.poll()})")
        try:
            event = w.events.get(timeout=0.5)
        except queue.Empty:
            continue
        if event.get("ev") == ev:
            return event


# -- the breakers -----------------------------------------------------------------------------------
class Breakers:
    """Breaks victims' sealed files on a schedule, as another program on the storage node would, and times
    each break to the victim's revocation notice (Watch)."""

    def __init__(self, export: Path, victims: list[Worker], every: float) -> None:
        self.export, self.victims, self.every = export, victims, every
        self.until = float("inf")   # no break starts after this (CLOCK_MONOTONIC): victims let go at their end
        self.breaks: list[dict] = []
        self._stop = threading.Event()
        self._waiters: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._run, name="breakers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        rng = random.Random(11)
        broken: set[str] = set()
        n = 0
        while not self._stop.wait(self.every):
            if time.monotonic() > self.until:
                break
            ready = [v for v in self.victims if v.last_sealed and v.last_sealed["seal_id"] not in broken
                     and time.monotonic() - v.last_sealed["t"] > 0.3 and v.done is None]
            if not ready:
                continue
            victim = rng.choice(ready)
            sealed = victim.last_sealed
            broken.add(sealed["seal_id"])
            kind = BREAKS[n % len(BREAKS)]
            n += 1
            # The next break does not wait for this one's notice: a thread of its own waits for it.
            waiter = threading.Thread(target=self._break, args=(victim, sealed, kind), daemon=True)
            waiter.start()
            self._waiters.append(waiter)
        for waiter in self._waiters:
            waiter.join(BREAK_NOTICE_SECONDS + 5)

    def _break(self, victim: Worker, sealed: dict, kind: str) -> dict:
        path = self.export / "soak" / f"v-{victim.name}"
        t0 = time.monotonic()
        if kind == "open":
            os.close(os.open(path, os.O_RDONLY))   # returns once the node let its lease go
        elif kind == "truncate":
            os.truncate(path, 4096)
        else:
            moved = path.with_name(path.name + f".moved-{uuid.uuid4().hex[:6]}")
            os.rename(path, moved)
        syscall_ms = (time.monotonic() - t0) * 1e3
        record = {"victim": victim.name, "kind": kind, "seal_id": sealed["seal_id"], "syscall_ms": round(syscall_ms, 2),
                  "revoked_ms": None}
        deadline = t0 + BREAK_NOTICE_SECONDS
        while time.monotonic() < deadline:
            told = [e for e in list(victim.revoked) if sealed["grant_id"] in e.get("grant_ids", [])]
            if told:
                record["revoked_ms"] = round((told[0]["t"] - t0) * 1e3, 2)
                record["reason"] = told[0].get("reason", "")
                # Ended before the break came (its session ended after an earlier break): nothing to break.
                record["already_ended"] = told[0]["t"] < t0 or told[0].get("reason", "").startswith("session ")
                break
            time.sleep(0.02)
        if kind == "rename":
            moved.unlink(missing_ok=True)
        if not record.get("already_ended"):
            self.breaks.append(record)
        return record


# -- checking ---------------------------------------------------------------------------------------
def check_writer(export: Path, done: dict) -> dict:
    """Every chunk the node acknowledged holds the bytes of the last write acknowledged there."""
    path = export / "soak" / f"w-{done['name']}"
    lost = misplaced = 0
    with open(path, "rb") as f:
        data = f.read()
    for slot, index in done["acked"].items():
        offset = int(slot) * W.CHUNK
        if data[offset:offset + W.CHUNK] != W.chunk_bytes(done["name"], index):
            lost += W.CHUNK
            # Misplaced: the acknowledged bytes are somewhere else in the file.
            if W.chunk_bytes(done["name"], index) in data:
                misplaced += W.CHUNK
    return {"name": done["name"], "size": len(data), "chunks_checked": len(done["acked"]), "bytes_lost": lost,
            "bytes_misplaced": misplaced}


def threads_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the node's threads, by thread name, busiest first (where the node's CPU went)."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, tail = f.read().rsplit(")", 1)
        except OSError:
            continue
        name = head.split("(", 1)[1]
        fields = tail.split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return dict(sorted(((k, round(v, 2)) for k, v in out.items()), key=lambda kv: -kv[1])[:12])


def start_profile(pid: int, seconds: float, logs: Path) -> subprocess.Popen:
    """py-spy sampling the node (every thread, without pausing it) for `seconds` once the load is on."""
    (logs / "node-profile.txt").unlink(missing_ok=True)   # never report an earlier run's profile
    return subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "50",
                             "--nonblocking", "--threads", "--format", "raw", "--output", str(logs / "node-profile.txt")],
                            stdout=subprocess.DEVNULL, stderr=open(logs / "py-spy.log", "w"))


def finish_profile(profiler: subprocess.Popen, logs: Path, top: int = 25) -> dict:
    """Where the node's samples fell: by thread, by own function (the leaf) and by function anywhere on the stack.
    py-spy's raw format is one collapsed stack per line, `thread;frame;...;frame count`."""
    import collections

    try:
        profiler.wait(timeout=120)
    except subprocess.TimeoutExpired:
        profiler.kill()
    path = logs / "node-profile.txt"
    if not path.exists():
        return {"error": f"py-spy wrote no profile (exit status {profiler.returncode}): "
                         f"{(logs / 'py-spy.log').read_text()[-500:]}"}
    threads: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        total += n
        name = frames[0].split(": ", 1)[-1]   # "thread (550): rdax-rpc_9": a pool's threads count together
        threads[name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name] += n
        own[frames[-1]] += n
        for frame in set(frames[1:]):
            anywhere[frame] += n

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(v / total, 3)) for k, v in counter.most_common(top)]
    return {"samples": total, "file": str(path), "threads": share(threads), "own": share(own),
            "anywhere": share(anywhere)}


def settle(node: Node, device: str, baseline: dict, timeout: float) -> dict:
    """Wait for the node's RDMA resources to come back to the baseline (QP teardown runs on a thread of its own
    and can take long after access errors); the last sample."""
    deadline = time.monotonic() + timeout
    while True:
        if node.proc.poll() is not None:
            raise RuntimeError(f"the node exited with status {node.proc.returncode} during the soak; its log ends:\n"
                               f"{node.text()[-1500:]}")
        s = node.sample(device)
        if all(s[k] <= baseline[k] for k in RES_KINDS) or time.monotonic() > deadline:
            return s
        time.sleep(1)


# -- the run ---------------------------------------------------------------------------------------
def run(lab: dict, *, writers: int, victims: int, granters: int, sealers: int, seconds: float,
        break_every: float, logs: Path, perftest: bool = True, port: int | None = None,
        profile_seconds: float = 0.0) -> dict:
    """One soak; returns the report (see module docstring and tests/soak/README.md)."""
    logs.mkdir(parents=True, exist_ok=True)
    pki = make_pki(Path("/run/rdax-lab-pki"), [lab["RDAX_STORAGE_IP"], "127.0.0.1"])
    export = Path(lab["RDAX_DAX_MOUNT"]) / f"soak-{uuid.uuid4().hex[:8]}"
    (export / "soak").mkdir(parents=True)
    device = lab["RDAX_STORAGE_DEV"]
    node = Node(lab, export, port or 7600 + random.randrange(100), pki, logs / "node.log")
    workers: list[Worker] = []
    samples: list[dict] = []
    try:
        time.sleep(1)
        start = node.sample(device)
        plan = [("writer", writers), ("victim", victims), ("grants", granters), ("seals", sealers)]
        for role, count in plan:
            for i in range(count):
                workers.append(start_worker(lab, pki, node.target, role, f"{i:02d}", seconds, logs))
        for w in workers:
            wait_for(w, "ready", 180)
        connected = node.sample(device)
        breakers = Breakers(export, [w for w in workers if w.role == "victim"], break_every)
        stop_sampling = threading.Event()

        def sampler() -> None:
            while not stop_sampling.wait(1.0):
                try:
                    samples.append(node.sample(device))
                except (OSError, subprocess.CalledProcessError, StopIteration):
                    pass
        sampling = threading.Thread(target=sampler, daemon=True)
        sampling.start()
        t0 = time.monotonic()
        for w in workers:
            w.proc.stdin.write("go\n")
            w.proc.stdin.flush()
        breakers.until = t0 + seconds - 3
        breakers.start()
        profiler = start_profile(node.pid, profile_seconds, logs) if profile_seconds else None
        for w in workers:
            wait_for(w, "done", seconds + 120)
        window = time.monotonic() - t0
        breakers.stop()
        for w in workers:
            w.proc.stdin.close()
            try:
                w.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.proc.kill()
        stop_sampling.set()
        sampling.join()
        end = settle(node, device, start, 120)
        end["threads_cpu_s"] = threads_cpu(node.pid)
        profile = finish_profile(profiler, logs) if profiler is not None else None
        checks = [check_writer(export, w.done) for w in workers if w.role == "writer"]
        node_alive = node.proc.poll() is None
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
        node.stop()

    done = [w.done for w in workers]
    acknowledged = sum(d.get("acknowledged_bytes", 0) for d in done)
    writes_us = [x for d in done if d["role"] == "writer" for x in d.get("write_lat_us", [])]
    rpc: dict[str, list[float]] = {}
    for d in done:
        for name, values in d.get("rpc_us", {}).items():
            rpc.setdefault(name, []).extend(values)
    revoked = [b["revoked_ms"] for b in breakers.breaks if b["revoked_ms"] is not None]
    by_kind = {k: [b["revoked_ms"] for b in breakers.breaks if b["kind"] == k and b["revoked_ms"] is not None]
               for k in BREAKS}
    last = samples[-1] if samples else end
    peak = {k: max([s[k] for s in samples] + [connected[k]]) for k in ("rss_mb", "fds", *RES_KINDS)}
    report = {
        "clients": len(workers),
        "roles": {role: count for role, count in plan},
        "seconds": round(window, 1),
        "acknowledged_bytes": acknowledged,
        "acknowledged_bytes_lost": sum(c["bytes_lost"] for c in checks),
        "acknowledged_bytes_misplaced": sum(c["bytes_misplaced"] for c in checks),
        "chunks_checked": sum(c["chunks_checked"] for c in checks),
        "write_bw_mib_s": round(acknowledged / window / (1 << 20), 2),
        "durable_write_64k_us": summary(writes_us, "us"),
        "breaks": len(breakers.breaks),
        "revocations": len(revoked),
        "breaks_not_revoked": [b for b in breakers.breaks if b["revoked_ms"] is None],
        "revocation_p50_ms": round(percentile(revoked, 50), 1),
        "revocation_p99_ms": round(percentile(revoked, 99), 1),
        "revocation_ms_by_kind": {k: summary(v, "ms") for k, v in by_kind.items()},
        "break_syscall_ms": {k: summary([b["syscall_ms"] for b in breakers.breaks if b["kind"] == k], "ms")
                             for k in BREAKS},
        "rpc_us": {name: summary(values, "us") for name, values in sorted(rpc.items())},
        "node": {"start": start, "connected": connected, "peak": peak, "end": end, "alive_at_end": node_alive},
        "node_cpu_share": round((last["cpu_s"] - connected["cpu_s"]) / (last["t"] - connected["t"]), 3),
        "rdma_res_leaked": sum(end[k] - start[k] for k in RES_KINDS),
        "fds_leaked": end["fds"] - start["fds"],
        "rss_growth_mb": round(end["rss_mb"] - connected["rss_mb"], 1),
        "client_errors": {f"{d['role']}-{d['name']}": d["errors"] for d in done if d.get("errors")},
        "writers": checks,
        "workers": [{k: v for k, v in d.items() if k not in ("acked", "write_lat_us", "rpc_us")} for d in done],
        "where": "lab guest: qemu TCG (software-emulated CPU, 2 vCPUs), soft-RoCE (rxe) on a veth pair, "
                 "clients in the client namespace, the node and the breakers in the storage namespace",
        "note": "revocation: from the breaker's syscall (open/truncate/rename of a victim's sealed file on the "
                "storage side) to the victim's Watch notice, CLOCK_MONOTONIC on both sides; rss_growth_mb: node RSS "
                "at the end minus once every client had connected (the thread pools warm); rdma_res_leaked: "
                "PD+CQ+QP+MR on the storage device at the end minus before any client",
    }
    if profile is not None:
        report["node_profile"] = profile
    if perftest and writers:
        report["perftest"] = perftest_bw(lab, writers, logs)
        wire = report["perftest"].get("bw_mib_s")
        if wire:
            report["write_bw_vs_perftest"] = round(report["write_bw_mib_s"] / wire, 3)
    return report


def perftest_bw(lab: dict, qps: int, logs: Path) -> dict:
    """ib_write_bw with as many QPs as the soak had writers, 64 KiB messages, the same devices."""
    storage = Side(lab["RDAX_STORAGE_NS"], lab["RDAX_STORAGE_DEV"], roce_v2_ipv4_gid_index(lab["RDAX_STORAGE_DEV"]))
    client = Side(lab["RDAX_CLIENT_NS"], lab["RDAX_CLIENT_DEV"], roce_v2_ipv4_gid_index(lab["RDAX_CLIENT_DEV"]))
    with open(logs / "perftest.log", "w") as log:
        try:
            r = Perftest(storage, client, lab["RDAX_STORAGE_IP"], log).run(
                "ib_write_bw", W.CHUNK, 256, ["-q", str(qps)], timeout=300)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            return {"error": str(exc)[-500:]}
    return {"tool": f"ib_write_bw -q {qps} -s {W.CHUNK} -n 256", "bw_mib_s": r["bw_mib_s"],
            "raw": r}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--writers", type=int, default=16)
    p.add_argument("--victims", type=int, default=4)
    p.add_argument("--granters", type=int, default=2)
    p.add_argument("--sealers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=180)
    p.add_argument("--break-every", type=float, default=1.5, help="seconds between two breaks")
    p.add_argument("--out", type=Path, default=Path("results/soak.json"))
    p.add_argument("--profile-node", type=float, default=0.0, metavar="SECONDS",
                   help="sample the node with py-spy for this long once the load is on (node_profile in the report)")
    args = p.parse_args(argv)
    lab = dict(os.environ)
    if lab.get("RDAX_LAB") != "1":
        print("not inside the rdax lab guest: run `make soak`", file=sys.stderr)
        return 2
    report = run(lab, writers=args.writers, victims=args.victims, granters=args.granters, sealers=args.sealers,
                 seconds=args.seconds, break_every=args.break_every, logs=args.out.parent / "soak-logs",
                 profile_seconds=args.profile_node)
    report["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    brief = {k: report[k] for k in ("clients", "seconds", "acknowledged_bytes", "acknowledged_bytes_lost",
                                    "revocations", "breaks", "revocation_p99_ms", "rdma_res_leaked", "rss_growth_mb",
                                    "write_bw_mib_s")}
    print(json.dumps({**brief, "write_bw_vs_perftest": report.get("write_bw_vs_perftest"),
                      "rpc_p99_us": {k: v["p99_us"] for k, v in report["rpc_us"].items()},
                      "client_errors": report["client_errors"]}, indent=2))
    ok = (report["acknowledged_bytes_lost"] == 0 and not report["breaks_not_revoked"]
          and report["rdma_res_leaked"] == 0 and not report["client_errors"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
