"""Lab: the native post-and-poll (rdma/fastpath) and the pure-pyverbs path of Connection, side by side on the same
data-path checks: every byte where it was aimed, errors reported as the completion's status, waits that stop."""
from __future__ import annotations

import hashlib

import pytest
from labkit import pattern
from test_data_path import ALL, MiB, Storage

from rdax.rdma import REM_ACCESS_ERR, Access, Connection, open_device, register
from rdax.rdma.connection import native_available

PATHS = [pytest.param(True, id="native"), pytest.param(False, id="pyverbs")]


@pytest.fixture
def storage(lab, dax_file):
    s = Storage(lab, dax_file, 8 * MiB)
    yield s
    s.close()


def test_fastpath_is_built_in_the_lab_and_chosen_by_default(lab):
    """The lab root builds rdma/fastpath; a Connection then uses it unless told not to."""
    assert native_available(), "rdax_fastpath is not importable in the lab venv (lab/build-root.sh builds it)"
    dev = open_device(name=lab["RDAX_STORAGE_DEV"])
    pd = dev.alloc_pd()
    try:
        with Connection(dev, pd) as default, Connection(dev, pd, native=False) as plain:
            assert default.native and not plain.native
    finally:
        pd.close()
        dev.close()


@pytest.mark.parametrize("native", PATHS)
def test_fastpath_write_flush_lands_each_request_exactly(storage, peer, native):
    assert storage.connect(peer, native=native)["native"] is native
    mr = register(storage.pd, storage.map.addr, storage.length, Access.WRITE | Access.FLUSH)
    spots = [(0, 64, 61), (4096, 4096 + 100, 62), (MiB, 8, 63), (3 * MiB, 4096, 64), (3 * MiB + 3 * 4096, 1, 65)]
    for off, n, seed in spots:
        reply = peer.call("write_flush", rkey=mr.rkey, raddr=mr.addr + off, length=n, seed=seed)
        assert reply["ok"] and reply["bytes"] == n, reply
    expected = bytearray(storage.length)
    for off, n, seed in spots:
        expected[off:off + n] = pattern(seed, n)
    assert storage.pread(0, storage.length) == bytes(expected)
    mr.close()


@pytest.mark.parametrize("native", PATHS)
@pytest.mark.parametrize("flush", [False, True], ids=["write", "write_flush"])
def test_fastpath_pipelined_writes_land_and_read_back(storage, peer, native, flush):
    """More requests than the queue holds (depth 16, one in 4 signalled), in reverse order, with and without a
    FLUSH behind the batch; then RDMA READ brings back what the file holds."""
    assert storage.connect(peer, native=native, depth=16, signal_every=4, buffer=8 * MiB)["native"] is native
    mr = register(storage.pd, storage.map.addr, storage.length, ALL)
    length = 4 * MiB + 3 * 4096
    reply = peer.call("write_many", rkey=mr.rkey, raddr=mr.addr + MiB, length=length, seed=70, chunk=4096,
                      flush=flush, tail_first=True)
    assert reply["ok"] and reply["bytes"] == length, reply
    assert storage.pread(MiB, length) == pattern(70, length)
    assert storage.pread(0, MiB) == bytes(MiB), "bytes before the written range changed"
    rest = storage.length - MiB - length
    assert storage.pread(MiB + length, rest) == bytes(rest), "bytes after the written range changed"
    back = peer.call("read", rkey=mr.rkey, raddr=mr.addr + MiB, length=length, chunk=64 * 1024)
    assert back["ok"] and back["sha256"] == hashlib.sha256(pattern(70, length)).hexdigest(), back
    mr.close()


@pytest.mark.parametrize("native", PATHS)
def test_fastpath_write_flush_beyond_the_region_bad_flow(storage, peer, native):
    """The error is the completion's status, the QP is in error, nothing lands."""
    assert storage.connect(peer, native=native)["native"] is native
    mr = register(storage.pd, storage.map.addr, MiB, Access.WRITE | Access.FLUSH)
    reply = peer.call("write_flush", rkey=mr.rkey, raddr=mr.addr + MiB - 2048, length=4096, seed=66)
    assert not reply["ok"] and reply["status"] == REM_ACCESS_ERR, reply
    assert peer.call("state")["state"] == "ERR"
    assert storage.pread(0, 2 * MiB) == bytes(2 * MiB), "a write beyond the region landed"
    mr.close()


@pytest.mark.parametrize("native", PATHS)
def test_fastpath_pipelined_write_into_a_deregistered_region_bad_flow(storage, peer, native):
    """A batch through an rkey that is gone: the first error stops the wait, with its status."""
    assert storage.connect(peer, native=native, depth=16, signal_every=4)["native"] is native
    mr = register(storage.pd, storage.map.addr, storage.length, Access.WRITE | Access.FLUSH)
    rkey, addr = mr.rkey, mr.addr
    mr.close()
    reply = peer.call("write_many", rkey=rkey, raddr=addr, length=MiB, seed=71, chunk=4096, flush=True)
    assert not reply["ok"] and reply["status"] == REM_ACCESS_ERR, reply
    assert storage.pread(0, MiB) == bytes(MiB), "a write through a deregistered region landed"


@pytest.mark.parametrize("native", PATHS)
def test_fastpath_abandon_stops_a_wait_for_a_peer_that_is_gone_bad_flow(storage, peer, native):
    """The node's QP is destroyed, so nothing ever answers; abandon() from another thread ends the wait (the
    native path waits with the GIL released and looks at the flag between its slices), well before the QP's own
    retries would (about half a second)."""
    assert storage.connect(peer, native=native)["native"] is native
    mr = register(storage.pd, storage.map.addr, storage.length, Access.WRITE | Access.FLUSH)
    storage.conn.close()
    reply = peer.call("write_flush_abandoned", rkey=mr.rkey, raddr=mr.addr, length=4096, after=0.05)
    assert reply["ok"] and reply["abandoned"], reply
    assert reply["seconds"] < 5, reply
    assert storage.pread(0, 4096) == bytes(4096)
    mr.close()


def test_fastpath_close_during_a_native_write_flush_bad_flow(storage, peer):
    """close() from another thread while write_flush spins in C (GIL released) on a request nobody answers: close
    waits for the C call to come back before it destroys the QP and CQ (no use after free: the peer process
    lives and answers), the write_flush raises Abandoned, and so does one on the closed connection."""
    assert storage.connect(peer, native=True)["native"] is True
    mr = register(storage.pd, storage.map.addr, storage.length, Access.WRITE | Access.FLUSH)
    storage.conn.close()
    # (spin 0.25 s: shorter than the QP's own retries, about half a second, which would end the wait with an error)
    reply = peer.call("write_flush_closed", rkey=mr.rkey, raddr=mr.addr, length=4096, after=0.02, spin=0.25)
    assert reply["ok"] and reply.get("abandoned"), reply
    assert "closed" in reply["error"] and "closed" in reply["after_close"], reply
    # close() came while the C call spun (0.25 s) and had to wait for it
    assert 0.1 < reply["close_s"] < 5, reply
    assert reply["seconds"] < 5, reply
    assert storage.pread(0, 4096) == bytes(4096)
    mr.close()
