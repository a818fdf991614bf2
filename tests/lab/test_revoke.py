"""Lab: each seal breaker, while a client streams RDMA writes into the sealed
file, revokes the grant — nothing lands afterwards, the breaker's own
operation succeeds without sitting out the lease-break time, the client is told."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import pytest

MiB = 1 << 20
LENGTH = 8 * MiB
LEASE_BREAK_TIME = float(open("/proc/sys/fs/lease-break-time").read())

BREAKERS = {
    # name: (argv run by another process, path operation? (the lease does not see it))
    "open": ["sh", "-c", "cat {path} > /dev/null"],
    "truncate": [sys.executable, "-c", "import os, sys; os.truncate(sys.argv[1], 4 << 20)", "{path}"],
    # coreutils truncate opens O_NONBLOCK: the kernel answers EAGAIN while the
    # lease break is pending, and the open goes through once rdax let go.
    "truncate_nonblocking_retried": ["sh", "-c", "for i in $(seq 100); do truncate -s 4M {path} 2>/dev/null "
                                     "&& exit 0; sleep 0.05; done; exit 1"],
    "punch_hole": ["fallocate", "--punch-hole", "--offset", "0", "--length", "65536", "{path}"],
    "zero_range": ["fallocate", "--zero-range", "--offset", "0", "--length", "65536", "{path}"],
    "collapse_range": ["fallocate", "--collapse-range", "--offset", "0", "--length", "65536", "{path}"],
    "insert_range": ["fallocate", "--insert-range", "--offset", "0", "--length", "65536", "{path}"],
    "write_other_descriptor": ["dd", "if=/dev/zero", "of={path}", "bs=4096", "count=1", "conv=notrunc",
                               "status=none"],
    "rename": ["mv", "{path}", "{path}.moved"],
    "link": ["ln", "{path}", "{path}.link"],
    "unlink": ["rm", "{path}"],
    "chmod": ["chmod", "0640", "{path}"],
}


def sha256_of(path) -> str:
    with open(path, "rb") as f:   # our own read: a second open by the test process
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("breaker", sorted(BREAKERS))
def test_revoke_breaker_while_streaming(server, clients, breaker):
    (client,) = clients(1)
    grant = client.call("open", name="f", path="victim", length=LENGTH)
    assert grant["ok"], grant
    path = server.root / "victim"
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
    assert stream["stopped_by"] in ("WorkCompletionError", "GrantRevoked"), stream
    assert stream["writes"] > 0, "the client never wrote before the break"

    # After the revocation: nothing more lands, whatever the client tries.
    live = path if path.exists() else next(server.root.glob("victim*"), None)
    if live is not None:
        before = sha256_of(live)
        # Straight at the old rkey, past the library's own GrantRevoked check.
        retry = client.call("raw_write", rkey=grant["rkey"], remote_addr=grant["remote_addr"], length=65536, seed=99)
        assert not retry["ok"], retry
        time.sleep(1.0)
        assert sha256_of(live) == before, "bytes landed after the revocation"
