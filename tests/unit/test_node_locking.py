"""Slow work outside the node's lock (issue 11 §4): Grant registers its region, and a revocation deregisters its
regions and lets its file go, without holding the lock other calls need; races with either keep the revocation
order (no live region over a file let go, no grant of a revoked seal)."""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    CLIENT_ENDPOINT,
    MIB,
    OPEN_POLICY,
    PAGE,
    FakeChannel,
    FakeFabric,
    FakeRegion,
    is_leased,
    is_mapped,
    open_fds,
    wait_until,
)

from rdax.service.errors import FailedPrecondition, NotFound, PermissionDenied, ResourceExhausted, Unavailable
from rdax.service.fabric_api import Endpoint
from rdax.service.grants import ACCESS_READ, ACCESS_WRITE, GrantDescriptor
from rdax.service.node import Node, NodeLock
from rdax.service.policy import Policy
from rdax.service.sessions import Event, EventKind, EventStream

RW = ACCESS_WRITE | ACCESS_READ
WAIT = 10.0   # seconds: a test that needs longer is stuck


class GatedFabric(FakeFabric):
    """A fabric whose registrations in a gated channel wait until the test opens the gate: a slow ibv_reg_mr."""

    def __init__(self) -> None:
        super().__init__()
        self.registering = threading.Event()   # set when a gated registration has started
        self.gate = threading.Event()

    def open_channel(self, remote: Endpoint) -> FakeChannel:
        if self.fail_open is not None:
            raise self.fail_open
        channel = GatedChannel(self, remote)
        self.channels.append(channel)
        return channel


class GatedChannel(FakeChannel):
    gated = False

    def register(self, addr: int, length: int, access: int) -> FakeRegion:
        fabric = self.fabric
        assert isinstance(fabric, GatedFabric)
        if self.gated:
            fabric.registering.set()
            assert fabric.gate.wait(WAIT), "the test never opened the gate"
        return super().register(addr, length, access)


@pytest.fixture
def fabric() -> GatedFabric:
    return GatedFabric()


class Call:
    """A node call on a thread of its own: its answer or its exception."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def done(self, timeout: float = WAIT) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


def session(node: Node, name: str) -> str:
    return node.open_session(name, CLIENT_ENDPOINT).session_id


def gated_session(node: Node, fabric: GatedFabric, name: str) -> str:
    sid = session(node, name)
    channel = fabric.channels[-1]
    assert isinstance(channel, GatedChannel)
    channel.gated = True
    return sid


def slow_grant(node: Node, fabric: GatedFabric, sid: str, seal: str) -> Call:
    """A Grant whose registration is under way (and waits at the gate) when this returns."""
    call = Call(lambda: node.grant(sid, seal, 0, PAGE, RW))
    assert fabric.registering.wait(WAIT)
    return call


# -- Grant ----------------------------------------------------------------------
def test_grant_registration_does_not_hold_up_other_calls(node: Node, fabric: GatedFabric) -> None:
    slow, quick = gated_session(node, fabric, "slow"), session(node, "quick")
    seal_a = node.seal(slow, "a", MIB, create=True).seal_id
    seal_b = node.seal(quick, "b", MIB, create=True).seal_id
    pending = slow_grant(node, fabric, slow, seal_a)
    # The node's lock is free meanwhile: another session's Grant on another seal, a Heartbeat, a Stat, a Seal.
    other = node.grant(quick, seal_b, 0, PAGE, RW)
    assert node.heartbeat(slow) == 30 and node.stat(quick, seal_b).grant_ids == (other.grant_id,)
    assert node.seal(quick, "c", MIB, create=True).state == "SEALED"
    assert not pending.done(0.05)
    fabric.gate.set()
    assert pending.done() and pending.error is None
    assert isinstance(pending.result, GrantDescriptor)
    assert node.stat(slow, seal_a).grant_ids == (pending.result.grant_id,)
    assert len(fabric.live_regions) == 2


def test_grant_registering_counts_against_the_session_limit_bad_flow(make_node, fabric: GatedFabric) -> None:
    node = make_node(max_grants_per_session=1)
    sid = gated_session(node, fabric, "c")
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    pending = slow_grant(node, fabric, sid, seal)
    with pytest.raises(ResourceExhausted, match="already holds 1 grants"):
        node.grant(sid, seal, PAGE, PAGE, RW)
    fabric.gate.set()
    assert pending.done() and pending.error is None


def test_revoke_during_registration_lets_the_file_go_after_the_region_race(node: Node, fabric: GatedFabric,
                                                                           export_root: Path) -> None:
    path = export_root / "f"
    leased_at_deregistration: list[bool] = []
    fabric.on_deregister = lambda region: leased_at_deregistration.append(is_leased(path) and is_mapped(path))
    sid = gated_session(node, fabric, "c")
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    events = node.watch(sid, poll_seconds=0.01)
    pending = slow_grant(node, fabric, sid, seal)
    node.revoke(seal, "test says so")   # returns: the lock was not held by the registration
    info = node.stat(sid, seal)
    assert info.state == "REVOKED" and info.epoch == 2
    # The region being registered is over the mapping: the file stays mapped and leased until it is gone.
    assert is_leased(path) and is_mapped(path)
    fabric.gate.set()
    assert pending.done()
    assert isinstance(pending.error, FailedPrecondition) and "was revoked at epoch 2" in str(pending.error)
    assert leased_at_deregistration == [True]   # deregistered first, then the lease went
    assert fabric.live_regions == [] and not is_leased(path) and not is_mapped(path)
    assert info.grant_ids == () and node.stat(sid, seal).grant_ids == ()   # never in the tables
    event = next(events)
    assert event.kind == EventKind.REVOKED and event.grant_ids == () and event.reason == "test says so"


def test_session_ended_while_a_revocation_lets_go_still_tells_why_race(node: Node, fabric: GatedFabric) -> None:
    """The CI failure of stop 16: a client wrote through its revoked rkey, its QP failed, and the reaper ended its
    session while the revocation was still letting the file go. The notice was published after the stream had
    ended and was lost: the client never learned which grant went, or why."""
    sid, other = session(node, "c"), gated_session(node, fabric, "g")
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    node.seal(other, "f", MIB)
    grant = node.grant(sid, seal, 0, PAGE, RW)
    events = node.watch(sid, poll_seconds=0.01)
    pending = slow_grant(node, fabric, other, seal)   # holds the file: the revocation lets it go after this region
    node.revoke(seal, "lease break")
    fabric.channels[0].broken = True   # the client's write through the old rkey failed its QP
    node.reap()                        # the session ends before the revocation has told it anything
    fabric.gate.set()
    assert pending.done() and isinstance(pending.error, FailedPrecondition)
    got = Call(lambda: list(events))
    assert got.done(), "the session's Watch stream did not end"
    kinds = [(e.kind, e.grant_ids) for e in got.result]   # type: ignore[attr-defined]
    assert kinds == [(EventKind.REVOKED, (grant.grant_id,)), (EventKind.SESSION_ENDED, ())], kinds
    assert got.result[0].reason == "lease break" and got.result[0].epoch == 2   # type: ignore[index]


def test_event_stream_end_waits_for_promised_notices_in_order() -> None:
    stream = EventStream()
    inbox = stream.follow(lambda: True, 0.01)
    notice = Event(EventKind.REVOKED, "s", ("g",), "why", 2, 0)
    final = Event(EventKind.SESSION_ENDED, "", (), "over", 0, 0)
    stream.promise()
    stream.end(final)
    stream.publish(Event(EventKind.EXTENDED, "s", (), "grew", 1, 0))   # still delivered: the end waits
    stream.publish(notice, promised=True)
    stream.publish(notice)   # after the end: dropped
    assert [e.kind for e in inbox] == [EventKind.EXTENDED, EventKind.REVOKED, EventKind.SESSION_ENDED]
    late = stream.follow(lambda: True, 0.01)
    assert list(late) == []   # a stream subscribed after the end ends at once


def test_seal_of_a_path_waits_for_the_revoked_file_to_be_let_go(node: Node, fabric: GatedFabric,
                                                                export_root: Path) -> None:
    sid = gated_session(node, fabric, "c")
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    pending = slow_grant(node, fabric, sid, seal)
    node.revoke(seal, "test")
    again = Call(lambda: node.seal(sid, "f", MIB))
    # Opening the file now would break our own lease: the new Seal waits for the old one to let it go.
    assert not again.done(0.2)
    fabric.gate.set()
    assert pending.done() and isinstance(pending.error, FailedPrecondition)
    assert again.done() and again.error is None
    assert again.result.seal_id != seal and again.result.state == "SEALED"   # type: ignore[attr-defined]
    assert is_leased(export_root / "f")


def test_session_closed_during_registration_closes_its_channel_after_the_region_race(
        node: Node, fabric: GatedFabric, export_root: Path) -> None:
    fds = open_fds()
    sid = gated_session(node, fabric, "c")
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    pending = slow_grant(node, fabric, sid, seal)
    node.close_session(sid)
    assert node.wait_for_teardown()
    channel = fabric.channels[0]
    assert not channel.closed   # a region is being registered in its PD
    assert is_leased(export_root / "f")   # and over the file
    fabric.gate.set()
    assert pending.done() and isinstance(pending.error, NotFound) and "ended while" in str(pending.error)
    assert node.wait_for_teardown() and channel.closed   # FakeChannel.close asserts no live region in its PD
    assert fabric.live_regions == [] and not is_leased(export_root / "f") and open_fds() == fds


def test_unseal_during_registration_refuses_the_grant_race(node: Node, fabric: GatedFabric,
                                                           export_root: Path) -> None:
    slow, other = gated_session(node, fabric, "slow"), session(node, "other")
    seal = node.seal(slow, "f", MIB, create=True).seal_id
    node.seal(other, "f", MIB)
    pending = slow_grant(node, fabric, slow, seal)
    node.unseal(slow, seal)   # another holder stays: the seal lives on
    fabric.gate.set()
    assert pending.done() and isinstance(pending.error, FailedPrecondition)
    assert "unsealed" in str(pending.error)
    assert fabric.live_regions == [] and is_leased(export_root / "f")
    assert node.stat(other, seal).state == "SEALED"


def test_policy_change_during_registration_refuses_the_grant_race(node: Node, fabric: GatedFabric) -> None:
    sid = gated_session(node, fabric, "c")
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    pending = slow_grant(node, fabric, sid, seal)
    node.set_policy(Policy.parse(OPEN_POLICY.replace('"read", ', ""), "narrower.toml"))
    fabric.gate.set()
    assert pending.done() and isinstance(pending.error, PermissionDenied)
    assert fabric.live_regions == []


def test_shutdown_during_registration_waits_for_the_region(node: Node, fabric: GatedFabric,
                                                            export_root: Path) -> None:
    sid = gated_session(node, fabric, "c")
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    pending = slow_grant(node, fabric, sid, seal)
    stopping = Call(node.shutdown)
    assert not stopping.done(0.2)   # the file cannot go while a region is registered over it
    assert is_leased(export_root / "f")
    fabric.gate.set()
    assert stopping.done() and stopping.result is True
    assert pending.done() and isinstance(pending.error, Unavailable)
    assert fabric.live_regions == [] and not is_leased(export_root / "f")


# -- revocation -------------------------------------------------------------------
def test_revocation_deregisters_outside_the_node_lock(node: Node, fabric: GatedFabric, export_root: Path) -> None:
    holders = [session(node, f"h{i}") for i in range(4)]
    seal = node.seal(holders[0], "shared", MIB, create=True).seal_id
    for sid in holders[1:]:
        node.seal(sid, "shared", MIB)
    for i in range(16):
        node.grant(holders[i % 4], seal, (i % 8) * PAGE, PAGE, RW)
    quick = session(node, "quick")
    other = node.seal(quick, "other", MIB, create=True).seal_id
    deregistering, proceed = threading.Event(), threading.Event()

    def slow_deregistration(region: FakeRegion) -> None:
        deregistering.set()
        assert proceed.wait(WAIT)
        assert is_leased(export_root / "shared")   # the file goes only after every region
    fabric.on_deregister = slow_deregistration
    revoking = Call(lambda: node.revoke(seal, "test"))
    assert deregistering.wait(WAIT)
    # Mid-revocation, with the node's lock free: a Grant on another seal, a refused Grant on this one.
    granted = node.grant(quick, other, 0, PAGE, RW)
    with pytest.raises(FailedPrecondition, match="was revoked"):
        node.grant(holders[0], seal, 0, PAGE, RW)
    assert node.stat(holders[0], seal).state == "REVOKED" and node.state_counts()["grants"] == 1
    assert not revoking.done(0.05)
    proceed.set()
    assert revoking.done() and revoking.error is None
    assert [r.rkey for r in fabric.live_regions] == [granted.rkey]
    assert not is_leased(export_root / "shared") and not is_mapped(export_root / "shared")


def test_session_end_and_revocation_close_the_channel_after_its_regions_race(node: Node, fabric: GatedFabric,
                                                                             export_root: Path) -> None:
    a, b = session(node, "a"), session(node, "b")
    seal = node.seal(a, "f", MIB, create=True).seal_id
    node.seal(b, "f", MIB)
    node.grant(a, seal, 0, PAGE, RW)
    node.grant(b, seal, 0, PAGE, RW)
    deregistering, proceed = threading.Event(), threading.Event()

    def slow_deregistration(region: FakeRegion) -> None:
        deregistering.set()
        assert proceed.wait(WAIT)
    fabric.on_deregister = slow_deregistration
    revoking = Call(lambda: node.revoke(seal, "test"))
    assert deregistering.wait(WAIT)
    # Session b ends while the revocation still deregisters its region: its PD waits for that.
    node.close_session(b)
    assert node.wait_for_teardown()
    assert not fabric.channels[1].closed
    proceed.set()
    assert revoking.done() and revoking.error is None
    assert node.wait_for_teardown() and fabric.channels[1].closed and fabric.live_regions == []
    assert not is_leased(export_root / "f")


# -- the lock -----------------------------------------------------------------------
def test_node_lock_runs_queued_work_after_the_outermost_release_in_order() -> None:
    lock = NodeLock()
    seen: list[str] = []
    with lock:
        with lock:
            lock.after(lambda: seen.append(f"first, still held: {lock._is_owned()}"))
        assert seen == []   # the inner release runs nothing
        lock.after(lambda: seen.append("second"))
    assert seen == ["first, still held: False", "second"]
    with pytest.raises(RuntimeError, match="without holding"):
        lock.after(lambda: None)


def test_node_lock_queued_work_failure_bad_flow() -> None:
    lock = NodeLock()
    seen: list[str] = []

    def fail() -> None:
        raise OSError("ftruncate failed")
    with pytest.raises(OSError, match="ftruncate"):
        with lock:
            lock.after(fail)
            lock.after(lambda: seen.append("still runs"))
    assert seen == ["still runs"]
    with pytest.raises(KeyError):   # the body's own exception wins; the work's failure is logged
        with lock:
            lock.after(fail)
            raise KeyError("body")


def test_node_lock_condition_wait_lets_go_of_every_hold() -> None:
    lock = NodeLock()
    cond = threading.Condition(lock)   # type: ignore[arg-type]
    ready: list[bool] = []

    def other() -> None:
        with lock:
            ready.append(True)
            cond.notify_all()
    with lock:
        with lock:
            threading.Thread(target=other, daemon=True).start()
            assert cond.wait_for(lambda: ready, WAIT)
        lock.after(lambda: ready.append(False))
    assert ready == [True, False]


# -- the audit -----------------------------------------------------------------------
def audit_runs(node: Node) -> float:
    return node.metrics.registry.get_sample_value("rdax_audit_runs_total") or 0.0


def test_audit_runs_on_its_own_thread_and_at_once_after_lost_events(make_node) -> None:
    node = make_node(audit_seconds=1e9)   # never on its timer in this test
    sid = session(node, "c")
    node.seal(sid, "f", MIB, create=True)
    assert audit_runs(node) == 0
    node._on_seal_event(b"", 0, 0)   # fanotify lost events: the fanotify thread only asks for an audit
    assert wait_until(lambda: audit_runs(node) == 1)
    assert node.audit() == []   # and a pass finds nothing moved
