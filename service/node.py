"""The storage node's core: sessions, seals, grants and their revocation behind one lock, with no gRPC in sight."""
# Where to look: making a file a seal is seals.py, checking a grant request
# grants.py, the revocation order and lease-break watching revocation.py,
# sessions, their events and QP teardown sessions.py. This module keeps the
# tables and the rules that join them: who may do what, and what goes when.
# The tables change under one lock; nothing slow happens under it: memory
# registration, deregistration and letting files go run outside it (NodeLock),
# FIEMAP and msync under each seal's own io_lock.
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import secrets
import threading
import time
from typing import Callable, Iterator, Sequence

from . import revocation
from .fanotify import SealWatcher, describe
from .fiemap import check_stable, summary
from .prepare import Preparation, block_map, check_length
from .audit import Audit, NullAudit, quote
from .errors import (FailedPrecondition, InvalidArgument, NotFound, OutOfRange, PermissionDenied, RdaxError,
                     ResourceExhausted, Unavailable)
from .fabric_api import Endpoint, Fabric, Region
from .grants import Grant, GrantDescriptor, access_label, check_access, check_range
from .limits import MAX_COMMIT_RANGES, Limits, TokenBucket, ViolationLog
from .metrics import NodeMetrics
from .policy import Policy, Rule
from .paths import stat_beneath
from .seals import SEALED, Seal, SealInfo, canonical_path, check_commit_range, open_sealed_file
from .sessions import AsyncFollower, ChannelCloser, Event, EventKind, Session, canonical_gid, check_client

log = logging.getLogger("rdax.service")

LEASE_BREAK_REASON = "lease break: another process opened or truncated the file"
# The audit's share of a CPU while it runs: after each slice of work it sleeps for the rest, so that requests get
# the GIL and the CPU. Unpaced, a pass over 1000 seals (0.4 s in the lab) doubled Grant's p50 while it ran.
AUDIT_DUTY = 0.5
AUDIT_SLICE_SECONDS = 0.002
_ENDED_SESSIONS_KEPT = 1024   # how many ended session ids are remembered, for helpful NOT_FOUND messages
MAX_FILE_BYTES = (1 << 63) - 4096   # off_t is signed 64-bit; beyond it the kernel calls fail before any filesystem
ANONYMOUS = "anonymous"       # every caller of a node started with --insecure
# An access error this soon after the node revoked one of the session's grants is a client that had not heard
# of the revocation yet, not an attack: it ends the session but does not count against the identity.
_REVOCATION_EXCUSES_SECONDS = 120.0


@dataclasses.dataclass
class Usage:
    """What one identity holds on the node, against its quotas (policy.Quotas); its grants are counted from its
    sessions (_by_identity) when one is asked for."""

    sessions: int = 0
    sealed_bytes: int = 0      # the lengths of the seals its sessions hold, once per hold
    watch_streams: int = 0


class _Holds(threading.local):
    """One thread's holds of a NodeLock and the work it queued meanwhile."""

    depth = 0
    after: list[Callable[[], None]] | None = None


class NodeLock:
    """The node's one lock (reentrant), and the slow work decided under it but done after it.

    A revocation changes the tables under the lock and queues the rest — deregistering regions, letting files go,
    telling holders — with after(): the thread that queued it runs it as soon as it lets go of its outermost hold,
    in the order queued, before its call returns. Other calls wait for the bookkeeping, never for N
    deregistrations. Work queued after() must never wait for another thread's queued work (it would deadlock):
    whoever finishes last does what comes next instead (Node._settle).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._local = _Holds()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._lock.acquire(blocking, timeout):
            return False
        self._local.depth += 1
        return True

    def release(self) -> None:
        self._release(raise_errors=True)

    def __enter__(self) -> "NodeLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # An exception on its way out is the caller's answer: the queued work's own failures are only logged then.
        self._release(raise_errors=exc_type is None)

    def after(self, work: Callable[[], None]) -> None:
        """Run `work` once this thread lets go of the lock (it holds it now)."""
        if not self._local.depth:
            raise RuntimeError("NodeLock.after() without holding the lock")
        if self._local.after is None:
            self._local.after = []
        self._local.after.append(work)

    def _release(self, raise_errors: bool) -> None:
        self._local.depth -= 1
        if self._local.depth:
            self._lock.release()
            return
        work, self._local.after = self._local.after, None
        self._lock.release()
        failed: Exception | None = None
        for item in work or ():   # every item runs, even if one before it failed: they are steps of revocations
            try:
                item()
            except Exception as exc:
                if failed is not None or not raise_errors:
                    log.exception("work queued under the node's lock failed")
                failed = failed or exc
        if failed is not None and raise_errors:
            raise failed

    # What threading.Condition uses: a wait lets go of every hold (the queued work stays queued) and takes them back.
    def _is_owned(self) -> bool:
        return bool(self._local.depth)

    def _release_save(self) -> tuple[object, int]:
        depth, self._local.depth = self._local.depth, 0
        return self._lock._release_save(), depth   # type: ignore[attr-defined]

    def _acquire_restore(self, state: tuple[object, int]) -> None:
        self._lock._acquire_restore(state[0])   # type: ignore[attr-defined]
        self._local.depth = state[1]


class OpenedSession:
    """What OpenSession answers: the session's id, the node's endpoint, how often to heartbeat."""

    def __init__(self, session_id: str, endpoint: Endpoint, lease_seconds: int) -> None:
        self.session_id = session_id
        self.endpoint = endpoint
        self.lease_seconds = lease_seconds


class Node:
    """A storage node exporting the files beneath `export_root` to RDMA clients through `fabric`.

    Create it in the main thread (or after install_sigio_guard() ran there):
    it blocks SIGIO before taking any lease. shutdown() lets everything go.
    """

    def __init__(self, export_root: str | os.PathLike[str], fabric: Fabric, *, lease_seconds: int = 30,
                 grant_ttl_seconds: float | None = None, max_grants_per_session: int = 1024,
                 map_sync: bool = True, watch_seals: bool = True, audit_seconds: float = 5.0,
                 write_alignment: int = 1, policy: Policy | None = None, audit: Audit | None = None,
                 limits: Limits = Limits(), metrics: NodeMetrics | None = None,
                 extend_reserve: int = 16 << 30,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, not {lease_seconds}")
        self.lease_seconds = lease_seconds
        self.grant_ttl_seconds = grant_ttl_seconds
        self.max_grants_per_session = max_grants_per_session
        # Where clients' WRITEs may start (multiples of it): the canary's finding, handed out with every grant.
        self.write_alignment = write_alignment
        self._fabric = fabric
        self._map_sync = map_sync
        self._clock = clock
        self._wall_clock = wall_clock
        # Default deny: a node without a policy refuses every identity.
        self.policy = policy if policy is not None else Policy.parse("", "<no policy>")
        self.audit_log = audit if audit is not None else NullAudit()
        self.metrics = metrics if metrics is not None else NodeMetrics()
        # Address space set aside behind each seal's mapping so that Extend can grow it in place.
        self.extend_reserve = extend_reserve
        self.limits = limits
        self._root_fd = os.open(export_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._lock = NodeLock()
        # One Seal at a time per path (never per node: preparing a large file must not hold up other paths),
        # so that a path is never opened twice.
        self._sealing_paths: dict[str, tuple[threading.Lock, int]] = {}
        self._seals_in_progress = 0
        # Notified when a Seal in progress ends and when a revoked seal's file is let go.
        self._quiet = threading.Condition(self._lock)   # type: ignore[arg-type]
        # Revoked seals whose file is not let go yet, by path: a new Seal of the path opens it only after that.
        self._letting_go: dict[str, revocation.Revocation] = {}
        # Per session: regions of its PD outside the grant tables (Seal.unsettled), and Grants registering now
        # (counted against its limits); an ended session's channel is closed once none is left (_settle).
        self._pd_users: collections.Counter[str] = collections.Counter()
        self._registering: collections.Counter[str] = collections.Counter()
        self._closing: dict[str, Session] = {}
        self._usage: dict[str, Usage] = collections.defaultdict(Usage)
        self._by_identity: dict[str, dict[str, Session]] = {}   # identity -> its live sessions by id
        self._open_rate = TokenBucket(limits.node_open_session_rate, limits.node_open_session_burst, clock)
        self._open_rate_by_identity: dict[str, TokenBucket] = {}
        self._violations = ViolationLog(limits, clock)
        self._sessions: dict[str, Session] = {}
        self._seals: dict[str, Seal] = {}
        self._live_seal_by_path: dict[str, Seal] = {}   # SEALED ones only: a revoked path can be sealed anew
        self._ended: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()   # id -> (identity, why)
        self._draining = False
        self._stop = threading.Event()
        revocation.install_sigio_guard()   # before any lease, and before the threads below so they inherit it
        self._closer = ChannelCloser()
        self._lease_watcher = revocation.LeaseBreakWatcher(self.check_leases)
        self._lease_watcher.start()
        # Leases miss rename, link, unlink and chmod (no open): fanotify sees them.
        self._seal_by_key: dict[bytes, Seal] = {}
        self._seal_watcher = SealWatcher(self._on_seal_event) if watch_seals else None
        self.audit_seconds = audit_seconds
        self._audit_now = threading.Event()   # lost fanotify events: audit at once
        self._reaper = threading.Thread(target=self._reap_forever, name="rdax-reaper", daemon=True)
        self._reaper.start()
        # A thread of its own: a paced pass over many seals takes seconds, which must not hold up the reaper's
        # lease and QP checks.
        self._auditor = threading.Thread(target=self._audit_forever, name="rdax-audit", daemon=True)
        self._auditor.start()
        self.metrics.watch(self)

    def state_counts(self) -> dict[str, int]:
        """Live sessions, seals, grants and the bytes under them (metrics)."""
        with self._lock:
            grants = [g for s in self._sessions.values() for g in s.grants.values()]
            return {"sessions": len(self._sessions), "seals": len(self._live_seal_by_path), "grants": len(grants),
                    "registered_bytes": sum(g.length for g in grants)}

    # -- sessions -------------------------------------------------------------
    def open_session(self, client_id: str, endpoint: Endpoint | None, *, identity: str = ANONYMOUS,
                     cert_not_after: float | None = None, peer: str = "") -> OpenedSession:
        check_client(client_id, endpoint)
        assert endpoint is not None
        endpoint = dataclasses.replace(endpoint, gid=canonical_gid(endpoint.gid))
        with self._lock:
            self._check_serving()
            rule = self._rule(identity)
            self._check_session_limits(identity, rule)
            self._usage[identity].sessions += 1   # reserved now: the QP is made outside the lock
        try:
            channel = self._fabric.open_channel(endpoint)
        except BaseException:
            with self._lock:
                self._usage[identity].sessions -= 1
            raise
        session = Session(secrets.token_urlsafe(24), client_id, channel, self._clock() + self.lease_seconds,
                          identity=identity, handle=_new_id("s"), cert_not_after=cert_not_after)
        with self._lock:
            if self._draining:
                self._usage[identity].sessions -= 1
                self._closer.close_later(channel, f"session {session.handle}")
                raise Unavailable("the node is shutting down: open a session on another node or retry later")
            self._sessions[session.id] = session
            self._by_identity.setdefault(identity, {})[session.id] = session
        log.info("session %s opened for %s, client %r (node qpn %d, client qpn %d)", session.handle, identity,
                 quote(client_id, 64), channel.endpoint.qpn, endpoint.qpn)
        self.audit_log.event("session_opened", identity=identity, session=session.handle, peer=peer,
                             client_id=quote(client_id, 64), node_qpn=channel.endpoint.qpn, client_qpn=endpoint.qpn)
        return OpenedSession(session.id, channel.endpoint, self.lease_seconds)

    def _check_session_limits(self, identity: str, rule: Rule) -> None:
        refused_for = self._violations.refused_for(identity)
        if refused_for:
            raise PermissionDenied(
                f"identity {identity!r} is refused new sessions for another {refused_for:.0f} s: its sessions caused "
                f"more than {self.limits.violations_allowed} remote access violations within "
                f"{self.limits.violation_window:.0f} s (RDMA outside its grants); fix the client, then retry")
        if len(self._sessions) >= self.limits.max_sessions:
            raise ResourceExhausted(f"the node holds {len(self._sessions)} sessions, its limit "
                                    f"(--max-sessions {self.limits.max_sessions}): retry later or use another node")
        usage = self._usage[identity]
        if usage.sessions >= rule.quotas.max_sessions:
            raise ResourceExhausted(
                f"identity {identity!r} already has {usage.sessions} sessions, its quota (max_sessions "
                f"{rule.quotas.max_sessions} in {self.policy.source}): close sessions it no longer uses")
        bucket = self._open_rate_by_identity.get(identity)
        if bucket is None:
            bucket = self._open_rate_by_identity[identity] = TokenBucket(
                self.limits.open_session_rate, self.limits.open_session_burst, self._clock)
        for scope, limiter in ((f"identity {identity!r}", bucket), ("the node", self._open_rate)):
            wait = limiter.take()
            if wait:
                raise ResourceExhausted(
                    f"OpenSession is limited to {limiter.rate:g} per second (burst {limiter.burst}) for {scope}: "
                    f"retry in {wait:.2f} s, and reuse a session instead of opening one per operation")

    def heartbeat(self, session_id: str, *, identity: str = ANONYMOUS) -> int:
        with self._lock:
            self._session(session_id, identity)   # renews it
            return self.lease_seconds

    def close_session(self, session_id: str, *, identity: str = ANONYMOUS) -> None:
        with self._lock:
            self._end_session(self._session(session_id, identity), None, "session closed")

    def watch(self, session_id: str, keep_going: Callable[[], bool] = lambda: True,
              poll_seconds: float = 0.5, *, identity: str = ANONYMOUS) -> Iterator[Event]:
        """The session's events as they come (and any that came while nobody watched); ends with the session."""
        with self._lock:
            session = self._session(session_id, identity)
            return session.events.follow(keep_going, poll_seconds)

    def watch_async(self, session_id: str, loop: asyncio.AbstractEventLoop, *,
                    identity: str = ANONYMOUS) -> AsyncFollower:
        """Like watch(), for an asyncio Watch stream: holds no thread while it waits. close() the follower when done;
        the identity's concurrent streams are held to its quota."""
        with self._lock:
            session = self._session(session_id, identity)
            usage = self._usage[identity]
            quota = self._rule(identity).quotas.max_watch_streams
            if usage.watch_streams >= quota:
                raise ResourceExhausted(
                    f"identity {identity!r} already has {usage.watch_streams} Watch streams open, its quota "
                    f"(max_watch_streams {quota} in {self.policy.source}): one stream per session is enough")
            usage.watch_streams += 1
            follower = session.events.subscribe_async(loop)
        original_close = follower.close

        def close() -> None:
            original_close()
            with self._lock:
                usage.watch_streams -= 1
        follower.close = close   # type: ignore[method-assign]
        return follower

    # -- seals ----------------------------------------------------------------
    def seal(self, session_id: str, path: str, length: int, create: bool = False, *,
             identity: str = ANONYMOUS) -> SealInfo:
        """Seal [0, length) of `path`, or join the seal another session holds on it."""
        relpath = canonical_path(path)
        check_length(length)   # before anything is opened
        if length > MAX_FILE_BYTES:
            raise OutOfRange(f"length {length} is more than a file can hold here (at most {MAX_FILE_BYTES} bytes, "
                             f"2^63 - 4096): seal a shorter length")
        with self._lock:
            session = self._session(session_id, identity)
            rule = self.policy.check_seal(identity, relpath, create=False)
            may_create = create and rule.create
            existing = self._live_seal_by_path.get(relpath)
            if existing is not None:
                return self._join(existing, session, length)
            self._reserve_sealed_bytes(identity, rule, length)
            path_lock = self._path_lock(relpath)
        try:
            with path_lock:
                return self._seal_new(session_id, identity, relpath, length, create, may_create)
        finally:
            with self._lock:
                self._release_path_lock(relpath)
                self._usage[identity].sealed_bytes -= length   # the reservation; a hold that was made counts itself

    def _seal_new(self, session_id: str, identity: str, relpath: str, length: int, create: bool,
                  may_create: bool) -> SealInfo:
        with self._lock:
            existing = self._live_seal_by_path.get(relpath)   # sealed by someone else while we waited for the path
            if existing is not None:
                return self._join(existing, self._session(session_id, identity), length)
            # A revoked seal of this path lets its file go (lease, descriptor) once its last region is deregistered,
            # just outside the lock: opening it before then would break our own lease.
            while relpath in self._letting_go:
                self._quiet.wait()
        # Slow (preallocation, zero-filling, fsync), so outside the node's lock; the path's lock keeps another
        # Seal of the same path from opening it meanwhile.
        try:
            sealed_file = open_sealed_file(self._root_fd, relpath, length, create=may_create,
                                           map_sync=self._map_sync, reserve=max(length, self.extend_reserve))
        except NotFound as exc:
            if create and not may_create:
                raise PermissionDenied(
                    f"identity {identity!r} may not create files ({relpath!r} does not exist): seal an existing "
                    f"file, or ask the operator for `create = true` in {self.policy.source}") from exc
            raise
        with self._lock:
            try:
                session = self._session(session_id, identity)   # it may have expired meanwhile
                if self._draining:
                    raise Unavailable("the node is shutting down: seal on another node or retry later")
            except RdaxError:
                sealed_file.close()
                raise
            prepared = sealed_file.prepared
            seal = Seal(_new_id("seal"), relpath, length, sealed_file, prepared.extent_count, prepared.fingerprint)
            if self._seal_watcher is not None:
                try:
                    seal.watch_key = self._seal_watcher.watch(sealed_file.fd)
                except OSError as exc:
                    sealed_file.close()
                    raise RdaxError(f"cannot watch {relpath!r} for seal breaks: {exc}") from exc
                self._seal_by_key[seal.watch_key] = seal
            self._seals[seal.id] = seal
            self._live_seal_by_path[relpath] = seal
            self._add_holder(seal, session)
            log.info("sealed %r (%d bytes, %d extents) as %s for session %s", relpath, length,
                     prepared.extent_count, seal.id, session.handle)
            self.audit_log.event("seal", identity=identity, session=session.handle, seal=seal.id, path=relpath,
                                 length=length, joined=False)
            self.metrics.seals.labels("new").inc()
            return seal.info(session.id)

    def extend(self, session_id: str, seal_id: str, new_length: int, *, identity: str = ANONYMOUS) -> SealInfo:
        """Grow a held seal in place to `new_length`: the new blocks are prepared (allocated, written, verified)
        and mapped right after the old ones; every grant stays valid; holders get an EXTENDED event."""
        check_length(new_length)
        with self._lock:
            session = self._session(session_id, identity)
            seal = self._held_seal(session, seal_id)
            if seal.state != SEALED:
                raise FailedPrecondition(seal.revoked_message())
            if new_length <= seal.length:
                if new_length == seal.length:
                    return seal.info(session.id)
                raise InvalidArgument(f"length {new_length} is less than the seal's {seal.length}: seals grow, they "
                                      f"do not shrink (declare a smaller file size with Unseal's size instead)")
            mapping = seal.mapping
            if new_length > mapping.reserve:
                raise OutOfRange(f"seal {seal.id} can grow in place to {mapping.reserve} bytes, not {new_length}: "
                                 f"unseal it and seal {new_length} bytes anew")
            rule = self.policy.check_seal(identity, seal.path, create=False)
            delta = new_length - seal.length
            self._reserve_sealed_bytes(identity, rule, delta)
        try:
            return self._extend(session, seal, new_length)
        finally:
            with self._lock:
                self._usage[identity].sealed_bytes -= delta

    def _extend(self, session: Session, seal: Seal, new_length: int) -> SealInfo:
        # One Extend of a seal at a time (extend_lock). The slow part (zero-filling, fsync, FIEMAP) runs outside
        # the node's lock under the seal's io_lock, and never takes the node's lock while holding io_lock: nothing
        # under the node's lock may wait behind a preparation. A revocation unmaps under io_lock too (outside the
        # node's lock, revocation.py); it stops new grants first, which the preparation sees within a MiB: it undoes
        # its work and lets go.
        with seal.extend_lock:
            with self._lock:
                if seal.state != SEALED or seal.file is None:
                    raise FailedPrecondition(seal.revoked_message())
                if seal.length >= new_length:   # another holder extended it meanwhile
                    return seal.info(session.id)
                old_length, sealed_file, fingerprint = seal.length, seal.file, seal.fingerprint
            with seal.io_lock:
                if seal.file is not sealed_file or not seal.accepting_grants:   # revoked before we got here
                    raise FailedPrecondition(seal.revoked_message())
                preparation = Preparation(sealed_file.fd, new_length)
                try:
                    prepared = preparation.run(
                        lease_intact=lambda: sealed_file.lease_intact() and seal.accepting_grants)
                    if summary(block_map(sealed_file.fd, old_length, sync=not self._map_sync))[1] != fingerprint:
                        raise FailedPrecondition(f"the sealed blocks of {seal.path!r} moved while it was extended: "
                                                 f"the seal will be revoked; seal it again")
                    sealed_file.mapping.grow(new_length)
                except BaseException:
                    preparation.undo()
                    raise
            with self._lock:
                if seal.state != SEALED:
                    raise FailedPrecondition(seal.revoked_message())
                seal.length = new_length
                seal.fingerprint, seal.extent_count = prepared.fingerprint, prepared.extent_count
                for holder in seal.holders:
                    other = self._sessions.get(holder)
                    if other is not None:
                        self._usage[other.identity].sealed_bytes += new_length - old_length
                        other.events.publish(Event(EventKind.EXTENDED, seal.id, (), f"extended to {new_length} "
                                                   f"bytes by session {session.handle}", seal.epoch, self._unix_ms(),
                                                   new_length))
                log.info("extended %s of %r from %d to %d bytes for session %s", seal.id, seal.path, old_length,
                         new_length, session.handle)
                self.audit_log.event("extend", identity=session.identity, session=session.handle, seal=seal.id,
                                     path=seal.path, length=new_length)
                return seal.info(session.id)

    def _path_lock(self, relpath: str) -> threading.Lock:
        lock, users = self._sealing_paths.get(relpath, (threading.Lock(), 0))
        self._sealing_paths[relpath] = (lock, users + 1)
        self._seals_in_progress += 1
        return lock

    def _release_path_lock(self, relpath: str) -> None:
        lock, users = self._sealing_paths[relpath]
        if users > 1:
            self._sealing_paths[relpath] = (lock, users - 1)
        else:
            del self._sealing_paths[relpath]
        self._seals_in_progress -= 1
        self._quiet.notify_all()

    def _reserve_sealed_bytes(self, identity: str, rule: Rule, length: int) -> None:
        usage = self._usage[identity]
        if usage.sealed_bytes + length > rule.quotas.max_sealed_bytes:
            raise ResourceExhausted(
                f"identity {identity!r} holds seals of {usage.sealed_bytes} bytes; {length} more would pass its "
                f"quota (max_sealed_bytes {rule.quotas.max_sealed_bytes} in {self.policy.source}): unseal files "
                f"it no longer writes, or seal less")
        usage.sealed_bytes += length

    def unseal(self, session_id: str, seal_id: str, *, identity: str = ANONYMOUS, size: int | None = None) -> int:
        """Drop the session's hold (and its grants); the last holder's unseal lets the file go, set to the size a
        holder declared (`size`, or an earlier Commit's). Returns the epoch."""
        with self._lock:
            session = self._session(session_id, identity)
            seal = self._held_seal(session, seal_id)
            if size is not None:
                seal.declare_size(size)
            self._drop_hold(seal, session, "unseal")
            return seal.epoch

    def stat(self, session_id: str, seal_id: str, *, identity: str = ANONYMOUS, path: str = "") -> SealInfo:
        """A seal by id, or a file by path (its size; its live seal if it has one) without sealing it."""
        if not seal_id and path:
            return self._stat_path(session_id, path, identity)
        with self._lock:
            session = self._session(session_id, identity)
            seal = self._seals.get(seal_id)
            if seal is None or not self._may_see(session, seal):
                raise self._unknown_seal(seal_id)
            return seal.info(session.id)

    def list_seals(self, session_id: str, *, identity: str = ANONYMOUS) -> list[SealInfo]:
        """The seals the caller may see: those it holds, and those on paths its policy lets it seal."""
        with self._lock:
            session = self._session(session_id, identity)
            return [seal.info(session.id) for seal in self._seals.values() if self._may_see(session, seal)]

    def _stat_path(self, session_id: str, path: str, identity: str) -> SealInfo:
        relpath = canonical_path(path)
        with self._lock:
            session = self._session(session_id, identity)
            if not self.policy.may_see(identity, relpath):
                raise NotFound(f"{relpath!r} is not on a path identity {identity!r} may seal (policy "
                               f"{self.policy.source}): Stat shows only those")
            seal = self._live_seal_by_path.get(relpath)
            if seal is not None:
                return seal.info(session.id)
        size = stat_beneath(self._root_fd, relpath).st_size   # stat, not open: it breaks no lease
        return SealInfo("", relpath, 0, 0, 0, "", (), "", (), "UNSEALED", "", 0, size)

    def _may_see(self, session: Session, seal: Seal) -> bool:
        return session.id in seal.holders or self.policy.may_see(session.identity, seal.path)

    def commit(self, session_id: str, seal_id: str, ranges: Sequence[tuple[int, int]], *,
               identity: str = ANONYMOUS, size: int | None = None) -> int:
        """msync(MS_SYNC) each (offset, length) range of the seal, or all of it for none; returns the bytes made durable.

        The ranges are checked and synced outside the node's lock: a Commit holds up nobody but a revocation of
        its own seal (which waits for the seal's mapping to be free before unmapping it).
        """
        if len(ranges) > MAX_COMMIT_RANGES:
            raise InvalidArgument(f"Commit has {len(ranges)} ranges, at most {MAX_COMMIT_RANGES} are taken: merge "
                                  f"adjacent ranges, send several Commits, or send none to commit the whole seal")
        with self._lock:
            session = self._session(session_id, identity)
            seal = self._held_seal(session, seal_id)
            if seal.state != SEALED:
                raise FailedPrecondition(seal.revoked_message())
            seal_length = seal.length
            if size is not None:
                seal.declare_size(size)
        ranges = list(ranges) or [(0, seal_length)]
        for offset, length in ranges:
            check_commit_range(offset, length, seal_length)
        with seal.io_lock:
            mapping = seal.mapping   # FailedPrecondition if it was revoked meanwhile
            for offset, length in ranges:
                mapping.sync(offset, length)
        return sum(length for _, length in ranges)

    # -- grants ---------------------------------------------------------------
    def grant(self, session_id: str, seal_id: str, offset: int, length: int, access: int, *,
              identity: str = ANONYMOUS) -> GrantDescriptor:
        """One memory region over exactly [offset, offset+length) of the seal, with exactly `access`, in the session's PD.

        The region is registered outside the node's lock (it is slow: ibv_reg_mr), counted meanwhile in the seal's
        `unsettled`, which keeps a revocation from letting the file go under it; back under the lock, the grant
        enters the tables only if the seal, the session's hold and the policy still allow it, or else the region is
        deregistered again (and the file let go, if a revocation was waiting for it).
        """
        with self._lock:
            session = self._session(session_id, identity)
            seal = self._held_seal(session, seal_id)
            if seal.state == SEALED and seal.file is not None and not seal.file.lease_intact():
                # A break the watcher has not handled yet: no new grant on a file someone else is opening.
                self._revoke(seal, LEASE_BREAK_REASON, EventKind.REVOKED)
            if seal.state != SEALED or not seal.accepting_grants:
                raise FailedPrecondition(seal.revoked_message())
            check_access(access)
            check_range(offset, length, seal.length)
            rule = self.policy.check_grant(identity, seal.path, access)
            # Grants being registered count: a burst of them must not get past the limits.
            mine = len(session.grants) + self._registering[session.id]
            if mine >= self.max_grants_per_session:
                raise ResourceExhausted(
                    f"session {session.handle} already holds {mine} grants, this node's limit per "
                    f"session (--max-grants-per-session): release grants it no longer needs before asking for more")
            held = sum(len(other.grants) + self._registering[other.id]
                       for other in self._by_identity.get(identity, {}).values())
            if held >= rule.quotas.max_grants:
                raise ResourceExhausted(
                    f"identity {identity!r} already holds {held} grants, its quota (max_grants "
                    f"{rule.quotas.max_grants} in {self.policy.source}): release grants it no longer needs")
            remote_addr = seal.mapping.addr + offset
            policy = self.policy
            self._registering[session.id] += 1
            self._unsettle(seal, session.id)   # the file stays mapped and leased until this region is settled
        try:
            region = session.channel.register(remote_addr, length, access)
        except BaseException:
            with self._lock:
                self._registered(seal, session)   # nothing was registered: nothing to deregister
            raise
        with self._lock:
            refused = self._grant_refused(seal, session, access, policy)
            if refused is None:
                grant = self._new_grant(seal, session, offset, length, access, remote_addr, region)
                seal.grants[grant.id] = grant
                session.grants[grant.id] = grant
                self._registered(seal, session)   # in the tables now: a revocation takes it from there
                log.info("granted %s [%d, %d) of %s to session %s as %s (rkey %#x)", access_label(access), offset,
                         offset + length, seal.id, session.handle, grant.id, grant.rkey)
                self.audit_log.event("grant", identity=identity, session=session.handle, seal=seal.id,
                                     path=seal.path, grant=grant.id, offset=offset, length=length,
                                     access=access_label(access), rkey=grant.rkey)
                self.metrics.grants.inc()
                return grant.descriptor(self.write_alignment)
        # Revoked, unsealed, ended or no longer allowed meanwhile: the region goes again, and only then may a
        # revocation waiting for it let the file go.
        revocation.close_region(region, f"a grant of session {session.handle} refused after registering")
        with self._lock:
            self._registered(seal, session)
        raise refused

    def _grant_refused(self, seal: Seal, session: Session, access: int, checked: Policy) -> RdaxError | None:
        """Why a grant whose region was registered outside the lock may not enter the tables after all; None: it may."""
        if self._draining:
            return Unavailable("the node is shutting down: open a session on another node or retry later")
        if self._sessions.get(session.id) is not session:
            return NotFound(f"session {session.handle} ended while its grant was being registered: open a new session")
        if seal.state != SEALED or not seal.accepting_grants:
            return FailedPrecondition(seal.revoked_message())
        if session.id not in seal.holders:
            return FailedPrecondition(f"session {session.handle} unsealed {seal.id} of {seal.path!r} while its grant "
                                      f"was being registered: Seal the path again")
        if self.policy is not checked:   # a SIGHUP came meanwhile
            try:
                self.policy.check_grant(session.identity, seal.path, access)
            except RdaxError as exc:
                return exc
        return None

    def _registered(self, seal: Seal, session: Session) -> None:
        """A registration outside the lock is over: its region is in the tables, or was never made, or is gone."""
        self._registering[session.id] -= 1
        if not self._registering[session.id]:
            del self._registering[session.id]
        self._settle(seal, [session.id])

    def release(self, session_id: str, grant_id: str, *, identity: str = ANONYMOUS) -> None:
        """Give a grant back: its region is deregistered (no epoch bump: nothing was taken from anyone)."""
        with self._lock:
            session = self._session(session_id, identity)
            grant = session.grants.get(grant_id)
            if grant is None:
                raise NotFound(f"grant {quote(grant_id, 64)!r} is not one of this session's: it was released, "
                               f"revoked or expired, or never existed; Grant again if you need access")
            seal = self._seals[grant.seal_id]
            revocation.take_out(seal, [grant], self._sessions)
            self._take_back(seal, [grant])   # deregistered as the lock is let go, before this returns
            self.audit_log.event("release", identity=identity, session=session.handle, grant=grant.id)
            self.metrics.releases.inc()

    # -- revocation -----------------------------------------------------------
    def revoke(self, seal_id: str, reason: str, kind: EventKind = EventKind.REVOKED) -> None:
        """Revoke every grant of a seal and let its file go, in the safe order (revocation.py)."""
        with self._lock:
            self._revoke(self._seal(seal_id), reason, kind)

    def check_leases(self) -> list[str]:
        """Revoke the seals whose lease is under break (someone opened or truncated the file); returns their ids."""
        with self._lock:
            broken = [seal for seal in self._live_seal_by_path.values()
                      if seal.file is not None and not seal.file.lease_intact()]
            for seal in broken:
                self._revoke(seal, LEASE_BREAK_REASON, EventKind.REVOKED)
            self.metrics.lease_breaks.inc(len(broken))
            return [seal.id for seal in broken]

    def _on_seal_event(self, key: bytes, mask: int, pid: int) -> None:
        """fanotify saw another process touch a sealed file (or lost events: key b'')."""
        self.metrics.fanotify_events.inc()
        if not key:
            self._audit_now.set()
            return
        with self._lock:
            seal = self._seal_by_key.get(key)
            if seal is not None:
                self._revoke(seal, f"seal broken: file {describe(mask)} by pid {pid}", EventKind.REVOKED)

    def audit(self) -> list[str]:
        """Re-read every live seal's block map (FIEMAP); revoke those that moved or stopped being stable.

        The FIEMAP calls run outside the node's lock, each under its seal's io_lock (a seal busy with a Commit or
        an Extend is left for the next round), and without FIEMAP_FLAG_SYNC when the node maps with MAP_SYNC
        (DAX): the audit then costs the data path nothing. It is paced (AUDIT_DUTY): after every few milliseconds of
        work it sleeps as long again, so that requests do not queue behind a pass for the GIL or the CPU.
        """
        self.metrics.audit_runs.inc()
        moved = []
        with self.metrics.audit_seconds.time():
            with self._lock:
                live = [(seal, seal.length, seal.fingerprint) for seal in self._live_seal_by_path.values()]
            busy = 0.0   # seconds of work since the last pause
            for seal, length, fingerprint in live:
                if not seal.io_lock.acquire(blocking=False):
                    continue
                started = time.monotonic()
                try:
                    if seal.file is None:
                        continue
                    try:
                        extents = block_map(seal.file.fd, length, sync=not self._map_sync)
                        check_stable(extents, length)
                        why = "extents changed (FIEMAP audit)" if summary(extents)[1] != fingerprint else ""
                    except (OSError, RdaxError) as exc:
                        why = f"block map no longer stable (FIEMAP audit): {exc}"
                finally:
                    seal.io_lock.release()
                    busy += time.monotonic() - started
                    if busy >= AUDIT_SLICE_SECONDS:
                        self._stop.wait(busy * (1 - AUDIT_DUTY) / AUDIT_DUTY)
                        busy = 0.0
                if why:
                    with self._lock:
                        if seal.state == SEALED and seal.length == length:
                            self._revoke(seal, why, EventKind.REVOKED)
                            moved.append(seal.id)
        return moved

    def reap(self) -> None:
        """End sessions not renewed within the lease, whose certificate expired or whose QP failed; revoke grants
        past their time to live."""
        now = self._clock()
        wall = self._wall_clock()
        with self._lock:
            for session in [s for s in self._sessions.values() if s.expires_at <= now]:
                self._end_session(session, EventKind.SESSION_EXPIRED,
                                  f"session expired: no heartbeat within {self.lease_seconds} s")
            for session in [s for s in self._sessions.values()
                            if s.cert_not_after is not None and s.cert_not_after <= wall]:
                self._end_session(session, EventKind.SESSION_EXPIRED,
                                  "session expired: the client's certificate expired; connect with a renewed one")
            # Grants have no time to live unless the node gives them one: no pass over every grant otherwise.
            for seal in list(self._live_seal_by_path.values()) if self.grant_ttl_seconds is not None else ():
                expired = [g for g in seal.grants.values() if g.expires_at is not None and g.expires_at <= now]
                self._revoke_grants(seal, expired, f"grant expired after {self.grant_ttl_seconds} s")
                if expired:
                    self.metrics.revocations.labels("grant expired").inc(len(expired))
            sessions = list(self._sessions.values())
        # Querying each QP is a syscall: outside the lock.
        failed = [s for s in sessions if s.channel.failed()]
        for session in failed:
            self._end_failed_session(session)

    def _end_failed_session(self, session: Session) -> None:
        """A session whose QP went to the error state: end it (its grants revoked, its client told) and, unless a
        revocation explains it, count it as a remote access violation of its identity."""
        with self._lock:
            if self._sessions.get(session.id) is not session:
                return
            excused = self._unix_ms() - session.last_revoked_unix_ms < _REVOCATION_EXCUSES_SECONDS * 1000
            reason = ("session ended: its QP went to the error state after the node revoked one of its grants; "
                      "open a new session" if excused else
                      "session ended: its QP went to the error state (an RDMA access outside its grants, or a "
                      "broken connection); open a new session and access only what was granted")
            self._end_session(session, EventKind.SESSION_ENDED, reason)
            refused = False if excused else self._violations.record(session.identity)
            self.metrics.violations.labels(str(excused).lower()).inc()
        log.warning("session %s of %s: QP in the error state%s", session.handle, session.identity,
                    " after a revocation" if excused else " (remote access violation)")
        self.audit_log.event("violation" if not excused else "qp_error", identity=session.identity,
                             session=session.handle, excused_by_revocation=excused, identity_refused=refused)

    def set_policy(self, policy: Policy) -> None:
        """Take a new policy (SIGHUP). What it no longer allows is revoked in the safe order, holders told why."""
        with self._lock:
            old, self.policy = self.policy, policy
            why = f"policy changed ({policy.source} reloaded)"
            for seal in list(self._live_seal_by_path.values()):
                for session_id in list(seal.holders):
                    session = self._sessions.get(session_id)
                    if session is None:
                        continue
                    allowed = policy.allowed_access(session.identity, seal.path)
                    if not allowed:
                        self._drop_hold(seal, session, f"{why}: {session.identity!r} may no longer seal "
                                                       f"{seal.path!r}")
                        continue
                    lost = [g for g in seal.grants.values() if g.session_id == session_id and g.access & ~allowed]
                    if lost:
                        self.metrics.revocations.labels("policy changed").inc(len(lost))
                        self._revoke_grants(seal, lost, f"{why}: {session.identity!r} may no longer have "
                                                        f"{access_label(lost[0].access)} on {seal.path!r}")
                        for grant in lost:
                            self.audit_log.event("revoke", identity=session.identity, session=session.handle,
                                                 grant=grant.id, seal=seal.id, reason=why)
        log.info("policy %s in force (was %s)", policy.source, old.source)
        self.audit_log.event("policy_loaded", source=policy.source, rules=len(policy.rules))

    # -- shutdown -------------------------------------------------------------
    def shutdown(self, reason: str = "the node is shutting down", teardown_timeout: float = 10.0) -> bool:
        """Revoke everything (SHUTDOWN events), end every session, stop the threads; False if QP teardown lags."""
        with self._lock:
            if self._draining:
                return True
            self._draining = True
            for seal in list(self._live_seal_by_path.values()):
                self._revoke(seal, reason, EventKind.SHUTDOWN)
            for session in list(self._sessions.values()):
                self._end_session(session, EventKind.SHUTDOWN, reason)
        # (the regions were deregistered and the files let go as the lock was let go, unless a Grant registering or
        # another revocation deregistering has the last region of a seal: it lets that file go.)
        with self._lock:
            # A Seal in progress holds its path's lock while it opens and leases a file; once
            # it is through (and has let the file go: we are draining), no lease is left.
            while self._seals_in_progress or self._letting_go:
                self._quiet.wait()
            os.close(self._root_fd)
        self._stop.set()
        self._audit_now.set()
        self._reaper.join()
        self._auditor.join()
        self._lease_watcher.stop()
        if self._seal_watcher is not None:
            self._seal_watcher.close()
        revocation.remove_sigio_guard()
        done = self._closer.stop(teardown_timeout)
        if not done:
            log.warning("QP teardown still running after %.0f s; leaving it to process exit", teardown_timeout)
        return done

    def wait_for_teardown(self, timeout: float = 10.0) -> bool:
        """Wait until every channel of an ended session is destroyed; False on timeout."""
        return self._closer.wait_idle(timeout)

    def __enter__(self) -> "Node":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- the rules ------------------------------------------------------------
    def _check_serving(self) -> None:
        if self._draining:
            raise Unavailable("the node is shutting down: open a session on another node or retry later")

    def _rule(self, identity: str) -> Rule:
        rule = self.policy.rule_for(identity)
        if rule is None:
            raise PermissionDenied(
                f"identity {quote(identity, 200)!r} is not in the policy {self.policy.source}: ask the operator to "
                f"add an [[allow]] entry for it (and send SIGHUP to rdax-server)")
        return rule

    def _session(self, session_id: str, identity: str = ANONYMOUS) -> Session:
        """The caller's live session, renewed: every successful call counts as a heartbeat.

        Another identity's session is answered exactly like one that does not exist, so that nobody can even
        learn that a session id is live.
        """
        self._check_serving()
        session = self._sessions.get(session_id)
        if session is None or session.identity != identity:
            ended = self._ended.get(session_id)
            if session is None and ended is not None and ended[0] == identity:
                raise NotFound(f"this session is over ({ended[1]}): open a new session")
            # Never the whole id back: refusals go to the audit trail, which must not hold session tokens.
            raise NotFound(f"session {session_id[:4]!r}… is unknown to this node for identity "
                           f"{quote(identity, 200)!r}: open a session first (sessions belong to the identity "
                           f"that opened them)")
        session.expires_at = self._clock() + self.lease_seconds
        return session

    def _seal(self, seal_id: str) -> Seal:
        seal = self._seals.get(seal_id)
        if seal is None:
            raise self._unknown_seal(seal_id)
        return seal

    @staticmethod
    def _unknown_seal(seal_id: str) -> RdaxError:
        return NotFound(f"seal {quote(seal_id, 64)!r} is unknown: it was never made, every holder unsealed it, or "
                        f"it is on a path this identity may not seal; List shows the seals it can see")

    def _held_seal(self, session: Session, seal_id: str) -> Seal:
        seal = self._seal(seal_id)
        if session.id not in seal.holders:
            if not self.policy.may_see(session.identity, seal.path):
                raise self._unknown_seal(seal_id)
            raise PermissionDenied(f"session {session.handle} does not hold seal {seal_id} of {seal.path!r}: "
                                   f"Seal that path first")
        return seal

    def _join(self, seal: Seal, session: Session, length: int) -> SealInfo:
        if length > seal.length:
            raise FailedPrecondition(
                f"{seal.path!r} is already sealed ({seal.id}) with length {seal.length}, shorter than the {length} "
                f"asked for: a held seal cannot grow; seal at most {seal.length} bytes, or seal {length} once "
                f"every holder has unsealed it")
        if session.id not in seal.holders:
            self._reserve_sealed_bytes(session.identity, self._rule(session.identity), seal.length)
            self._usage[session.identity].sealed_bytes -= seal.length   # _add_holder counts it
        self._add_holder(seal, session)
        self.audit_log.event("seal", identity=session.identity, session=session.handle, seal=seal.id,
                             path=seal.path, length=seal.length, joined=True)
        self.metrics.seals.labels("joined").inc()
        return seal.info(session.id)

    def _add_holder(self, seal: Seal, session: Session) -> None:
        if session.id not in seal.holders:
            self._usage[session.identity].sealed_bytes += seal.length
        seal.holders[session.id] = None
        session.seal_ids[seal.id] = None

    def _drop_hold(self, seal: Seal, session: Session, reason: str, *, notify: bool = True) -> None:
        """Revoke the session's grants on the seal and drop its hold; the last hold lets the file go."""
        if list(seal.holders) == [session.id]:
            # Its grants go with the whole seal; the file is let go at the size a holder declared.
            self._revoke(seal, reason, EventKind.REVOKED, notify=notify, truncate_to=seal.declared_size)
        else:
            theirs = [g for g in seal.grants.values() if g.session_id == session.id]
            self._revoke_grants(seal, theirs, reason, notify=notify)
        if session.id in seal.holders:
            self._usage[session.identity].sealed_bytes -= seal.length
        seal.holders.pop(session.id, None)
        session.seal_ids.pop(seal.id, None)
        if not seal.holders:
            self._seals.pop(seal.id, None)

    def _revoke(self, seal: Seal, reason: str, kind: EventKind, *, notify: bool = True,
                truncate_to: int | None = None) -> None:
        """Revoke the seal in the safe order (revocation.py): the tables change now; its regions are deregistered and
        its file let go as this thread lets go of the lock (or, if a Grant is registering over it, once that one is
        deregistered)."""
        if seal.state != SEALED:
            return
        if self._seal_watcher is not None and seal.file is not None:
            self._seal_watcher.unwatch(seal.file.fd)
        self._seal_by_key.pop(seal.watch_key, None)
        holders = [self._sessions[h].handle for h in seal.holders if h in self._sessions]
        revoked, grants = revocation.revoke_seal(seal, reason, kind, self._sessions, self._unix_ms(), notify=notify,
                                                 truncate_to=truncate_to)
        self._letting_go[seal.path] = revoked
        self.metrics.revocations.labels(_cause(reason)).inc()
        if self._live_seal_by_path.get(seal.path) is seal:
            del self._live_seal_by_path[seal.path]
        self.audit_log.event("revoke", seal=seal.id, path=seal.path, epoch=seal.epoch, reason=reason, holders=holders)
        self._take_back(seal, grants)
        self._settle(seal, [])   # no region at all over it: let it go now

    def _revoke_grants(self, seal: Seal, grants: list[Grant], reason: str, *, notify: bool = True) -> None:
        """Revoke some grants of a live seal: out of the tables now, deregistered as the lock is let go, then their
        holders told."""
        notices = revocation.revoke_grants(seal, grants, reason, self._sessions, self._unix_ms(), notify=notify)
        self._take_back(seal, grants, notices)

    def _take_back(self, seal: Seal, grants: list[Grant], notices: revocation.Notices | None = None) -> None:
        """Grants taken out of the tables (under the lock): deregister their regions just after the lock, then publish
        `notices`. Until then they count in the seal's `unsettled` and in their sessions' PDs."""
        if not grants:
            return
        owners = [g.session_id for g in grants]
        seal.unsettled += len(owners)
        self._pd_users.update(owners)

        def deregister() -> None:
            try:
                revocation.deregister(grants)
                with self._lock:
                    self._settle(seal, owners)
            finally:
                revocation.publish(notices or [])   # promised: the holders' streams end only after these
        self._lock.after(deregister)

    def _unsettle(self, seal: Seal, session_id: str) -> None:
        """One more region over the seal's mapping outside the tables (registering, or awaiting deregistration)."""
        seal.unsettled += 1
        self._pd_users[session_id] += 1

    def _settle(self, seal: Seal, session_ids: list[str]) -> None:
        """Regions outside the tables are deregistered or in the tables now, one per session id in `session_ids`.
        Whoever settles the last region over a revoked seal lets its file go, and the last of an ended session's
        PD closes its channel: no thread ever waits for another's queued work."""
        seal.unsettled -= len(session_ids)
        for session_id, count in collections.Counter(session_ids).items():
            self._pd_users[session_id] -= count
            if self._pd_users[session_id]:
                continue
            del self._pd_users[session_id]
            ended = self._closing.pop(session_id, None)
            if ended is not None:
                self._closer.close_later(ended.channel, f"session {ended.handle}")
        revoked = self._letting_go.get(seal.path)
        if seal.unsettled or revoked is None or revoked.seal is not seal or revoked.letting_go:
            return
        revoked.letting_go = True
        self._lock.after(lambda: self._let_go(revoked))

    def _let_go(self, revoked: revocation.Revocation) -> None:
        """Steps 3 and 4 of a revocation, outside the lock: no region over the seal's mapping is left."""
        try:
            revocation.let_go(revoked)
        finally:
            self.metrics.revocation_seconds.observe(time.monotonic() - revoked.started)
            with self._lock:
                if self._letting_go.get(revoked.seal.path) is revoked:
                    del self._letting_go[revoked.seal.path]
                self._quiet.notify_all()

    def _end_session(self, session: Session, kind: EventKind | None, reason: str) -> None:
        """Revoke the session's grants, drop its holds, end its Watch streams, and queue its QP and PD for teardown."""
        grant_ids = tuple(session.grants)
        for seal_id in list(session.seal_ids):
            self._drop_hold(self._seals[seal_id], session, reason, notify=False)
        last = None if kind is None else Event(kind, "", grant_ids, reason, 0, self._unix_ms())

        def end_events() -> None:
            # After the lock. The revocations' notices promised above (and any still being let go, decided earlier)
            # come first, then this, then the end: the stream waits for them.
            session.events.end(last)
        self._lock.after(end_events)
        del self._sessions[session.id]
        mine = self._by_identity.get(session.identity, {})
        mine.pop(session.id, None)
        if not mine:
            self._by_identity.pop(session.identity, None)
        self._usage[session.identity].sessions -= 1
        self._ended[session.id] = (session.identity, reason)
        while len(self._ended) > _ENDED_SESSIONS_KEPT:
            self._ended.popitem(last=False)
        # The PD goes once no region of it is left: its grants are deregistered as the lock is let go, and a Grant
        # registering in it now deregisters its region when it finds the session ended (_settle closes it then).
        if self._pd_users[session.id]:
            self._closing[session.id] = session
        else:
            self._closer.close_later(session.channel, f"session {session.handle}")
        log.info("session %s of %s (client %r) ended: %s", session.handle, session.identity,
                 quote(session.client_id, 64), reason)
        self.audit_log.event("session_closed", identity=session.identity, session=session.handle, reason=reason)

    def _new_grant(self, seal: Seal, session: Session, offset: int, length: int, access: int, remote_addr: int,
                   region: Region) -> Grant:
        ttl = self.grant_ttl_seconds
        expires_at = None if ttl is None else self._clock() + ttl
        expires_unix_ms = 0 if ttl is None else int((self._wall_clock() + ttl) * 1000)
        return Grant(_new_id("grant"), seal.id, session.id, offset, length, access, seal.epoch, remote_addr,
                     region, region.rkey, expires_at, expires_unix_ms)

    def _unix_ms(self) -> int:
        return int(self._wall_clock() * 1000)

    def _reap_forever(self) -> None:
        interval = min(1.0, self.lease_seconds / 4)
        while not self._stop.wait(interval):
            try:
                self.reap()
            except Exception:
                log.exception("reaping expired sessions and grants failed")

    def _audit_forever(self) -> None:
        while not self._stop.is_set():
            self._audit_now.wait(self.audit_seconds)
            self._audit_now.clear()
            if self._stop.is_set():
                return
            try:
                self.audit()
            except Exception:
                log.exception("the FIEMAP audit failed")


_CAUSES = ("lease break", "seal broken", "extents changed", "block map", "unseal", "session", "policy changed",
           "the node is shutting down", "grant expired")


def _cause(reason: str) -> str:
    """A bounded label for a revocation reason (reasons carry pids and paths)."""
    for cause in _CAUSES:
        if reason.startswith(cause):
            return cause
    return "other"


def _new_id(kind: str) -> str:
    """A short public name (seals, grants, session handles): not a credential, every call also proves its identity."""
    return f"{kind}-{secrets.token_hex(8)}"
