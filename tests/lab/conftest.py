"""Lab fixtures: the guest's fsdax mount, the storage-side device and a
remote client process in the client namespace. No skips: a lab that cannot
provide rxe or DAX fails every test with the reason."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from pki import client_env, make_pki, server_args

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def lab() -> dict[str, str]:
    if os.environ.get("RDAX_LAB") != "1":
        pytest.fail("not inside the rdax lab guest (RDAX_LAB unset): run `make lab-test`", pytrace=False)
    if os.environ.get("RDAX_LAB_ERRORS"):
        pytest.fail(f"the lab could not provide its devices: {os.environ['RDAX_LAB_ERRORS']}", pytrace=False)
    mount = os.environ["RDAX_DAX_MOUNT"]
    with open("/proc/mounts") as f:
        opts = [line.split()[3] for line in f if line.split()[1] == mount]
    if not opts or "dax=always" not in opts[0]:
        pytest.fail(f"{mount} is not mounted with dax=always ({opts})", pytrace=False)
    return dict(os.environ)


@pytest.fixture(scope="session")
def pki(lab) -> dict[str, object]:
    """Mutual-TLS material (a CA, the node's certificate, one client certificate per lab identity) and the policy."""
    return make_pki(Path("/run/rdax-lab-pki"), [lab["RDAX_STORAGE_IP"], "127.0.0.1"])


@pytest.fixture
def dax_file(lab, request):
    """A fresh file on the DAX mount, removed afterwards; returns its path."""
    path = Path(lab["RDAX_DAX_MOUNT"]) / f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
    yield path
    path.unlink(missing_ok=True)


class RemotePeer:
    """tests/lab/peer.py running in the client namespace."""

    def __init__(self, netns: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, str(HERE / "peer.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def call(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer died during {op} (exit {self.proc.poll()})")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        # Do not wait for rxe's QP teardown after access errors (can be ~50 s).
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def peer(lab):
    p = RemotePeer(lab["RDAX_CLIENT_NS"])
    yield p
    p.close()


class Server:
    """rdax-server as a subprocess in this (storage) namespace, over mutual TLS with the lab's policy."""

    metrics_url: str   # set by the fixtures that start it with --metrics-listen

    def __init__(self, lab, root: Path, port: int, *extra: str, pki: dict[str, object]) -> None:
        self.root, self.port, self.pki = root, port, pki
        self.target = f"{lab['RDAX_STORAGE_IP']}:{port}"
        self.log = open(f"/tmp/rdax-server-{port}.log", "w+")
        self.audit_path = Path(f"/tmp/rdax-audit-{port}-{uuid.uuid4().hex[:6]}.jsonl")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rdax.service.cli", "--root", str(root), "--listen", self.target,
             "--device", lab["RDAX_STORAGE_DEV"], *server_args(pki, self.audit_path), *extra],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            self.log.seek(0)
            text = self.log.read()
            if "listening on" in text:
                return
            if self.proc.poll() is not None:
                pytest.fail(f"rdax-server exited {self.proc.returncode}:\n{text}", pytrace=False)
            time.sleep(0.2)
        pytest.fail(f"rdax-server did not start within 90 s:\n{text}", pytrace=False)

    def audit(self) -> list[dict]:
        """The audit trail so far, one dict per JSON line."""
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def export_root(lab):
    root = Path(lab["RDAX_DAX_MOUNT"]) / f"export-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    return root


@pytest.fixture(scope="module")
def server(lab, pki):
    """One node per test module (starting one takes seconds under emulation); tests use paths of their own.
    A test that stops or restarts a node starts its own."""
    root = Path(lab["RDAX_DAX_MOUNT"]) / f"export-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    s = Server(lab, root, 7700 + random.randrange(200), pki=pki)
    yield s
    s.stop()


class Client:
    """tests/lab/client_peer.py in the client namespace, connected to a server."""

    grant: dict            # what the fixtures that open a file for it keep: its grant,
    baseline_mrs: int      # and how many MRs the storage side had then

    def __init__(self, lab, target: str, pki: dict[str, object], who: str = "lab") -> None:
        self.who = who
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab["RDAX_CLIENT_NS"], sys.executable, str(HERE / "client_peer.py"), target],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=client_env(pki, who))
        hello = self.proc.stdout.readline()
        assert hello, f"client did not start (exit {self.proc.wait()})"
        self.session_id = json.loads(hello)["session_id"]

    def send(self, op: str, **args) -> None:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"client died (exit {self.proc.poll()})"
        return json.loads(line)

    def call(self, op: str, **args) -> dict:
        self.send(op, **args)
        return self.recv()

    def close(self) -> None:
        if self.proc.stdin.closed:   # closed already (a test may close it before its checks)
            return
        try:
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=20)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()


@pytest.fixture
def clients(lab, server, pki):
    made: list[Client] = []

    def make(n: int = 1, who: str = "lab") -> list[Client]:
        new = [Client(lab, server.target, pki, who) for _ in range(n)]
        made.extend(new)
        return new
    yield make
    for c in made:
        c.close()


def storage_mr_rkeys(lab) -> list[int]:
    """The rkeys of the memory regions registered on the storage device (`rdma res show mr`)."""
    out = subprocess.run(["rdma", "-j", "res", "show", "mr", "dev", lab["RDAX_STORAGE_DEV"]],
                         capture_output=True, text=True, check=True).stdout
    return [int(mr["rkey"], 16) if isinstance(mr["rkey"], str) else mr["rkey"]
            for mr in json.loads(out or "[]")]
