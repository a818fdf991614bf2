"""Lab: rdax-server in the storage namespace, rdax clients in the client
namespace, over real rxe devices and the fsdax mount."""
from __future__ import annotations

import hashlib
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

HERE = Path(__file__).parent
MiB = 1 << 20
REM_ACCESS_ERR = 10
WRITE, READ, ATOMIC, FLUSH = 1, 2, 4, 8


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


class Server:
    """rdax-server as a subprocess in this (storage) namespace."""

    def __init__(self, lab, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.target = f"{lab['RDAX_STORAGE_IP']}:{port}"
        self.log = open(f"/tmp/rdax-server-{port}.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rdax.service.cli", "--root", str(root), "--listen", self.target,
             "--device", lab["RDAX_STORAGE_DEV"]], stdout=self.log, stderr=subprocess.STDOUT)
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


@pytest.fixture
def server(lab, export_root):
    s = Server(lab, export_root, 7700 + random.randrange(200))
    yield s
    s.stop()


class Client:
    """tests/lab/client_peer.py in the client namespace, connected to a server."""

    def __init__(self, lab, target: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab["RDAX_CLIENT_NS"], sys.executable, str(HERE / "client_peer.py"), target],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
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
        try:
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=20)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()


@pytest.fixture
def clients(lab, server):
    made: list[Client] = []

    def make(n: int = 1) -> list[Client]:
        new = [Client(lab, server.target) for _ in range(n)]
        made.extend(new)
        return new
    yield make
    for c in made:
        c.close()


def storage_mr_count(lab) -> int:
    out = subprocess.run(["rdma", "-j", "res", "show", "mr", "dev", lab["RDAX_STORAGE_DEV"]],
                         capture_output=True, text=True, check=True).stdout
    return len(json.loads(out or "[]"))


def test_put_256mib_sha256_matches_on_storage_side(lab, server, tmp_path):
    src = tmp_path / "source"
    src.write_bytes(os.urandom(256 * MiB))
    run = subprocess.run(["ip", "netns", "exec", lab["RDAX_CLIENT_NS"], sys.executable, "-m", "rdax.client.cli",
                          "--target", server.target, "put", "-q", str(src), "big-blob"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    assert want in run.stdout
    got = hashlib.sha256((server.root / "big-blob").read_bytes()[: 256 * MiB]).hexdigest()
    assert got == want


def test_four_clients_write_disjoint_ranges(lab, server, clients):
    baseline = storage_mr_count(lab)
    four = clients(4)
    quarter = 4 * MiB
    for i, c in enumerate(four):
        r = c.call("open", name="f", path="shared", length=4 * quarter, offset=i * quarter, grant_length=quarter)
        assert r["ok"], r
    for i, c in enumerate(four):  # all four stream at once
        c.send("write", name="f", offset=i * quarter, length=quarter, seed=100 + i)
    assert all(c.recv()["ok"] for c in four)
    for i, c in enumerate(four):
        assert c.call("flush", name="f", offset=i * quarter, length=quarter)["ok"]
    data = (server.root / "shared").read_bytes()
    for i in range(4):
        assert data[i * quarter:(i + 1) * quarter] == pattern(100 + i, quarter), f"range {i} differs"
    for c in four:
        assert c.call("close_file", name="f")["ok"]
    assert storage_mr_count(lab) == baseline, "memory regions leaked after release"


def test_leaked_rkey_from_another_clients_qp_bad_flow(server, clients):
    owner, thief = clients(2)
    g = owner.call("open", name="f", path="victim", length=MiB)
    assert thief.call("open", name="f", path="other", length=MiB)["ok"]
    r = thief.call("raw_write", rkey=g["rkey"], remote_addr=g["remote_addr"], length=4096, seed=7)
    assert not r["ok"] and r["status"] == REM_ACCESS_ERR, r
    assert (server.root / "victim").read_bytes() == bytes(MiB)


@pytest.mark.parametrize("where", ["one_byte_before", "one_byte_past", "straddling_end"])
def test_write_outside_grant_bad_flow(server, clients, where):
    (c,) = clients(1)
    g = c.call("open", name="f", path=f"bounds-{where}", length=64 * 1024, offset=16384, grant_length=16384)
    assert g["ok"], g
    start, end = g["remote_addr"], g["remote_addr"] + 16384
    addr, length = {"one_byte_before": (start - 1, 1), "one_byte_past": (end, 1),
                    "straddling_end": (end - 4, 8)}[where]
    r = c.call("raw_write", rkey=g["rkey"], remote_addr=addr, length=length, seed=9)
    assert not r["ok"] and r["status"] == REM_ACCESS_ERR, r
    assert (server.root / f"bounds-{where}").read_bytes() == bytes(64 * 1024), "bytes landed outside the grant"


def test_read_only_grant_refuses_writes_bad_flow(server, clients):
    (c,) = clients(1)
    (server.root / "ro").write_bytes(pattern(11, MiB))
    g = c.call("open", name="f", path="ro", length=MiB, access=READ)
    assert g["ok"], g
    assert c.call("read_equals", name="f", offset=0, length=MiB, seed=11)["equal"]
    r = c.call("raw_write", rkey=g["rkey"], remote_addr=g["remote_addr"], length=4096, seed=12)
    assert not r["ok"] and r["status"] == REM_ACCESS_ERR, r
    assert (server.root / "ro").read_bytes() == pattern(11, MiB)


def test_commit_persists_written_range(server, clients):
    (c,) = clients(1)
    assert c.call("open", name="f", path="committed", length=MiB, access=WRITE | READ)["ok"]
    assert c.call("write", name="f", offset=0, length=MiB, seed=13)["ok"]
    r = c.call("commit", name="f", offset=0, length=MiB)
    assert r["ok"] and r["bytes"] == MiB, r
    assert (server.root / "committed").read_bytes() == pattern(13, MiB)


def test_server_restart_leaves_no_stale_registration_bad_flow(lab, export_root, server):
    old = Client(lab, server.target)
    g = old.call("open", name="f", path="restart", length=MiB)
    assert g["ok"], g
    server.stop(signal.SIGKILL)
    restarted = Server(lab, export_root, server.port + 1)
    try:
        new = Client(lab, restarted.target)
        assert new.call("open", name="f", path="elsewhere", length=MiB)["ok"]
        r = new.call("raw_write", rkey=g["rkey"], remote_addr=g["remote_addr"], length=4096, seed=14)
        assert not r["ok"] and r["status"] == REM_ACCESS_ERR, r
        assert (export_root / "restart").read_bytes() == bytes(MiB)
        new.close()
    finally:
        old.proc.kill()
        restarted.stop()
