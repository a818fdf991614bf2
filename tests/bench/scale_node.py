"""The node side of the scale bench (tests/bench/scale.py), run in the storage namespace: rdax's Node and gRPC
server (service/server.py, mutual TLS, the lab's CA) in this process, with the hooks the bench needs and the
CLI has not — the audit runs when the bench says (never on its own timer), the grants and seals that make the
load are made here through Node's own methods, and every Grant the node serves is timed. One JSON command per
stdin line, one JSON answer per stdout line.

    ip netns exec storage python tests/bench/scale_node.py ROOT HOST:PORT DEVICE CLIENT_IP [SERVICE_DIR]

SERVICE_DIR: run the node code of another checkout's service/ folder (e.g. one `git archive REV service` made)
instead of the installed rdax.service, for a before/after comparison in one lab run (scale.py --service-from).
The load: `hold` opens sessions of their own identity (their QPs point at the client namespace and carry no
traffic) that seal one shared file and hold grants on it; `seals` seals many small files from one session.
Everything a client over gRPC would do goes through the same Node calls the servicer makes.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import resource
import sys
import threading
import time
import traceback
from pathlib import Path

from types import ModuleType

from rdax.service.revocation import install_sigio_guard

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "lab"))

HOLDER = "spiffe://rdax.test/bench/holder"   # the identity of the load's sessions
KiB = 1 << 10
MiB = 1 << 20


def policy_text(lab_policy: str) -> str:
    """The lab's policy, plus the load's identity with room for every grant and seal the bench makes."""
    return lab_policy + f"""
[[allow]]
identity = "{HOLDER}"
paths = ["scale/**"]
create = true
access = ["write", "read", "atomic", "flush"]
max_sessions = 64
max_grants = 4096
"""


def service_package(directory: str | None) -> str:
    """The name under which the node's modules import: rdax.service, or another checkout's service/ folder loaded
    as a package of its own (its relative imports stay inside it; rdax.rdma and rdax.v1 are the installed ones)."""
    if not directory:
        return "rdax.service"
    name = "rdax_service_under_test"
    spec = importlib.util.spec_from_file_location(name, os.path.join(directory, "__init__.py"),
                                                  submodule_search_locations=[directory])
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return name


class ScaleNode:
    def __init__(self, root: str, listen: str, device: str, client_ip: str, service_dir: str | None = None) -> None:
        from pki import POLICY, make_pki
        from rdax.service.tls import ServerTls

        pkg = service_package(service_dir)

        def m(name: str) -> ModuleType:
            return importlib.import_module(f"{pkg}.{name}")

        pki = make_pki(Path("/run/rdax-lab-pki"), [listen.rsplit(":", 1)[0], "127.0.0.1"])
        self.service = pkg if not service_dir else os.path.abspath(service_dir)
        self.fabric = m("fabric").RdmaFabric(device=device)
        self.metrics = m("metrics").NodeMetrics()
        self.audit_trail = m("audit").Audit(f"/tmp/rdax-scale-audit-{os.getpid()}.jsonl")
        os.makedirs(os.path.join(root, "scale", "audit"), exist_ok=True)
        # The audit only when the bench calls it: audit_seconds past any run.
        policy = m("policy").Policy.parse(policy_text(POLICY), "scale-policy.toml")
        self.node = m("node").Node(root, self.fabric, policy=policy, audit=self.audit_trail, metrics=self.metrics,
                                   audit_seconds=1e9)
        endpoint = m("fabric_api").Endpoint
        self.endpoint = lambda qpn: endpoint(qpn=qpn, gid=f"::ffff:{client_ip}", psn=1, mtu=4096)
        self.access = m("grants").ACCESS_WRITE | m("grants").ACCESS_READ | m("grants").ACCESS_FLUSH
        create_server = m("server").create_server
        self.grant_times: list[tuple[float, float]] = []   # (start, seconds) of every Grant a client asked for
        self._wrap_grant()
        tls = ServerTls(str(pki["cert"]), str(pki["key"]), str(pki["ca"]))
        self.server = create_server(listen, self.node, tls.credentials())
        self.server.start()
        self.holders: list[str] = []        # session ids of the load
        self.shared: str | None = None      # the shared seal's id
        self.held: list[tuple[str, str]] = []   # (session id, grant id)
        self.audit_session: str | None = None
        self.holders_extra: list[str] = []   # sessions of the probes, heartbeated like the load's
        self.audit_seals: list[str] = []
        self._stop = threading.Event()
        self._auditing: threading.Thread | None = None
        self._audit_out: dict = {}
        self.lock_waits: list[tuple[float, float]] = []   # (start, seconds) of the lock probe's acquisitions
        self._probing = threading.Event()
        self.node_grants: list[tuple[float, float]] = []   # (start, seconds) of the in-process Grant probe's Grants
        self._node_probing = threading.Event()
        self._node_probe: tuple[str, str] | None = None   # its session and seal
        threading.Thread(target=self._heartbeat, name="scale-heartbeat", daemon=True).start()
        threading.Thread(target=self._lock_probe, name="scale-lock-probe", daemon=True).start()

    def _wrap_grant(self) -> None:
        grant = self.node.grant

        def timed(*args, **kwargs):
            t0 = time.monotonic()
            try:
                return grant(*args, **kwargs)
            finally:
                if kwargs.get("identity") != HOLDER:
                    self.grant_times.append((t0, time.monotonic() - t0))
        self.node.grant = timed   # the servicer calls node.grant: it finds this one

    def _heartbeat(self) -> None:
        while not self._stop.wait(5):
            for sid in self.holders + self.holders_extra + ([self.audit_session] if self.audit_session else []):
                try:
                    self.node.heartbeat(sid, identity=HOLDER)
                except Exception:  # noqa: BLE001 - a session the bench ended
                    pass

    def _lock_probe(self) -> None:
        """While probing: take the node's lock every 2 ms and note how long that took (a call's wait for it)."""
        while not self._stop.is_set():
            if not self._probing.wait(1.0):
                continue
            t0 = time.monotonic()
            with self.node._lock:
                pass
            self.lock_waits.append((t0, time.monotonic() - t0))
            time.sleep(0.002)

    def _open(self, name: str) -> str:
        self._opened = getattr(self, "_opened", 0) + 1
        qpn = 0x1000 + self._opened
        return self.node.open_session(name, self.endpoint(qpn), identity=HOLDER).session_id

    # -- commands -----------------------------------------------------------------------------
    def hello(self) -> dict:
        return {"pid": os.getpid(), "service": self.service}

    def _grant_probe(self) -> None:
        """While on: Grant + Release one page on a seal of its own, in this process (no gRPC), back to back."""
        assert self._node_probe is not None
        sid, seal = self._node_probe
        while self._node_probing.is_set():
            t0 = time.monotonic()
            g = self.node.grant(sid, seal, 0, 4096, self.access, identity=HOLDER)
            self.node_grants.append((t0, time.monotonic() - t0))
            self.node.release(sid, g.grant_id, identity=HOLDER)
            time.sleep(0.002)

    def probe_grants(self, on: bool) -> dict:
        """Start or stop the in-process Grant probe."""
        if on and not self._node_probing.is_set():
            if self._node_probe is None:
                sid = self._open("scale-grant-probe")
                self.holders_extra.append(sid)
                self._node_probe = (sid, self.node.seal(sid, "scale/grant-probe", MiB, create=True,
                                                        identity=HOLDER).seal_id)
            self._node_probing.set()
            threading.Thread(target=self._grant_probe, name="scale-grant-probe", daemon=True).start()
        elif not on:
            self._node_probing.clear()
        return {}

    def node_grants_since(self, since: float) -> dict:
        return {"grants": [(t, d) for t, d in list(self.node_grants) if t >= since]}

    def probe_lock(self, on: bool) -> dict:
        (self._probing.set if on else self._probing.clear)()
        return {}

    def lock_waits_since(self, since: float) -> dict:
        """(start, seconds) of the lock probe's acquisitions since `since` (monotonic)."""
        return {"waits": [(t, d) for t, d in list(self.lock_waits) if t >= since]}

    def hold(self, sessions: int, grants: int, length: int, grant_length: int) -> dict:
        """Grow the load to `grants` grants in all over `sessions` sessions holding one shared seal."""
        t0 = time.monotonic()
        while len(self.holders) < sessions:
            sid = self._open(f"scale-holder-{len(self.holders)}")
            self.holders.append(sid)
            info = self.node.seal(sid, "scale/shared", length, create=True, identity=HOLDER)
            self.shared = info.seal_id
        seal_t = time.monotonic() - t0
        t0 = time.monotonic()
        added = 0
        while len(self.held) < grants:
            i = len(self.held)
            sid = self.holders[i % len(self.holders)]
            offset = (i * grant_length) % length
            g = self.node.grant(sid, self.shared, offset, grant_length, self.access, identity=HOLDER)
            self.held.append((sid, g.grant_id))
            added += 1
        took = time.monotonic() - t0
        return {"sessions": len(self.holders), "grants": len(self.held), "added": added, "seal_s": round(seal_t, 2),
                "grant_s": round(took, 2), "in_process_grant_ms": round(took / added * 1e3, 2) if added else None,
                "state": self.node.state_counts()}

    def drop_holders(self) -> dict:
        """End the load's sessions (what is left of them after a revocation)."""
        t0 = time.monotonic()
        for sid in self.holders:
            try:
                self.node.close_session(sid, identity=HOLDER)
            except Exception:  # noqa: BLE001
                pass
        self.holders, self.held, self.shared = [], [], None
        return {"seconds": round(time.monotonic() - t0, 2), "state": self.node.state_counts()}

    def seals(self, n: int, length: int) -> dict:
        """Grow to `n` sealed files of `length` bytes, held by one session (the audit's work)."""
        if self.audit_session is None:
            self.audit_session = self._open("scale-auditee")
        t0 = time.monotonic()
        added = 0
        while len(self.audit_seals) < n:
            info = self.node.seal(self.audit_session, f"scale/audit/f{len(self.audit_seals)}", length, create=True,
                                  identity=HOLDER)
            self.audit_seals.append(info.seal_id)
            added += 1
        took = time.monotonic() - t0
        return {"seals": len(self.audit_seals), "added": added, "seconds": round(took, 2),
                "seal_ms": round(took / added * 1e3, 2) if added else None, "state": self.node.state_counts()}

    def drop_seals(self) -> dict:
        t0 = time.monotonic()
        if self.audit_session is not None:
            self.node.close_session(self.audit_session, identity=HOLDER)
        self.audit_session, self.audit_seals = None, []
        return {"seconds": round(time.monotonic() - t0, 2)}

    def audit(self, passes: int, max_seconds: float) -> dict:
        """Audit passes back to back: their durations."""
        times: list[float] = []
        deadline = time.monotonic() + max_seconds
        while len(times) < passes and (not times or time.monotonic() < deadline):
            t0 = time.monotonic()
            moved = self.node.audit()
            times.append(time.monotonic() - t0)
            if moved:
                raise RuntimeError(f"the audit revoked {len(moved)} seals")
        return {"pass_s": [round(t, 4) for t in times]}

    def audit_during(self, after: float, seconds: float) -> dict:
        """In the background: wait `after` seconds, then audit back to back for `seconds`; audit_result() has the
        passes' windows (CLOCK_MONOTONIC, shared by every namespace of the guest)."""
        def run() -> None:
            time.sleep(after)
            windows = []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t0 = time.monotonic()
                self.node.audit()
                windows.append((t0, time.monotonic()))
            self._audit_out = {"windows": windows}
        self._auditing = threading.Thread(target=run, name="scale-audit", daemon=True)
        self._auditing.start()
        return {}

    def audit_result(self) -> dict:
        assert self._auditing is not None
        self._auditing.join()
        return self._audit_out

    def grants_since(self, since: float) -> dict:
        """(start, seconds) of the Grants clients asked for since `since` (monotonic)."""
        return {"grants": [(t, d) for t, d in list(self.grant_times) if t >= since]}

    def revocations(self) -> dict:
        """rdax_revocation_seconds so far: count and sum."""
        count = sum_ = 0.0
        for metric in self.metrics.revocation_seconds.collect():
            for sample in metric.samples:
                if sample.name.endswith("_count"):
                    count = sample.value
                elif sample.name.endswith("_sum"):
                    sum_ = sample.value
        return {"count": count, "sum_s": sum_, "state": self.node.state_counts()}

    def now(self) -> dict:
        return {"t": time.monotonic()}

    def close(self) -> None:
        self._stop.set()
        self.server.set_serving(False)
        self.node.shutdown()
        self.server.stop(2)
        self.audit_trail.close()


def main() -> None:
    install_sigio_guard()   # before any thread: a lease break's SIGIO kills the process by default
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # 1,000 seals hold 1,000 descriptors of files, beside sockets and devices.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    node = ScaleNode(*sys.argv[1:6])
    print(json.dumps({"ok": True, "pid": os.getpid(), "service": node.service}), flush=True)
    from labkit import serve
    try:
        serve(node, lambda exc: {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]})
    finally:
        node.close()


if __name__ == "__main__":
    main()
