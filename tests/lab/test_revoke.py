"""Lab: each seal breaker, while a client streams RDMA writes into the sealed
file, revokes the grant — nothing lands afterwards, the breaker's own
operation succeeds without sitting out the lease-break time, the client is told."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Client, Server, storage_mr_rkeys

HERE = Path(__file__).parent

MiB = 1 << 20
LENGTH = 8 * MiB
LEASE_BREAK_TIME = float(open("/proc/sys/fs/lease-break-time").read())

BREAKERS = {
    # name: (argv run by another process, path operation? (the lease does not see it))
    "open": ["sh", "-c", "cat {path} > /dev/null"],
    "truncate": [sys.executable, "-c", "import os, sys; os.truncate(sys.argv[1], 4 << 20)", "{path}"],
    # coreutils truncate opens O_NONBLOCK: the kernel answers EAGAIN while the
    # lease break is pending, and the open goes through once rdax let go.
    "truncate_nonblocking_retried": ["sh", "-c", ("for i in $(seq 100); do truncate -s 4M {path} 2>/dev/null "
                                                  "&& exit 0; sleep 0.05; done; exit 1")],
    "punch_hole": ["fallocate", "--punch-hole", "--offset", "0", "--length", "65536", "{path}"],
    "zero_range": ["fallocate", "--zero-range", "--offset", "0", "--length", "65536", "{path}"],
    "collapse_range": ["fallocate", "--collapse-range", "--offset", "0", "--length", "65536", "{path}"],
    "insert_range": ["fallocate", "--insert-range", "--offset", "0", "--length", "65536", "{path}"],
    "write_other_descriptor": ["dd", "if=/dev/zero", "of={path}", "bs=4096", "count=1", "conv=notrunc",
                               "status=none"],
    "reflink": ["cp", "--reflink=always", "{path}", "{path}.reflink"],
    "clone_into": ["sh", "-c", ("head -c 65536 /dev/zero > {path}.src && "
                                "xfs_io -c 'reflink {path}.src 0 0 65536' {path}")],
    "dedupe": [sys.executable, str(HERE / "dedupe_breaker.py"), "{path}"],
    "rename": ["mv", "{path}", "{path}.moved"],
    "link": ["ln", "{path}", "{path}.link"],
    "unlink": ["rm", "{path}"],
    "chmod": ["chmod", "0640", "{path}"],
    "chattr": ["xfs_io", "-c", "chattr +A", "{path}"],
}


def sha256_of(path) -> str:
    with open(path, "rb") as f:   # our own read: a second open by the test process
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def shared_server(lab, pki):
    """One server for every breaker (each breaks its own file): starting one takes seconds."""
    root = Path(lab["RDAX_DAX_MOUNT"]) / f"revoke-{time.monotonic_ns()}"
    root.mkdir()
    server = Server(lab, root, 7900, pki=pki)
    yield server
    server.stop()


@pytest.fixture
def streaming_client(lab, shared_server):
    client = Client(lab, shared_server.target, shared_server.pki)
    yield client
    client.close()


@pytest.mark.parametrize("breaker", sorted(BREAKERS))
def test_revoke_breaker_while_streaming(shared_server, streaming_client, breaker):
    server, client = shared_server, streaming_client
    grant = client.call("open", name="f", path=f"victim-{breaker}", length=LENGTH)
    assert grant["ok"], grant
    path = server.root / f"victim-{breaker}"
    client.send("stream", name="f")     # the client now writes 64 KiB after 64 KiB, until stopped
    time.sleep(2.0)
    argv = [a.format(path=path) for a in BREAKERS[breaker]]
    start = time.monotonic()
    run = subprocess.run(argv, capture_output=True, text=True, timeout=LEASE_BREAK_TIME + 30)
    took = time.monotonic() - start
    assert run.returncode == 0, f"{breaker}: {run.stderr}"
    assert took < LEASE_BREAK_TIME / 2, f"{breaker} waited {took:.1f} s: it sat out the lease-break time"

    stream = client.recv()                       # the stream stops at the revocation...
    notice = client.call("revoked", name="f")    # ...and Watch told the client why
    assert notice["revoked"], f"client was not notified of the revocation ({breaker})"
    assert notice["epoch"] >= 2
    assert stream["stopped_by"] in ("WorkCompletionError", "GrantRevoked", "SessionLost"), stream
    assert stream["writes"] > 0, "the client never wrote before the break"

    # After the revocation: nothing more lands, whatever the client tries.
    live = path if path.exists() else next(server.root.glob(f"victim-{breaker}.*"), None)
    if live is not None:
        before = sha256_of(live)
        # Straight at the old rkey, past the library's own GrantRevoked check.
        retry = client.call("raw_write", rkey=grant["rkey"], remote_addr=grant["remote_addr"],
                            length=65536, seed=99)
        assert not retry["ok"], retry
        time.sleep(1.0)
        assert sha256_of(live) == before, "bytes landed after the revocation"


def test_revoke_then_reseal_and_regrant_work(server, clients):
    (client,) = clients(1)
    assert client.call("open", name="f", path="again", length=MiB)["ok"]
    run = subprocess.run(["sh", "-c", f"cat {server.root / 'again'} > /dev/null"], timeout=60)
    assert run.returncode == 0
    assert client.call("revoked", name="f")["revoked"]
    # The breaker is done: a new seal and grant on the same path work again.
    reopened = client.call("open", name="g", path="again", length=MiB)
    assert reopened["ok"] and reopened["epoch"] == 1, reopened
    assert client.call("write", name="g", offset=0, length=MiB, seed=21)["ok"]
    assert client.call("flush", name="g", offset=0, length=MiB)["ok"]
    assert client.call("read_equals", name="g", offset=0, length=MiB, seed=21)["equal"]


def test_revoke_client_killed_loses_grants_after_lease_time(lab, export_root, pki):
    server = Server(lab, export_root, 7950, "--lease-seconds", "3", pki=pki)
    try:
        client = Client(lab, server.target, pki)
        grant = client.call("open", name="f", path="orphan", length=MiB)
        assert grant["ok"], grant
        assert grant["rkey"] in storage_mr_rkeys(lab)
        client.proc.kill()                     # SIGKILL: no CloseSession, no more heartbeats
        deadline = time.monotonic() + 3 * 3 + 5
        while grant["rkey"] in storage_mr_rkeys(lab) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert grant["rkey"] not in storage_mr_rkeys(lab), "the dead client's grant outlived its session lease"
        # ...and its seal let the file go: another process may open it at once.
        start = time.monotonic()
        assert subprocess.run(["sh", "-c", f"cat {export_root / 'orphan'} > /dev/null"], timeout=60).returncode == 0
        assert time.monotonic() - start < 5
    finally:
        server.stop()


def test_revoke_write_racing_a_breaker_lands_only_inside_its_range(server, clients):
    """1 MiB writes to [1, 2) MiB of a 4 MiB seal while a breaker opens the file: the write in flight at the
    revocation lands whole or fails, and whatever of it landed lies inside its target range."""
    (client,) = clients(1)
    assert client.call("open", name="f", path="race", length=4 * MiB)["ok"]
    client.send("stream", name="f", chunk=MiB, at=MiB)
    time.sleep(2.0)
    with open(server.root / "race", "rb"):   # the breaker: returns once the grant is deregistered
        pass
    stream = client.recv()
    assert stream["writes"] > 0 and stream["stopped_by"] in ("WorkCompletionError", "GrantRevoked", "SessionLost")
    data = (server.root / "race").read_bytes()
    assert data[:MiB] == bytes(MiB) and data[2 * MiB:] == bytes(2 * MiB), "bytes landed outside the target range"
    done = stream["writes"]                          # writes 0 .. done-1 completed
    last_ok, in_flight = (done - 1) % 251 + 1, done % 251 + 1
    pages = [data[o:o + 4096] for o in range(MiB, 2 * MiB, 4096)]
    values = [page[0] for page in pages]
    assert all(page == bytes([page[0]]) * 4096 for page in pages), "a page holds bytes of two writes"
    assert set(values) <= {last_ok, in_flight}, (set(values), last_ok, in_flight)
    landed = values.count(in_flight) if in_flight != last_ok else 0
    print(f"racing write: {done} writes completed; the one in flight ({stream['stopped_by']}) "
          f"landed {landed} of 256 pages")
