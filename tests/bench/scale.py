"""Scale of one node (issue 11 §4): how Grant, revocation and the FIEMAP audit cost grow with the work a node holds.

Runs in the lab guest's root namespace and drives both sides: tests/bench/scale_node.py (the node: rdax's Node and
gRPC server in one process in the storage namespace, the load made there through Node's own methods, the audit
run on demand) and tests/bench/scale_peer.py (a client in the client namespace timing Grant + Release over gRPC).
Called by run.py (the `scale` section of results/bench.json); alone:

    python tests/bench/scale.py --out results/scale.json

1. Grant latency with 1, 100 and 1,000 live grants (held by 1, 16 and 16 sessions on one shared 64 MiB seal),
   from the client (p50/p99) and inside the node (node.grant, lock waits included);
2. revocation of that seal, 16 sessions with 1,000 grants in all: a breaker's open() of the file, which the kernel
   lets return only once the node released its lease — after it deregistered every region — and the node's own
   rdax_revocation_seconds; the client's Grants on another seal meanwhile;
3. the audit: one pass with 1, 100 and 1,000 sealed files, then Grant latency while passes run back to back
   against Grant latency while none runs.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "lab"))

from pki import client_env, make_pki  # noqa: E402
from report import summary_us  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
PORT = 7791
GRANT_LEVELS = (1, 100, 1000)
SEAL_LEVELS = (1, 100, 1000)
# What runs while a revocation does (scale.revocation.loads): nothing; a client's Grants over gRPC and the lock probe;
# those and a thread in the node's process making Grants back to back.
REVOCATION_LOADS = ("quiet", "clients", "busy")
STEPS = ("grant_latency", "revocation", "audit")
SESSIONS = 16
SHARED_LENGTH = 64 * MiB
GRANT_LENGTH = 64 * KiB
AUDIT_FILE_LENGTH = 64 * KiB
BREAKER = ("import os, sys, time; t0 = time.monotonic(); fd = os.open(sys.argv[1], os.O_RDONLY); "
           "t1 = time.monotonic(); os.close(fd); print(t0, t1)")


class ProcError(RuntimeError):
    pass


class Proc:
    """A JSON-lines helper process (scale_node.py, scale_peer.py): send(), recv(), call()."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 120) -> None:
        self.log = open(log, "w")
        self.name = Path(argv[-1 if argv[-1].endswith(".py") else -2]).name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env)
        self._buf = b""
        self.hello = self.recv(timeout)

    def send(self, op: str, **args) -> None:
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        self.proc.stdin.flush()

    def recv(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProcError(f"{self.name}: no answer within {timeout:.0f} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise ProcError(f"{self.name} exited ({self.proc.wait()}); see its log")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        reply = json.loads(line)
        if not reply.pop("ok"):
            self.log.write(reply.get("trace", "") + "\n")
            self.log.flush()
            raise ProcError(f"{self.name}: {reply['error']}")
        return reply

    def call(self, op: str, timeout: float = 300, **args) -> dict:
        self.send(op, **args)
        return self.recv(timeout)

    def close(self) -> None:
        try:
            self.proc.stdin.write(b'{"op": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=90)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _us(samples_s: list[float]) -> dict:
    out = summary_us([int(s * 1e9) for s in samples_s])
    return {"p50": out["p50_us"], "p99": out["p99_us"], "max": out["max_us"], "samples": out["samples"]}


def _overlaps(t0: float, t1: float, windows: list[tuple[float, float]]) -> bool:
    return any(t0 < w1 and w0 < t1 for w0, w1 in windows)


def _revocations(trials: list[dict]) -> dict:
    """Revocation trials of one load: times to revoke, and what overlapped the breakers' open() and what not."""
    if not trials:
        return {}

    def split(key: str, end: Callable[[float, float], float]) -> dict:
        during: list[float] = []
        outside: list[float] = []
        for t in trials:
            for a, b in t[key]:
                (during if _overlaps(a, end(a, b), [t["window"]]) else outside).append(end(a, b) - a)
        name = key.replace("probe", "grant").replace("node", "node_grant").replace("waits", "lock_wait")
        name = "in_node_grant" if key == "in_node" else name
        return {f"{name}_during_us": _us(during) if during else None,
                f"{name}_outside_us": _us(outside) if outside else None}

    def ms(key: str) -> dict:
        xs = [t[key] for t in trials if t[key] is not None]
        return {"p50": round(statistics.median(xs), 1), "max": max(xs), "all": xs} if xs else {}
    return {"trials": len(trials), "breaker_open_ms": ms("breaker_open_ms"),
            "node_revocation_ms": ms("node_revocation_ms"),
            **split("probe", lambda a, b: b), **split("node", lambda a, d: a + d),
            **split("in_node", lambda a, d: a + d), **split("waits", lambda a, d: a + d)}


class Scale:
    """One scale run: the node process, the probe client, and the section they fill."""

    def __init__(self, lab: dict, logs: Path, left: Callable[[], float], note: Callable[[str], None],
                 probe_seconds: float, trials: int, service_from: str | None = None) -> None:
        self.lab, self.logs, self.left, self.note, self.probe_seconds = lab, logs, left, note, probe_seconds
        self.trials = trials
        self.out: dict = {}
        self.root = Path(lab["RDAX_DAX_MOUNT"]) / f"bench-scale-{uuid.uuid4().hex[:8]}"
        self.root.mkdir()
        target = f"{lab['RDAX_STORAGE_IP']}:{PORT}"
        pki = make_pki(Path("/run/rdax-lab-pki"), [lab["RDAX_STORAGE_IP"], "127.0.0.1"])
        self.node = Proc(["ip", "netns", "exec", lab["RDAX_STORAGE_NS"], sys.executable, str(HERE / "scale_node.py"),
                          str(self.root), target, lab["RDAX_STORAGE_DEV"], lab["RDAX_CLIENT_IP"],
                          *([service_from] if service_from else [])], logs / "scale-node.log")
        self.out["service"] = self.node.hello["service"]
        self.node.call("probe_lock", on=True)
        self.probe: Proc | None = None
        self.probe = Proc(["ip", "netns", "exec", lab["RDAX_CLIENT_NS"], sys.executable,
                           str(HERE / "scale_peer.py"), target], logs / "scale-peer.log", env=client_env(pki))
        self.probe.call("open", path="scale-probe", length=MiB)

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
        self.node.close()

    def _probe(self, seconds: float, max_ops: int = 400) -> tuple[list, list]:
        """The client's Grants over `seconds`, and the node's own timing of them."""
        since = self.node.call("now")["t"]
        got = self.probe.call("grants", timeout=seconds * 6 + 120, seconds=seconds, max_ops=max_ops)
        node = self.node.call("grants_since", since=since)["grants"]
        return got["grants"], node

    def grant_latency(self) -> None:
        """Grant latency with 1, 100 and 1,000 live grants on the node."""
        out = self.out["grant_latency_us"] = {}
        setup = self.out.setdefault("setup", {})
        for n in GRANT_LEVELS:
            if self.left() < 60 + n * 0.05:
                self.note(f"scale: grant latency at {n} live grants skipped: out of time")
                return
            sessions = min(SESSIONS, n)
            held = self.node.call("hold", timeout=600, sessions=sessions, grants=n, length=SHARED_LENGTH,
                                  grant_length=GRANT_LENGTH)
            setup[f"hold_{n}"] = held
            client, node = self._probe(self.probe_seconds)
            row = _us([t1 - t0 for t0, t1 in client])
            nrow = _us([d for _, d in node])
            out[str(n)] = {**row, "node_p50": nrow["p50"], "node_p99": nrow["p99"], "node_max": nrow["max"],
                           "live_grants": held["grants"], "sessions": held["sessions"]}
            say(f"scale: Grant with {n} live grants: p50 {row['p50'] / 1e3:.1f} ms, p99 {row['p99'] / 1e3:.1f} ms "
                f"(node {nrow['p50'] / 1e3:.1f} / {nrow['p99'] / 1e3:.1f} ms)")

    def revocation(self) -> None:
        """Break the shared seal (16 sessions, 1,000 grants) with a breaker's open() of its file, `trials` times,
        under each load of REVOCATION_LOADS in turn."""
        trials: dict[str, list[dict]] = {load: [] for load in REVOCATION_LOADS}
        for trial in range(self.trials):
            load = REVOCATION_LOADS[trial % len(REVOCATION_LOADS)]
            if self.left() < 90:
                self.note(f"scale: revocation trial {trial + 1} and later skipped: out of time")
                break
            held = self.node.call("hold", timeout=600, sessions=SESSIONS, grants=max(GRANT_LEVELS),
                                  length=SHARED_LENGTH, grant_length=GRANT_LENGTH)
            self.node.call("probe_lock", on=load != "quiet")
            before = self.node.call("revocations")
            since = self.node.call("now")["t"]
            if load != "quiet":
                self.probe.send("grants", seconds=4.0, max_ops=1000)
            time.sleep(1.0)
            if load == "busy":
                self.node.call("probe_grants", on=True)
            time.sleep(1.0)
            run = subprocess.run([sys.executable, "-c", BREAKER, str(self.root / "scale" / "shared")],
                                 capture_output=True, text=True, check=True, timeout=300)
            t0, t1 = map(float, run.stdout.split())
            time.sleep(1.0)
            self.node.call("probe_grants", on=False)
            probe = self.probe.recv(300)["grants"] if load != "quiet" else []
            after = self.node.call("revocations")
            trials[load].append({
                "sessions": held["sessions"], "grants": held["grants"], "window": (t0, t1),
                "breaker_open_ms": round((t1 - t0) * 1e3, 1),
                "node_revocation_ms": round((after["sum_s"] - before["sum_s"]) * 1e3, 1)
                if after["count"] == before["count"] + 1 else None,
                "grants_left": after["state"]["grants"], "probe": probe,
                "node": self.node.call("grants_since", since=since)["grants"],
                "waits": self.node.call("lock_waits_since", since=since)["waits"],
                "in_node": self.node.call("node_grants_since", since=since)["grants"]})
            self.node.call("probe_lock", on=True)
            say(f"scale: revocation {trial + 1} ({load}): 1 seal, {held['sessions']} sessions, {held['grants']} "
                f"grants: breaker's open() {trials[load][-1]['breaker_open_ms']} ms, node "
                f"{trials[load][-1]['node_revocation_ms']} ms")
            self.out.setdefault("setup", {})["drop_holders"] = self.node.call("drop_holders", timeout=600)
        done = {load: ts for load, ts in trials.items() if ts}
        if not done:
            return
        first = next(iter(done.values()))[0]
        self.out["revocation"] = {
            "sessions": first["sessions"], "grants": first["grants"], "trials": sum(map(len, done.values())),
            **{k: v for k, v in _revocations(done.get("quiet", [])).items() if k.endswith("_ms")},
            "loads": {load: _revocations(ts) for load, ts in done.items()},
            "grants_left": [t["grants_left"] for ts in done.values() for t in ts],
            "measured": "breaker_open_ms: another process's open(O_RDONLY) of the sealed file, which returns only "
                        "once the node released its lease, and the node releases it only after deregistering every "
                        "region (an upper bound of break -> all regions deregistered); node_revocation_ms: "
                        "rdax_revocation_seconds of that revocation (from the revocation's start to its file let "
                        "go: stop grants, deregister, unmap, release). The top-level ones are the quiet trials "
                        "(nothing else running); loads.clients: the probe client's Grant + Release loop over gRPC "
                        "ran meanwhile, and a thread taking the node's lock every 2 ms; loads.busy: that and a "
                        "thread in the node's process making Grant + Release back to back on a seal of its own. "
                        "*_during_us: the client's Grants (grant_), their time inside node.grant (node_grant_), the "
                        "in-process Grants (in_node_grant_) and the lock probe's waits (lock_wait_) that overlapped "
                        "a breaker's open(); *_outside_us: the others of the same trials (about 1 s before and after)",
        }
        for load, r in self.out["revocation"]["loads"].items():
            during = r.get("in_node_grant_during_us") or r.get("node_grant_during_us") or {}
            say(f"scale: revocations ({load}): breaker's open() p50 {r['breaker_open_ms'].get('p50')} ms, node p50 "
                f"{r['node_revocation_ms'].get('p50')} ms; Grant in the node meanwhile p50/max "
                f"{during.get('p50', 0) / 1e3:.1f}/{during.get('max', 0) / 1e3:.1f} ms")

    def audit(self) -> None:
        """One audit pass with 1, 100, 1,000 sealed files; Grant latency while passes run and while none does."""
        out = self.out["audit"] = {"pass_ms": {}}
        setup = self.out.setdefault("setup", {})
        for n in SEAL_LEVELS:
            if self.left() < 60 + n * 0.15:
                self.note(f"scale: audit with {n} seals skipped: out of time")
                break
            setup[f"seals_{n}"] = self.node.call("seals", timeout=900, n=n, length=AUDIT_FILE_LENGTH)
            passes = self.node.call("audit", timeout=300, passes=5, max_seconds=20)["pass_s"]
            ms = sorted(p * 1e3 for p in passes)
            out["pass_ms"][str(n)] = {"p50": round(ms[len(ms) // 2], 2), "max": round(ms[-1], 2),
                                      "passes": len(ms), "per_seal_us": round(ms[len(ms) // 2] * 1e3 / n, 1)}
            say(f"scale: audit pass with {n} seals: p50 {ms[len(ms) // 2]:.1f} ms")
        n = max((int(k) for k in out["pass_ms"]), default=0)
        if not n or self.left() < 60 + 4 * self.probe_seconds:
            self.note("scale: Grant latency during the audit skipped: out of time")
            return
        # Passes back to back through the middle of the client's run: before and after it are the baseline.
        seconds = 4 * self.probe_seconds
        self.probe.send("grants", seconds=seconds, max_ops=2000)
        since = self.node.call("now")["t"]
        self.node.call("audit_during", after=seconds / 4, seconds=seconds / 2)
        probe = self.probe.recv(seconds * 6 + 300)["grants"]
        windows = self.node.call("audit_result", timeout=300)["windows"]
        node = self.node.call("grants_since", since=since)["grants"]
        waits = self.node.call("lock_waits_since", since=since)["waits"]
        during = [b - a for a, b in probe if _overlaps(a, b, windows)]
        idle = [b - a for a, b in probe if not _overlaps(a, b, windows)]
        node_during = [d for a, d in node if _overlaps(a, a + d, windows)]
        node_idle = [d for a, d in node if not _overlaps(a, a + d, windows)]
        wait_during = [d for a, d in waits if _overlaps(a, a + d, windows)]
        wait_idle = [d for a, d in waits if not _overlaps(a, a + d, windows)]
        out["grant_latency_us"] = {"seals": n, "passes": len(windows),
                                   "during_audit": _us(during) if during else None, "idle": _us(idle) if idle else None,
                                   "node_during_audit": _us(node_during) if node_during else None,
                                   "node_idle": _us(node_idle) if node_idle else None,
                                   "lock_wait_during_audit": _us(wait_during) if wait_during else None,
                                   "lock_wait_idle": _us(wait_idle) if wait_idle else None}
        g = out["grant_latency_us"]
        if during and idle:
            say(f"scale: Grant with {n} seals, audit running: p50 {g['during_audit']['p50'] / 1e3:.1f} ms, p99 "
                f"{g['during_audit']['p99'] / 1e3:.1f} ms; not running: p50 {g['idle']['p50'] / 1e3:.1f} ms, "
                f"p99 {g['idle']['p99'] / 1e3:.1f} ms")
        setup["drop_seals"] = self.node.call("drop_seals", timeout=600)


T0 = time.monotonic()


def say(what: str) -> None:
    print(f"[{time.monotonic() - T0:5.0f} s] bench: {what}", flush=True)


def measure(lab: dict, logs: Path, left: Callable[[], float], note: Callable[[str], None],
            probe_seconds: float = 8.0, trials: int = 3, service_from: str | None = None,
            steps: tuple[str, ...] = STEPS) -> dict:
    """The `scale` section of bench.json; steps that would not fit in left() seconds are noted and skipped."""
    started = time.monotonic()
    scale = Scale(lab, logs, left, note, probe_seconds, trials, service_from)
    try:
        for step in [getattr(scale, name) for name in steps]:
            try:
                step()
            except ProcError as exc:
                note(f"scale: {step.__name__}: {exc}")
                if scale.node.proc.poll() is not None or (scale.probe and scale.probe.proc.poll() is not None):
                    break
    finally:
        scale.close()
    scale.out["elapsed_s"] = round(time.monotonic() - started, 1)
    scale.out["where"] = ("lab guest: qemu TCG (2 vCPUs), rxe; node = rdax Node + gRPC server (mTLS) in one process "
                          "in the storage namespace, its load (sessions, grants, seals) made in-process through "
                          "Node's methods; Grants timed by a rdax.client session in the client namespace and "
                          "inside the node (node.grant)")
    return scale.out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/scale.json")
    parser.add_argument("--budget", type=float, default=900)
    parser.add_argument("--probe-seconds", type=float, default=8.0, help="per Grant latency point")
    parser.add_argument("--trials", type=int, default=3, help="revocations of the 1,000-grant seal")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated, of %(default)s")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with several --service-from: rounds over them, in turn forwards and backwards (ABBA)")
    parser.add_argument("--service-from", action="append", default=[], metavar="DIR",
                        help="run the node from this service/ folder (e.g. made by `git archive REV service`) "
                             "instead of the installed one; repeat it (and use 'installed' for the installed "
                             "one) to measure several in turn, e.g. before/after")
    args = parser.parse_args(argv)
    lab = dict(os.environ)
    if lab.get("RDAX_LAB") != "1":
        print("scale: not inside the rdax lab guest: run it with lab/run.sh", file=sys.stderr)
        return 2
    out = Path(args.out)
    logs = out.parent / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + args.budget
    problems: list[str] = []

    def note(what: str) -> None:
        say(what)
        problems.append(what)
    left = lambda: end - time.monotonic()  # noqa: E731
    sources = args.service_from or ["installed"]
    runs: dict[str, list[dict]] = {source: [] for source in sources}
    for r in range(args.rounds):
        for source in sources if r % 2 == 0 else sources[::-1]:
            say(f"scale: round {r + 1}, the node from {source}")
            runs[source].append(measure(lab, logs, left, note, args.probe_seconds, args.trials,
                                        None if source == "installed" else source, tuple(args.steps.split(","))))
    doc = runs[sources[0]][0] if len(sources) == 1 and args.rounds == 1 else {"runs": runs}
    doc["problems"] = problems
    out.write_text(json.dumps({"scale": doc}, indent=2) + "\n")
    say(f"wrote {out}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
