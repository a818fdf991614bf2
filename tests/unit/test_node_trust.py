"""Tests for the node's trust rules: sessions belong to their identity, the policy is held on every call,
quotas and rates, access violations, certificate expiry and policy reloads (fake fabric, real files)."""
from __future__ import annotations

import pytest
from conftest import CLIENT_ENDPOINT, MIB, PAGE, FakeClock, FakeFabric

from rdax.service.audit import NullAudit
from rdax.service.errors import InvalidArgument, NotFound, OutOfRange, PermissionDenied, ResourceExhausted
from rdax.service.limits import Limits
from rdax.service.node import Node
from rdax.service.policy import Policy
from rdax.service.sessions import EventKind

ALICE, BOB, EVE = "spiffe://t/alice", "spiffe://t/bob", "spiffe://t/eve"
RW = 1 | 2
POLICY = f"""
[defaults]
max_sessions = 3
max_grants = 2
max_sealed_bytes = "2 MiB"
max_watch_streams = 2

[[allow]]
identity = "{ALICE}"
paths = ["alice/**", "shared/**"]
create = true
access = ["write", "read", "flush"]

[[allow]]
identity = "{BOB}"
paths = ["bob/**", "shared/**"]
create = true
access = ["write", "flush"]
"""


@pytest.fixture
def audit() -> NullAudit:
    return NullAudit()


@pytest.fixture
def trusted(make_node, export_root, audit, clock: FakeClock) -> Node:
    for sub in ("alice", "bob", "shared"):
        (export_root / sub).mkdir()
    return make_node(policy=Policy.parse(POLICY, "policy.toml"), audit=audit, wall_clock=clock,
                     limits=Limits(open_session_rate=100, open_session_burst=100))


def opened(node: Node, identity: str, **kw) -> str:
    return node.open_session("c", CLIENT_ENDPOINT, identity=identity, **kw).session_id


def test_session_of_another_identity_is_not_found_bad_flow(trusted: Node, fabric: FakeFabric) -> None:
    a = opened(trusted, ALICE)
    seal = trusted.seal(a, "shared/f", MIB, create=True, identity=ALICE).seal_id
    grant = trusted.grant(a, seal, 0, PAGE, RW, identity=ALICE)
    for call in (lambda: trusted.heartbeat(a, identity=BOB),
                 lambda: trusted.close_session(a, identity=BOB),
                 lambda: trusted.seal(a, "shared/f", MIB, identity=BOB),
                 lambda: trusted.grant(a, seal, 0, PAGE, 1, identity=BOB),
                 lambda: trusted.release(a, grant.grant_id, identity=BOB),
                 lambda: trusted.commit(a, seal, [], identity=BOB),
                 lambda: trusted.unseal(a, seal, identity=BOB),
                 lambda: trusted.stat(a, seal, identity=BOB),
                 lambda: trusted.list_seals(a, identity=BOB),
                 lambda: trusted.watch(a, identity=BOB)):
        with pytest.raises(NotFound, match="unknown to this node for identity"):
            call()
    assert fabric.live_regions and trusted.heartbeat(a, identity=ALICE) == 30   # the owner's work goes on


def test_other_holders_are_a_count_never_session_ids(trusted: Node) -> None:
    a, b = opened(trusted, ALICE), opened(trusted, BOB)
    seal = trusted.seal(a, "shared/f", MIB, create=True, identity=ALICE).seal_id
    trusted.grant(a, seal, 0, PAGE, RW, identity=ALICE)
    joined = trusted.seal(b, "shared/f", MIB, identity=BOB)
    assert joined.holder_count == 2 and joined.holder_sessions == (b,) and a not in repr(joined)
    assert joined.grant_ids == ()   # alice's grant is not shown to bob
    assert all(a not in repr(info) for info in trusted.list_seals(b, identity=BOB))


def test_seal_outside_policy_and_unknown_identity_bad_flow(trusted: Node, export_root) -> None:
    b = opened(trusted, BOB)
    with pytest.raises(PermissionDenied, match="alice/x"):
        trusted.seal(b, "alice/x", MIB, create=True, identity=BOB)
    assert not (export_root / "alice" / "x").exists()
    with pytest.raises(PermissionDenied, match=f"'{EVE}' is not in the policy policy.toml"):
        opened(trusted, EVE)


def test_grant_beyond_policy_access_bad_flow(trusted: Node, fabric: FakeFabric) -> None:
    b = opened(trusted, BOB)
    seal = trusted.seal(b, "bob/f", MIB, create=True, identity=BOB).seal_id
    with pytest.raises(PermissionDenied, match="READ"):
        trusted.grant(b, seal, 0, PAGE, RW, identity=BOB)
    assert fabric.live_regions == []
    trusted.grant(b, seal, 0, PAGE, 1, identity=BOB)


def test_quotas_sessions_grants_sealed_bytes_bad_flow(trusted: Node) -> None:
    sessions = [opened(trusted, ALICE) for _ in range(3)]
    with pytest.raises(ResourceExhausted, match="max_sessions 3 in policy.toml"):
        opened(trusted, ALICE)
    a = sessions[0]
    seal = trusted.seal(a, "alice/f", 2 * MIB, create=True, identity=ALICE).seal_id
    with pytest.raises(ResourceExhausted, match="max_sealed_bytes"):
        trusted.seal(a, "alice/g", PAGE, create=True, identity=ALICE)
    trusted.grant(a, seal, 0, PAGE, 1, identity=ALICE)
    trusted.grant(a, seal, PAGE, PAGE, 1, identity=ALICE)
    with pytest.raises(ResourceExhausted, match="max_grants 2"):
        trusted.grant(a, seal, 2 * PAGE, PAGE, 1, identity=ALICE)
    trusted.unseal(a, seal, identity=ALICE)   # gives the bytes (and its grants) back
    trusted.seal(a, "alice/g", PAGE, create=True, identity=ALICE)
    trusted.close_session(sessions[1], identity=ALICE)
    opened(trusted, ALICE)


def test_open_session_rate_per_identity_bad_flow(make_node, clock: FakeClock) -> None:
    node = make_node(limits=Limits(open_session_rate=1, open_session_burst=2))
    opened(node, "anonymous"), opened(node, "anonymous")
    with pytest.raises(ResourceExhausted, match="retry in"):
        opened(node, "anonymous")
    clock.advance(1.0)
    opened(node, "anonymous")


def test_commit_bounded_ranges_bad_flow(trusted: Node) -> None:
    a = opened(trusted, ALICE)
    seal = trusted.seal(a, "alice/f", MIB, create=True, identity=ALICE).seal_id
    with pytest.raises(InvalidArgument, match="at most 1024"):
        trusted.commit(a, seal, [(0, 1)] * 1025, identity=ALICE)
    assert trusted.commit(a, seal, [(0, 1)] * 1024, identity=ALICE) == 1024


def test_seal_length_past_what_a_file_holds_bad_flow(trusted: Node) -> None:
    a = opened(trusted, ALICE)
    with pytest.raises(OutOfRange, match="2\\^63"):
        trusted.seal(a, "alice/f", 1 << 63, create=True, identity=ALICE)


def test_long_path_refused_with_a_short_message_bad_flow(trusted: Node) -> None:
    a = opened(trusted, ALICE)
    with pytest.raises(InvalidArgument, match="4096 bytes") as info:
        trusted.seal(a, "alice/" + "x" * 100_000, MIB, create=True, identity=ALICE)
    assert len(str(info.value)) < 500


def test_qp_error_ends_session_counts_violation_and_refuses_identity(trusted: Node, fabric: FakeFabric,
                                                                     audit: NullAudit) -> None:
    for _ in range(4):
        b = opened(trusted, BOB)
        events = trusted.watch(b, poll_seconds=0.01, identity=BOB)
        fabric.channels[-1].broken = True
        trusted.reap()
        event = next(events)
        assert event.kind == EventKind.SESSION_ENDED and "outside its grants" in event.reason
    assert [r["identity"] for r in audit.records if r["event"] == "violation"] == [BOB] * 4
    with pytest.raises(PermissionDenied, match="remote access violations"):
        opened(trusted, BOB)
    opened(trusted, ALICE)   # only the offender is refused


def test_qp_error_after_revocation_is_not_a_violation(trusted: Node, fabric: FakeFabric, audit: NullAudit) -> None:
    a = opened(trusted, ALICE)
    seal = trusted.seal(a, "alice/f", MIB, create=True, identity=ALICE).seal_id
    trusted.grant(a, seal, 0, PAGE, 1, identity=ALICE)
    trusted.revoke(seal, "breaker")
    fabric.channels[-1].broken = True   # the client wrote through the revoked grant
    trusted.reap()
    with pytest.raises(NotFound, match="after the node revoked"):
        trusted.heartbeat(a, identity=ALICE)
    assert [r for r in audit.records if r["event"] == "violation"] == []


def test_certificate_expiry_ends_session(trusted: Node, clock: FakeClock) -> None:
    a = opened(trusted, ALICE, cert_not_after=clock() + 10)
    events = trusted.watch(a, poll_seconds=0.01, identity=ALICE)
    clock.advance(5)
    trusted.reap()
    assert trusted.heartbeat(a, identity=ALICE) == 30
    clock.advance(6)
    trusted.reap()
    event = next(events)
    assert event.kind == EventKind.SESSION_EXPIRED and "certificate expired" in event.reason


def test_policy_reload_revokes_what_it_no_longer_allows(trusted: Node, fabric: FakeFabric) -> None:
    a, b = opened(trusted, ALICE), opened(trusted, BOB)
    sa = trusted.seal(a, "alice/f", MIB, create=True, identity=ALICE).seal_id
    ga = trusted.grant(a, sa, 0, PAGE, RW, identity=ALICE)
    sb = trusted.seal(b, "bob/f", MIB, create=True, identity=BOB).seal_id
    trusted.grant(b, sb, 0, PAGE, 1, identity=BOB)
    events_a = trusted.watch(a, poll_seconds=0.01, identity=ALICE)
    events_b = trusted.watch(b, poll_seconds=0.01, identity=BOB)
    narrower = POLICY.replace('access = ["write", "read", "flush"]', 'access = ["write"]').replace(
        'paths = ["bob/**", "shared/**"]', 'paths = ["shared/**"]')
    trusted.set_policy(Policy.parse(narrower, "policy.toml"))
    event = next(events_a)
    assert event.grant_ids == (ga.grant_id,) and event.reason.startswith("policy changed")
    event = next(events_b)
    assert event.reason.startswith("policy changed") and "bob/f" in event.reason
    assert fabric.live_regions == []
    trusted.grant(a, sa, 0, PAGE, 1, identity=ALICE)   # what is still allowed works


def test_watch_streams_quota_bad_flow(trusted: Node) -> None:
    import asyncio

    a = opened(trusted, ALICE)
    loop = asyncio.new_event_loop()
    try:
        first = trusted.watch_async(a, loop, identity=ALICE)
        second = trusted.watch_async(a, loop, identity=ALICE)
        with pytest.raises(ResourceExhausted, match="max_watch_streams 2"):
            trusted.watch_async(a, loop, identity=ALICE)
        first.close()
        trusted.watch_async(a, loop, identity=ALICE).close()
        second.close()
    finally:
        loop.close()


def test_gid_in_any_ipv6_form_and_mtu_range(make_node, fabric: FakeFabric) -> None:
    import dataclasses

    node = make_node()
    for gid in ("::ffff:10.77.0.2", "0:0:0:0:0:ffff:a4d:2", "::ffff:a4d:2"):
        node.open_session("c", dataclasses.replace(CLIENT_ENDPOINT, gid=gid))
        assert fabric.channels[-1].remote.gid == "0000:0000:0000:0000:0000:ffff:0a4d:0002"
    with pytest.raises(InvalidArgument, match="accepted|IPv6 text form"):
        node.open_session("c", dataclasses.replace(CLIENT_ENDPOINT, gid="10.77.0.2:x"))
    with pytest.raises(InvalidArgument, match="256, 512, 1024, 2048 or 4096"):
        node.open_session("c", dataclasses.replace(CLIENT_ENDPOINT, mtu=5000))


# -- files keep their size (issue 12) ---------------------------------------------
def test_declared_size_applies_when_the_last_holder_lets_go(trusted: Node, export_root) -> None:
    a, b = opened(trusted, ALICE), opened(trusted, BOB)
    seal = trusted.seal(a, "shared/f", MIB, create=True, identity=ALICE).seal_id
    trusted.seal(b, "shared/f", MIB, identity=BOB)
    trusted.commit(a, seal, [(0, 1000)], identity=ALICE, size=1000)
    trusted.unseal(a, seal, identity=ALICE)
    assert (export_root / "shared" / "f").stat().st_size == MIB   # bob still holds it: padded length stays
    trusted.unseal(b, seal, identity=BOB, size=1234)
    assert (export_root / "shared" / "f").stat().st_size == 1234


def test_declared_size_past_the_seal_or_cutting_unsealed_bytes_bad_flow(trusted: Node, export_root) -> None:
    a = opened(trusted, ALICE)
    (export_root / "alice" / "long").write_bytes(b"x" * (3 * PAGE))
    seal = trusted.seal(a, "alice/long", PAGE, identity=ALICE).seal_id
    with pytest.raises(OutOfRange, match="past the seal's length"):
        trusted.unseal(a, seal, identity=ALICE, size=2 * PAGE)
    from rdax.service.errors import FailedPrecondition
    with pytest.raises(FailedPrecondition, match="no seal covers"):
        trusted.unseal(a, seal, identity=ALICE, size=10)
    trusted.unseal(a, seal, identity=ALICE)
    assert (export_root / "alice" / "long").read_bytes() == b"x" * (3 * PAGE)


def test_stat_by_path_without_sealing(trusted: Node, export_root) -> None:
    a = opened(trusted, ALICE)
    (export_root / "alice" / "plain").write_bytes(b"y" * 1000)
    info = trusted.stat(a, "", identity=ALICE, path="alice/plain")
    assert info.state == "UNSEALED" and info.file_size == 1000 and info.seal_id == ""
    seal = trusted.seal(a, "alice/plain", PAGE, identity=ALICE).seal_id
    info = trusted.stat(a, "", identity=ALICE, path="alice/plain")
    assert info.seal_id == seal and info.file_size == PAGE
    b = opened(trusted, BOB)
    with pytest.raises(NotFound, match="may seal"):
        trusted.stat(b, "", identity=BOB, path="alice/plain")


# -- seals that grow (issue 12) ---------------------------------------------------
def test_extend_keeps_grants_and_maps_the_new_range(trusted: Node, export_root, fabric: FakeFabric) -> None:
    a, b = opened(trusted, ALICE), opened(trusted, BOB)
    seal = trusted.seal(a, "shared/log", 64 * 1024, create=True, identity=ALICE)
    trusted.seal(b, "shared/log", 64 * 1024, identity=BOB)
    old = trusted.grant(a, seal.seal_id, 0, 64 * 1024, 1, identity=ALICE)
    events = trusted.watch(b, poll_seconds=0.01, identity=BOB)
    grown = trusted.extend(a, seal.seal_id, MIB, identity=ALICE)
    assert grown.length == MIB and grown.epoch == seal.epoch
    assert (export_root / "shared" / "log").stat().st_size == MIB
    event = next(events)
    assert event.kind == EventKind.EXTENDED and event.length == MIB
    # The old grant is still live; a grant may span old and new, at the same addresses as before.
    assert [r for r in fabric.live_regions if r.rkey == old.rkey]
    spanning = trusted.grant(a, seal.seal_id, 0, MIB, 1, identity=ALICE)
    assert spanning.remote_addr == old.remote_addr
    mapping = trusted._seals[seal.seal_id].mapping
    mapping.write(MIB - 4, b"tail")                     # the new range is mapped and writable
    assert mapping.read(MIB - 4, 4) == b"tail"


def test_extend_refusals_bad_flow(trusted: Node) -> None:
    a = opened(trusted, ALICE)
    seal = trusted.seal(a, "alice/f", 64 * 1024, create=True, identity=ALICE).seal_id
    with pytest.raises(InvalidArgument, match="do not shrink"):
        trusted.extend(a, seal, PAGE, identity=ALICE)
    with pytest.raises(InvalidArgument, match="multiple of 4096"):
        trusted.extend(a, seal, 100_000, identity=ALICE)
    with pytest.raises(ResourceExhausted, match="max_sealed_bytes"):
        trusted.extend(a, seal, 4 * MIB, identity=ALICE)
    b = opened(trusted, BOB)
    with pytest.raises((NotFound, PermissionDenied)):
        trusted.extend(b, seal, MIB, identity=BOB)
