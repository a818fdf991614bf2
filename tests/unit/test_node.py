"""Tests for service.node: sessions, seals, grants and revocation on real files, with a fake fabric."""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import CLIENT_ENDPOINT, MIB, PAGE, FakeFabric, is_leased, is_mapped, open_fds, open_from_another_process

from rdax.service.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    RdaxError,
    ResourceExhausted,
    Unavailable,
)
from rdax.service.fabric_api import Endpoint
from rdax.service.grants import ACCESS_ATOMIC, ACCESS_FLUSH, ACCESS_READ, ACCESS_WRITE
from rdax.service.node import Node
from rdax.service.sessions import EventKind

RW = ACCESS_WRITE | ACCESS_READ


def session(node: Node, name: str = "c1") -> str:
    return node.open_session(name, CLIENT_ENDPOINT).session_id


# -- sessions -----------------------------------------------------------------
def test_open_session_returns_node_endpoint_and_lease(node: Node, fabric: FakeFabric) -> None:
    opened = node.open_session("client-a", CLIENT_ENDPOINT)
    assert len(opened.session_id) >= 22   # >= 128 random bits, base64: a credential, not a name
    assert opened.lease_seconds == 30
    assert opened.endpoint == fabric.channels[0].endpoint
    assert fabric.channels[0].remote == dataclasses.replace(CLIENT_ENDPOINT,
                                                            gid="0000:0000:0000:0000:0000:ffff:0a4d:0002")


def test_open_session_mtu_1024_bad_flow(node: Node, fabric: FakeFabric) -> None:
    with pytest.raises(FailedPrecondition, match="mtu is 1024.*4096.*ODP") as info:
        node.open_session("c", Endpoint(qpn=1, gid="::ffff:1.2.3.4", psn=1, mtu=1024))
    assert info.value.code == "FAILED_PRECONDITION"
    assert fabric.channels == []


@pytest.mark.parametrize("endpoint, words", [
    (None, "endpoint is missing"),
    (Endpoint(qpn=0, gid="::ffff:1.2.3.4", psn=1, mtu=4096), "not a QP number"),
    (Endpoint(qpn=1, gid="10.77.0.2", psn=1, mtu=4096), "IPv6 notation"),
    (Endpoint(qpn=1, gid="::1", psn=1 << 24, mtu=4096), "24 bits"),
])
def test_open_session_bad_endpoint_bad_flow(node: Node, fabric: FakeFabric, endpoint, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        node.open_session("c", endpoint)
    assert fabric.channels == []


def test_heartbeat_unknown_session_bad_flow(node: Node) -> None:
    with pytest.raises(NotFound, match="unknown to this node"):
        node.heartbeat("sess-nope")


def test_heartbeat_renews_lease(node: Node, clock) -> None:
    sid = session(node)
    clock.advance(20)
    assert node.heartbeat(sid) == 30
    clock.advance(20)
    node.reap()
    assert node.heartbeat(sid) == 30


def test_reap_expires_session_and_lets_everything_go(node: Node, fabric: FakeFabric, clock,
                                                      export_root: Path) -> None:
    sid = session(node)
    seal = node.seal(sid, "f", MIB, create=True)
    grant = node.grant(sid, seal.seal_id, 0, PAGE, RW)
    events = node.watch(sid, poll_seconds=0.01)
    clock.advance(31)
    node.reap()
    got = list(events)
    assert [e.kind for e in got] == [EventKind.SESSION_EXPIRED]
    assert got[0].grant_ids == (grant.grant_id,) and "no heartbeat within 30 s" in got[0].reason
    assert fabric.live_regions == []
    assert not is_leased(export_root / "f") and not is_mapped(export_root / "f")
    assert node.wait_for_teardown() and fabric.channels[0].closed
    with pytest.raises(NotFound, match="is over .*expired"):
        node.heartbeat(sid)


def test_close_session_releases_grants_seals_and_channel(node: Node, fabric: FakeFabric, export_root: Path) -> None:
    fds = open_fds()
    sid = session(node)
    seal = node.seal(sid, "f", MIB, create=True)
    node.grant(sid, seal.seal_id, 0, PAGE, RW)
    node.close_session(sid)
    assert fabric.live_regions == [] and not is_leased(export_root / "f")
    assert open_fds() == fds
    assert node.wait_for_teardown() and fabric.channels[0].closed


# -- seals ----------------------------------------------------------------------
def test_seal_create_prepares_leases_and_maps(node: Node, export_root: Path) -> None:
    sid = session(node)
    info = node.seal(sid, "./f.bin", 2 * MIB, create=True)
    path = export_root / "f.bin"
    assert info.path == "f.bin" and info.length == 2 * MIB and info.epoch == 1 and info.state == "SEALED"
    assert info.extent_count >= 1 and len(info.fingerprint) == 64
    assert info.owner_session == sid and info.holder_sessions == (sid,)
    assert os.stat(path).st_size == 2 * MIB
    assert is_leased(path) and is_mapped(path)
    assert node.check_leases() == []   # preparing through our own descriptor does not break our lease


def test_seal_same_path_twice_joins_the_seal(node: Node) -> None:
    a, b = session(node, "a"), session(node, "b")
    first = node.seal(a, "f", 2 * MIB, create=True)
    second = node.seal(b, "f", MIB)
    # Each holder sees only its own session, and the others as a count.
    assert second.seal_id == first.seal_id and second.holder_sessions == (b,) and second.holder_count == 2
    assert first.holder_sessions == (a,) and first.owner_session == a and second.owner_session == ""
    again = node.seal(b, "f", 2 * MIB)   # sealing again is harmless
    assert again.holder_sessions == (b,) and again.holder_count == 2


def test_seal_longer_than_sealed_bad_flow(node: Node) -> None:
    a, b = session(node, "a"), session(node, "b")
    node.seal(a, "f", MIB, create=True)
    with pytest.raises(FailedPrecondition, match=f"with length {MIB}"):
        node.seal(b, "f", 2 * MIB)


@pytest.mark.parametrize("path, length, error, words", [
    ("f", 4097, InvalidArgument, "not a multiple of 4096"),
    ("f", 0, InvalidArgument, "must be positive"),
    ("../f", PAGE, InvalidArgument, r"contains '\.\.'"),
    ("/etc/passwd", PAGE, InvalidArgument, "is absolute"),
    ("missing", PAGE, NotFound, "does not exist"),
    ("nodir/f", PAGE, NotFound, "does not exist"),
])
def test_seal_bad_request_leaves_nothing_bad_flow(node: Node, path: str, length: int, error, words: str) -> None:
    sid = session(node)
    fds = open_fds()
    with pytest.raises(error, match=words):
        node.seal(sid, path, length)
    assert open_fds() == fds and node.list_seals(sid) == []


def test_seal_create_that_fails_leaves_no_file_it_made_bad_flow(node: Node, export_root: Path) -> None:
    sid = session(node)
    (export_root / "kept").write_bytes(b"mine")
    fds = open_fds()
    for name in ("new", "kept"):
        with pytest.raises(RdaxError):
            node.seal(sid, name, 1 << 46, create=True)   # 64 TiB: no test filesystem preallocates that
    assert not (export_root / "new").exists(), "a failed Seal(create=True) left the file it made"
    assert (export_root / "kept").read_bytes() == b"mine", "a failed Seal removed a file it did not make"
    assert open_fds() == fds and node.list_seals(sid) == []


def test_seal_file_open_elsewhere_bad_flow(node: Node, export_root: Path) -> None:
    path = export_root / "busy"
    path.write_bytes(bytes(PAGE))
    sid = session(node)
    with open(path, "rb"):
        fds = open_fds()
        with pytest.raises(Unavailable, match="open elsewhere"):
            node.seal(sid, "busy", PAGE)
        assert open_fds() == fds and not is_leased(path) and not is_mapped(path)
    assert node.seal(sid, "busy", PAGE).state == "SEALED"


def test_seal_map_sync_on_ext4_bad_flow(make_node, export_root: Path) -> None:
    node = make_node(map_sync=True)
    sid = session(node)
    fds = open_fds()
    with pytest.raises(FailedPrecondition, match="not on a DAX filesystem"):
        node.seal(sid, "f", PAGE, create=True)
    assert open_fds() == fds
    assert not (export_root / "f").exists(), "the failed Seal left the file it created"


def test_seal_symlink_bad_flow(node: Node, export_root: Path, tmp_path: Path) -> None:
    (tmp_path / "outside").write_bytes(bytes(PAGE))
    (export_root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(PermissionDenied, match="symbolic link"):
        node.seal(session(node), "link", PAGE)


def test_unseal_last_holder_lets_the_file_go(node: Node, fabric: FakeFabric, export_root: Path) -> None:
    fds = open_fds()
    sid = session(node)
    seal = node.seal(sid, "f", MIB, create=True)
    grant = node.grant(sid, seal.seal_id, 0, PAGE, RW)
    events = node.watch(sid, poll_seconds=0.01)
    assert node.unseal(sid, seal.seal_id) == 2   # one revocation, one bump
    event = next(events)
    assert (event.kind, event.grant_ids, event.reason) == (EventKind.REVOKED, (grant.grant_id,), "unseal")
    assert fabric.live_regions == [] and open_fds() == fds
    assert not is_leased(export_root / "f") and not is_mapped(export_root / "f")
    with pytest.raises(NotFound):
        node.stat(sid, seal.seal_id)
    assert node.seal(sid, "f", MIB).seal_id != seal.seal_id


def test_unseal_one_holder_revokes_only_its_grants(node: Node, fabric: FakeFabric, export_root: Path) -> None:
    a, b = session(node, "a"), session(node, "b")
    seal = node.seal(a, "f", MIB, create=True).seal_id
    node.seal(b, "f", MIB)
    events = node.watch(a, poll_seconds=0.01)
    mine = node.grant(a, seal, 0, PAGE, RW)
    theirs = node.grant(b, seal, PAGE, PAGE, RW)
    assert node.unseal(a, seal) == 2
    assert [r.closed for r in fabric.regions] == [True, False]
    info = node.stat(b, seal)
    assert info.state == "SEALED" and info.holder_sessions == (b,) and info.grant_ids == (theirs.grant_id,)
    assert is_leased(export_root / "f")
    event = next(events)
    assert event.kind == EventKind.REVOKED and event.grant_ids == (mine.grant_id,) and event.reason == "unseal"


def test_unseal_not_holder_bad_flow(node: Node) -> None:
    a, b = session(node, "a"), session(node, "b")
    seal = node.seal(a, "f", PAGE, create=True).seal_id
    with pytest.raises(PermissionDenied, match="does not hold seal"):
        node.unseal(b, seal)


# -- grants ---------------------------------------------------------------------
def test_grant_registers_exactly_the_range_and_access(node: Node, fabric: FakeFabric) -> None:
    sid = session(node)
    seal = node.seal(sid, "f", 4 * MIB, create=True).seal_id
    first = node.grant(sid, seal, 0, MIB, ACCESS_WRITE | ACCESS_FLUSH)
    second = node.grant(sid, seal, 3 * MIB, MIB, RW | ACCESS_ATOMIC)
    assert second.remote_addr - first.remote_addr == 3 * MIB
    for grant, region in zip((first, second), fabric.regions, strict=False):
        assert (region.addr, region.length, region.access) == (grant.remote_addr, grant.length, grant.access)
        assert region.rkey == grant.rkey and region.channel is fabric.channels[0]
    assert first.epoch == 1 and first.expires_unix_ms == 0 and first.seal_id == seal
    assert node.stat(sid, seal).grant_ids == (first.grant_id, second.grant_id)


def test_grant_in_each_session_uses_its_own_pd(node: Node, fabric: FakeFabric) -> None:
    a, b = session(node, "a"), session(node, "b")
    seal = node.seal(a, "f", MIB, create=True).seal_id
    node.seal(b, "f", MIB)
    node.grant(a, seal, 0, PAGE, RW)
    node.grant(b, seal, PAGE, PAGE, RW)
    assert [r.channel for r in fabric.regions] == fabric.channels


@pytest.mark.parametrize("offset, length, access, error, words", [
    (4097, PAGE, RW, InvalidArgument, "offset 4097 is not a multiple of 4096: grants cover whole pages"),
    (0, 0, RW, InvalidArgument, "length 0 must be positive"),
    (0, 100, RW, InvalidArgument, "length 100 is not a multiple of 4096"),
    (MIB - PAGE, 2 * PAGE, RW, OutOfRange, "ends past the seal's length"),
    (MIB, PAGE, RW, OutOfRange, "ends past the seal's length"),
    (0, PAGE, 0, InvalidArgument, "access is 0"),
    (0, PAGE, 16 | ACCESS_WRITE, InvalidArgument, "unknown bits 0x10"),
    (0, PAGE, ACCESS_ATOMIC, InvalidArgument, "ATOMIC without WRITE"),
])
def test_grant_bad_request_bad_flow(node: Node, fabric: FakeFabric, offset: int, length: int, access: int,
                                    error, words: str) -> None:
    sid = session(node)
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    with pytest.raises(error, match=words):
        node.grant(sid, seal, offset, length, access)
    assert fabric.regions == [] and node.stat(sid, seal).grant_ids == ()


def test_grant_unknown_seal_bad_flow(node: Node) -> None:
    with pytest.raises(NotFound, match="seal 'seal-nope' is unknown"):
        node.grant(session(node), "seal-nope", 0, PAGE, RW)


def test_grant_seal_not_held_bad_flow(node: Node, fabric: FakeFabric) -> None:
    a, b = session(node, "a"), session(node, "b")
    seal = node.seal(a, "f", MIB, create=True).seal_id
    with pytest.raises(PermissionDenied, match="does not hold seal"):
        node.grant(b, seal, 0, PAGE, RW)
    assert fabric.regions == []


def test_grant_limit_per_session_bad_flow(make_node, fabric: FakeFabric) -> None:
    node = make_node(max_grants_per_session=2)
    sid = session(node)
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    node.grant(sid, seal, 0, PAGE, RW)
    node.grant(sid, seal, PAGE, PAGE, RW)
    with pytest.raises(ResourceExhausted, match="already holds 2 grants"):
        node.grant(sid, seal, 2 * PAGE, PAGE, RW)
    assert len(fabric.regions) == 2


def test_grant_registration_failure_leaves_nothing_bad_flow(node: Node, fabric: FakeFabric) -> None:
    sid = session(node)
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    fabric.fail_registration = ResourceExhausted("out of RDMA resources")
    with pytest.raises(ResourceExhausted):
        node.grant(sid, seal, 0, PAGE, RW)
    assert node.stat(sid, seal).grant_ids == ()


def test_grant_ttl_expiry_revokes_it(make_node, fabric: FakeFabric, clock) -> None:
    node = make_node(grant_ttl_seconds=10, wall_clock=lambda: 1_700_000_000.0)
    sid = session(node)
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    events = node.watch(sid, poll_seconds=0.01)
    grant = node.grant(sid, seal, 0, PAGE, RW)
    assert grant.expires_unix_ms == 1_700_000_010_000
    clock.advance(5)
    node.heartbeat(sid)
    clock.advance(6)
    node.reap()
    assert fabric.live_regions == []
    event = next(events)
    assert event.kind == EventKind.REVOKED and event.grant_ids == (grant.grant_id,) and "expired" in event.reason
    assert node.stat(sid, seal).epoch == 2 and node.stat(sid, seal).state == "SEALED"


def test_release_deregisters_without_bumping_epoch(node: Node, fabric: FakeFabric) -> None:
    sid = session(node)
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    grant = node.grant(sid, seal, 0, PAGE, RW)
    node.release(sid, grant.grant_id)
    assert fabric.live_regions == [] and fabric.deregistrations == 1
    assert node.stat(sid, seal).grant_ids == () and node.stat(sid, seal).epoch == 1
    with pytest.raises(NotFound, match="released, revoked or expired"):
        node.release(sid, grant.grant_id)


def test_release_grant_of_another_session_bad_flow(node: Node, fabric: FakeFabric) -> None:
    a, b = session(node, "a"), session(node, "b")
    seal = node.seal(a, "f", MIB, create=True).seal_id
    grant = node.grant(a, seal, 0, PAGE, RW)
    with pytest.raises(NotFound, match="not one of this session's"):   # nothing said of the other session
        node.release(b, grant.grant_id)
    assert fabric.live_regions == fabric.regions


# -- commit ---------------------------------------------------------------------
def test_commit_ranges_returns_bytes(node: Node) -> None:
    sid = session(node)
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    assert node.commit(sid, seal, [(0, PAGE), (PAGE + 10, 100)]) == PAGE + 100
    assert node.commit(sid, seal, []) == MIB


@pytest.mark.parametrize("ranges, error", [([(0, 0)], InvalidArgument), ([(MIB - 10, 11)], OutOfRange)])
def test_commit_bad_range_bad_flow(node: Node, ranges, error) -> None:
    sid = session(node)
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    with pytest.raises(error):
        node.commit(sid, seal, ranges)


def test_commit_not_holder_bad_flow(node: Node) -> None:
    a, b = session(node, "a"), session(node, "b")
    seal = node.seal(a, "f", MIB, create=True).seal_id
    with pytest.raises(PermissionDenied):
        node.commit(b, seal, [])


# -- revocation -----------------------------------------------------------------
def test_revoke_deregisters_before_the_lease_goes(node: Node, fabric: FakeFabric, export_root: Path) -> None:
    path = export_root / "f"
    lease_held_at_deregistration: list[bool] = []
    fabric.on_deregister = lambda region: lease_held_at_deregistration.append(is_leased(path) and is_mapped(path))
    a, b = session(node, "a"), session(node, "b")
    seal = node.seal(a, "f", MIB, create=True).seal_id
    node.seal(b, "f", MIB)
    watch_a, watch_b = node.watch(a, poll_seconds=0.01), node.watch(b, poll_seconds=0.01)
    grants_a = [node.grant(a, seal, 0, PAGE, RW).grant_id, node.grant(a, seal, PAGE, PAGE, RW).grant_id]
    node.revoke(seal, "test says so")
    assert lease_held_at_deregistration == [True, True]
    assert fabric.live_regions == [] and not is_leased(path) and not is_mapped(path)
    event_a, event_b = next(watch_a), next(watch_b)
    assert event_a.kind == EventKind.REVOKED and event_a.grant_ids == tuple(grants_a) and event_a.epoch == 2
    assert event_b.grant_ids == () and event_b.reason == "test says so"
    info = node.stat(a, seal)
    assert info.state == "REVOKED" and info.revoked_reason == "test says so" and info.epoch == 2


def test_revoked_seal_grant_and_commit_bad_flow(node: Node) -> None:
    sid = session(node)
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    node.revoke(seal, "test")
    with pytest.raises(FailedPrecondition, match="was revoked at epoch 2 .*seal the path again"):
        node.grant(sid, seal, 0, PAGE, RW)
    with pytest.raises(FailedPrecondition, match="was revoked"):
        node.commit(sid, seal, [])
    assert node.seal(sid, "f", MIB).seal_id != seal       # the path can be sealed anew
    assert node.unseal(sid, seal) == 2                      # and the revoked record dropped


def test_lease_break_by_another_process_revokes_the_seal(node: Node, fabric: FakeFabric, export_root: Path) -> None:
    sid = session(node)
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    grant = node.grant(sid, seal, 0, PAGE, RW)
    events = node.watch(sid, poll_seconds=0.01)
    assert open_from_another_process(export_root / "f", block=False).returncode == 11
    event = next(events)
    assert event.kind == EventKind.REVOKED and event.grant_ids == (grant.grant_id,)
    assert event.reason.startswith("lease break") and event.epoch == 2
    assert fabric.live_regions == [] and not is_leased(export_root / "f")
    assert node.stat(sid, seal).state == "REVOKED"


def test_lease_break_lets_a_blocking_opener_through_quickly(node: Node, export_root: Path) -> None:
    sid = session(node)
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    started = time.monotonic()
    assert open_from_another_process(export_root / "f", block=True).returncode == 0
    # Far below lease-break-time (45 s): the node let go as soon as it saw the break.
    assert time.monotonic() - started < 10
    assert node.stat(sid, seal).state == "REVOKED"


def test_grant_after_lease_break_bad_flow(node: Node, fabric: FakeFabric, export_root: Path) -> None:
    sid = session(node)
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    assert open_from_another_process(export_root / "f", block=False).returncode == 11
    with pytest.raises(FailedPrecondition, match="lease break"):
        node.grant(sid, seal, 0, PAGE, RW)
    assert fabric.regions == []


def test_watch_backlog_keeps_events_until_watched(node: Node) -> None:
    sid = session(node)
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    node.revoke(seal, "nobody watching")
    events = node.watch(sid, poll_seconds=0.01)
    assert next(events).reason == "nobody watching"


def test_watch_stops_when_caller_gives_up(node: Node) -> None:
    sid = session(node)
    going = threading.Event()
    going.set()
    events = node.watch(sid, keep_going=going.is_set, poll_seconds=0.01)
    threading.Timer(0.1, going.clear).start()
    assert list(events) == []


# -- shutdown -------------------------------------------------------------------
def test_shutdown_revokes_everything(node: Node, fabric: FakeFabric, export_root: Path) -> None:
    fds = open_fds()
    sid = session(node)
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    grant = node.grant(sid, seal, 0, PAGE, RW)
    events = node.watch(sid, poll_seconds=0.01)
    assert node.shutdown()
    got = list(events)
    assert [e.kind for e in got] == [EventKind.SHUTDOWN, EventKind.SHUTDOWN]
    assert got[0].seal_id == seal and got[0].grant_ids == (grant.grant_id,)
    assert fabric.live_regions == [] and all(c.closed for c in fabric.channels)
    assert not is_leased(export_root / "f") and not is_mapped(export_root / "f")
    assert open_fds() <= fds   # the export root's descriptor is closed too
    with pytest.raises(Unavailable, match="shutting down"):
        node.open_session("late", CLIENT_ENDPOINT)


def test_open_session_fabric_failure_bad_flow(node: Node, fabric: FakeFabric) -> None:
    fabric.fail_open = RdaxError("no QPs left")
    with pytest.raises(RdaxError, match="no QPs left"):
        node.open_session("c", CLIENT_ENDPOINT)
    fabric.fail_open = None
    assert node.list_seals(session(node)) == [] and len(fabric.channels) == 1


@pytest.mark.parametrize("alignment", [1, PAGE])
def test_grants_carry_the_nodes_write_alignment(make_node, alignment: int) -> None:
    """The canary's finding (where RDMA writes land) reaches clients with every grant."""
    node = make_node(write_alignment=alignment)
    sid = session(node)
    seal = node.seal(sid, "f", MIB, create=True)
    assert node.grant(sid, seal.seal_id, PAGE, PAGE, RW).write_alignment == alignment
