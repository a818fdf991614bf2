"""Lab: rdax-server in the storage namespace, rdax clients in the client
namespace, over real rxe devices and the fsdax mount."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import Client, Server, storage_mr_rkeys
from labkit import pattern
from pki import client_env

MiB = 1 << 20
REM_ACCESS_ERR = 10
RETRY_EXC_ERR = 12
WRITE, READ, ATOMIC, FLUSH = 1, 2, 4, 8


def test_put_256mib_sha256_matches_on_storage_side(lab, server, tmp_path):
    src = tmp_path / "source"
    src.write_bytes(os.urandom(256 * MiB))
    run = subprocess.run(["ip", "netns", "exec", lab["RDAX_CLIENT_NS"], sys.executable, "-m", "rdax.client.cli",
                          "--target", server.target, "put", "-q", str(src), "big-blob"],
                         capture_output=True, text=True, timeout=600, env=client_env(server.pki))
    assert run.returncode == 0, run.stderr
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    assert want in run.stdout
    got = hashlib.sha256((server.root / "big-blob").read_bytes()[: 256 * MiB]).hexdigest()
    assert got == want


def test_four_clients_write_disjoint_ranges(lab, server, clients):
    baseline = len(storage_mr_rkeys(lab))
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
    assert len(storage_mr_rkeys(lab)) == baseline, "memory regions leaked after release"


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


def test_write_starting_inside_a_page_is_refused_before_it_is_sent_bad_flow(server, clients):
    (c,) = clients(1)
    g = c.call("open", name="f", path="unaligned", length=64 * 1024)
    # The node's canary found the rxe ODP bug on this kernel and says so in every grant.
    assert g["ok"] and g["write_alignment"] == 4096, g
    r = c.call("write", name="f", offset=4096 + 100, length=200, seed=68)
    assert not r["ok"] and "4096-byte boundaries" in r["error"] and "start at 4096" in r["error"], r
    r = c.call("write", name="f", offset=4096, length=300, seed=69, flush=True)   # from the page start
    assert r["ok"] and r["bytes"] == 300, r
    data = (server.root / "unaligned").read_bytes()
    assert data[4096:4396] == pattern(69, 300)
    assert data[:4096] + data[4396:] == bytes(64 * 1024 - 300), "bytes landed outside the write"


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


def test_server_restart_leaves_no_stale_registration_bad_flow(lab, export_root, pki):
    server = Server(lab, export_root, 7650, pki=pki)   # its own node: this test kills it
    old = Client(lab, server.target, server.pki)
    g = old.call("open", name="f", path="restart", length=MiB)
    assert g["ok"], g
    server.stop(signal.SIGKILL)
    restarted = Server(lab, export_root, server.port + 1, pki=server.pki)
    try:
        new = Client(lab, restarted.target, server.pki)
        assert new.call("open", name="f", path="elsewhere", length=MiB)["ok"]
        r = new.call("raw_write", rkey=g["rkey"], remote_addr=g["remote_addr"], length=4096, seed=14)
        assert not r["ok"] and r["status"] == REM_ACCESS_ERR, r
        assert (export_root / "restart").read_bytes() == bytes(MiB)
        new.close()
    finally:
        old.proc.kill()
        restarted.stop()


def test_write_to_a_killed_node_fails_within_seconds_bad_flow(lab, export_root, pki):
    """Issue 11 §2: with the node gone (SIGKILL: its QPs destroyed, no Watch event, no NOT_FOUND), a write fails
    by the QP's own retries running out (IBV_WC_RETRY_EXC_ERR), in about half a second, not never: rxe retried
    for ever with retry_cnt 7."""
    server = Server(lab, export_root, 7660, pki=pki)
    client = Client(lab, server.target, server.pki)
    try:
        g = client.call("open", name="f", path="killed", length=MiB)
        assert g["ok"], g
        server.stop(signal.SIGKILL)
        started = time.monotonic()
        r = client.call("raw_write", rkey=g["rkey"], remote_addr=g["remote_addr"], length=4096, seed=15)
        took = time.monotonic() - started
        assert not r["ok"] and r.get("status") == RETRY_EXC_ERR, r
        assert took < 10, f"the write took {took:.1f} s to fail"
    finally:
        client.proc.kill()


def test_write_with_flush_is_durable_in_one_call(server, clients):
    (c,) = clients(1)
    assert c.call("open", name="f", path="durable", length=4 * MiB)["ok"]
    # 3 MiB + 4 KiB: several staging chunks, FLUSH behind the last write only.
    r = c.call("write", name="f", offset=4096, length=3 * MiB + 4096, seed=41, flush=True)
    assert r["ok"] and r["bytes"] == 3 * MiB + 4096, r
    # 100 bytes at the start of the last page: one request, WRITE+FLUSH posted together.
    r = c.call("write", name="f", offset=4 * MiB - 4096, length=100, seed=42, flush=True)
    assert r["ok"] and r["bytes"] == 100, r
    data = (server.root / "durable").read_bytes()   # (opening it here breaks the seal: last)
    assert data[4096:4096 + 3 * MiB + 4096] == pattern(41, 3 * MiB + 4096)
    assert data[:4096] == bytes(4096)
    assert data[4 * MiB - 4096:4 * MiB - 3996] == pattern(42, 100)
    assert data[3 * MiB + 8192:4 * MiB - 4096] + data[4 * MiB - 3996:] == bytes(MiB - 8192 - 100)


def test_writev_lands_every_piece_durably_in_one_batch(server, clients):
    """Many small records, out of order and one of them several staging chunks long, in one writev: every
    piece where it was aimed, nothing between them."""
    (c,) = clients(1)
    assert c.call("open", name="f", path="vectored", length=4 * MiB)["ok"]
    pieces = [(3 * MiB, 4096, 81), (0, 100, 82), (8192, 4096 * 3 + 5, 83), (MiB, 2 * MiB + 4096, 84)]
    pieces += [(3 * MiB + 4096 * (2 + i), 512, 90 + i) for i in range(100)]   # more requests than the queue holds
    r = c.call("writev", name="f", pieces=pieces)
    assert r["ok"] and r["bytes"] == sum(n for _, n, _ in pieces), r
    expected = bytearray(4 * MiB)
    for off, n, seed in pieces:
        expected[off:off + n] = pattern(seed, n)
    assert (server.root / "vectored").read_bytes() == bytes(expected)


def test_writev_refuses_a_bad_piece_before_sending_any_bad_flow(server, clients):
    """A piece outside the grant, one starting inside a page, or more than the staging buffer holds: refused
    with what to do, and no piece of the batch is written."""
    (c,) = clients(1)
    assert c.call("open", name="f", path="vectored-bad", length=MiB)["ok"]
    for bad, says in (((MiB - 4096, 8192, 2), "outside the grant"), ((4096 + 1, 10, 3), "4096-byte boundaries"),
                      ((0, 16 * MiB, 4), "split the pieces into batches")):
        r = c.call("writev", name="f", pieces=[(0, 4096, 1), bad])
        assert not r["ok"] and says in r["error"], r
    assert (server.root / "vectored-bad").read_bytes() == bytes(MiB), "a refused batch wrote something"


def rdax_cli(lab, server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", lab["RDAX_CLIENT_NS"], sys.executable, "-m", "rdax.client.cli",
                           "--target", server.target, *args], capture_output=True, timeout=600,
                          env=client_env(server.pki))


@pytest.mark.parametrize("size", [1000, 4096, 3 * MiB + 17])
def test_put_keeps_size_of_its_source(lab, server, tmp_path, size):
    src = tmp_path / "source"
    src.write_bytes(os.urandom(size))
    run = rdax_cli(lab, server, "put", "-q", str(src), f"sized-{size}")
    assert run.returncode == 0, run.stderr
    stored = server.root / f"sized-{size}"
    assert stored.stat().st_size == size, "the file kept the seal's whole pages"
    assert stored.read_bytes() == src.read_bytes()


def test_get_reads_a_file_back_and_cat_needs_no_length(lab, server, tmp_path):
    data = os.urandom(2 * MiB + 123)
    (server.root / "to-get").write_bytes(data)
    local = tmp_path / "got"
    run = rdax_cli(lab, server, "get", "-q", "to-get", str(local))
    assert run.returncode == 0, run.stderr
    assert local.read_bytes() == data
    assert hashlib.sha256(data).hexdigest() in run.stdout.decode()
    assert (server.root / "to-get").stat().st_size == len(data), "reading it changed its size"
    cat = rdax_cli(lab, server, "cat", "to-get")
    assert cat.returncode == 0, cat.stderr
    assert cat.stdout == data


def test_get_missing_file_bad_flow(lab, server, tmp_path):
    run = rdax_cli(lab, server, "get", "-q", "nothing-here", str(tmp_path / "x"))
    assert run.returncode == 1 and b"NOT_FOUND" in run.stderr, run.stderr


def test_session_ended_by_the_node_fails_pending_writes_fast_bad_flow(lab, server, clients):
    """The node ends a client's session (here: another process of the same identity closes it) while the client
    streams writes: its QP is destroyed and rxe's retries were seen not to fire for 60 s, so the library must
    stop waiting on the node's word (Watch, heartbeat), within a few seconds."""
    writer, other = clients(2)
    assert writer.call("open", name="f", path="ended", length=8 * MiB)["ok"]
    writer.send("stream", name="f", chunk=1 << 20, seconds=120)
    time.sleep(2.0)
    started = time.monotonic()
    closed = other.call("rpc", method="CloseSession", fields={"session_id": writer.session_id})
    assert closed["code"] == "OK", closed
    stream = writer.recv()
    took = time.monotonic() - started
    print(f"writer stopped {took:.2f} s after its session was closed: {stream['stopped_by']}: {stream['error']}")
    assert stream["stopped_by"] in ("SessionLost", "GrantRevoked", "WorkCompletionError"), stream
    assert took < 10, f"the writer waited {took:.1f} s"
    # A later operation on the dead session: refused at once, with the reason, before anything is posted.
    time.sleep(1.0)
    started = time.monotonic()
    later = writer.call("write", name="f", offset=0, length=4096, seed=1)
    assert not later["ok"] and "ended this session" in later["error"], later
    assert time.monotonic() - started < 5
