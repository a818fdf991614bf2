"""The storage node's core: sessions, seals, grants and their revocation behind one lock, with no gRPC in sight."""
# Where to look: making a file a seal is seals.py, checking a grant request
# grants.py, the revocation order and lease-break watching revocation.py,
# sessions, their events and QP teardown sessions.py. This module keeps the
# tables and the rules that join them: who may do what, and what goes when.
from __future__ import annotations

import collections
import logging
import os
import threading
import time
import uuid
from typing import Callable, Iterator, Sequence

from . import revocation
from .fanotify import SealWatcher, describe
from .fiemap import check_stable, summary
from .prepare import block_map, check_length
from .errors import FailedPrecondition, NotFound, PermissionDenied, RdaxError, ResourceExhausted, Unavailable
from .fabric_api import Endpoint, Fabric, Region
from .grants import Grant, GrantDescriptor, access_label, check_access, check_range
from .seals import SEALED, Seal, SealInfo, canonical_path, check_commit_range, open_sealed_file
from .sessions import ChannelCloser, Event, EventKind, Session, check_client

log = logging.getLogger("rdax.service")

LEASE_BREAK_REASON = "lease break: another process opened or truncated the file"
_ENDED_SESSIONS_KEPT = 1024   # how many ended session ids are remembered, for helpful NOT_FOUND messages


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
                 write_alignment: int = 1,
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
        self._root_fd = os.open(export_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._lock = threading.RLock()
        self._sealing = threading.Lock()   # one Seal at a time opens files, so a path is never opened twice
        self._sessions: dict[str, Session] = {}
        self._seals: dict[str, Seal] = {}
        self._live_seal_by_path: dict[str, Seal] = {}   # SEALED ones only: a revoked path can be sealed anew
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()
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
        self._next_audit = clock() + audit_seconds
        self._reaper = threading.Thread(target=self._reap_forever, name="rdax-reaper", daemon=True)
        self._reaper.start()

    # -- sessions -------------------------------------------------------------
    def open_session(self, client_id: str, endpoint: Endpoint | None) -> OpenedSession:
        check_client(client_id, endpoint)
        assert endpoint is not None
        with self._lock:
            self._check_serving()
        channel = self._fabric.open_channel(endpoint)
        session = Session(_new_id("sess"), client_id, channel, self._clock() + self.lease_seconds)
        with self._lock:
            if self._draining:
                self._closer.close_later(channel, f"session {session.id}")
                raise Unavailable("the node is shutting down: open a session on another node or retry later")
            self._sessions[session.id] = session
        log.info("session %s opened for client %r (node qpn %d, client qpn %d)",
                 session.id, client_id, channel.endpoint.qpn, endpoint.qpn)
        return OpenedSession(session.id, channel.endpoint, self.lease_seconds)

    def heartbeat(self, session_id: str) -> int:
        with self._lock:
            self._session(session_id)   # renews it
            return self.lease_seconds

    def close_session(self, session_id: str) -> None:
        with self._lock:
            self._end_session(self._session(session_id), None, "session closed")

    def watch(self, session_id: str, keep_going: Callable[[], bool] = lambda: True,
              poll_seconds: float = 0.5) -> Iterator[Event]:
        """The session's events as they come (and any that came while nobody watched); ends with the session."""
        with self._lock:
            session = self._session(session_id)
            return session.events.follow(keep_going, poll_seconds)

    # -- seals ----------------------------------------------------------------
    def seal(self, session_id: str, path: str, length: int, create: bool = False) -> SealInfo:
        """Seal [0, length) of `path`, or join the seal another session holds on it."""
        relpath = canonical_path(path)
        check_length(length)   # before anything is opened
        with self._sealing:
            with self._lock:
                session = self._session(session_id)
                existing = self._live_seal_by_path.get(relpath)
                if existing is not None:
                    return self._join(existing, session, length)
            # Slow (preallocation, zero-filling, fsync), so outside the node's lock;
            # _sealing keeps another Seal of the same path from opening it meanwhile.
            sealed_file = open_sealed_file(self._root_fd, relpath, length, create=create, map_sync=self._map_sync)
            with self._lock:
                try:
                    session = self._session(session_id)   # it may have expired meanwhile
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
                log.info("sealed %r (%d bytes, %d extents) as %s for session %s",
                         relpath, length, prepared.extent_count, seal.id, session.id)
                return seal.info()

    def unseal(self, session_id: str, seal_id: str) -> int:
        """Drop the session's hold (and its grants); the last holder's unseal lets the file go. Returns the epoch."""
        with self._lock:
            session = self._session(session_id)
            seal = self._held_seal(session, seal_id)
            self._drop_hold(seal, session, "unseal")
            return seal.epoch

    def stat(self, session_id: str, seal_id: str) -> SealInfo:
        with self._lock:
            self._session(session_id)
            return self._seal(seal_id).info()

    def list_seals(self, session_id: str) -> list[SealInfo]:
        with self._lock:
            self._session(session_id)
            return [seal.info() for seal in self._seals.values()]

    def commit(self, session_id: str, seal_id: str, ranges: Sequence[tuple[int, int]]) -> int:
        """msync(MS_SYNC) each (offset, length) range of the seal, or all of it for none; returns the bytes made durable."""
        with self._lock:
            session = self._session(session_id)
            seal = self._held_seal(session, seal_id)
            if seal.state != SEALED:
                raise FailedPrecondition(seal.revoked_message())
            ranges = list(ranges) or [(0, seal.length)]
            for offset, length in ranges:
                check_commit_range(offset, length, seal.length)
            for offset, length in ranges:
                seal.mapping.sync(offset, length)
            return sum(length for _, length in ranges)

    # -- grants ---------------------------------------------------------------
    def grant(self, session_id: str, seal_id: str, offset: int, length: int, access: int) -> GrantDescriptor:
        """One memory region over exactly [offset, offset+length) of the seal, with exactly `access`, in the session's PD."""
        with self._lock:
            session = self._session(session_id)
            seal = self._held_seal(session, seal_id)
            if seal.file is not None and not seal.file.lease_intact():
                # A break the watcher has not handled yet: no new grant on a file someone else is opening.
                self._revoke(seal, LEASE_BREAK_REASON, EventKind.REVOKED)
            if seal.state != SEALED or not seal.accepting_grants:
                raise FailedPrecondition(seal.revoked_message())
            check_access(access)
            check_range(offset, length, seal.length)
            if len(session.grants) >= self.max_grants_per_session:
                raise ResourceExhausted(
                    f"session {session.id} already holds {len(session.grants)} grants, this node's limit per "
                    f"session: release grants it no longer needs before asking for more")
            # Under the lock, so that a revocation cannot unmap the range between here and the table.
            remote_addr = seal.mapping.addr + offset
            region = session.channel.register(remote_addr, length, access)
            try:
                grant = self._new_grant(seal, session, offset, length, access, remote_addr, region)
            except BaseException:
                region.close()
                raise
            seal.grants[grant.id] = grant
            session.grants[grant.id] = grant
            log.info("granted %s [%d, %d) of %s to session %s as %s (rkey %#x)", access_label(access), offset,
                     offset + length, seal.id, session.id, grant.id, grant.rkey)
            return grant.descriptor(self.write_alignment)

    def release(self, session_id: str, grant_id: str) -> None:
        """Give a grant back: its region is deregistered (no epoch bump: nothing was taken from anyone)."""
        with self._lock:
            session = self._session(session_id)
            grant = session.grants.get(grant_id)
            if grant is None:
                raise self._unknown_grant(grant_id)
            revocation.take_back(self._seals[grant.seal_id], [grant], self._sessions)

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
            return [seal.id for seal in broken]

    def _on_seal_event(self, key: bytes, mask: int, pid: int) -> None:
        """fanotify saw another process touch a sealed file (or lost events: key b'')."""
        if not key:
            self.audit()
            return
        with self._lock:
            seal = self._seal_by_key.get(key)
            if seal is not None:
                self._revoke(seal, f"seal broken: file {describe(mask)} by pid {pid}", EventKind.REVOKED)

    def audit(self) -> list[str]:
        """Re-read every live seal's block map (FIEMAP); revoke those that moved or stopped being stable."""
        with self._lock:
            moved = []
            for seal in list(self._live_seal_by_path.values()):
                if seal.file is None:
                    continue
                try:
                    extents = block_map(seal.file.fd, seal.length)
                    check_stable(extents, seal.length)
                    changed = summary(extents)[1] != seal.fingerprint
                    why = "extents changed (FIEMAP audit)" if changed else ""
                except (OSError, RdaxError) as exc:
                    why = f"block map no longer stable (FIEMAP audit): {exc}"
                if why:
                    self._revoke(seal, why, EventKind.REVOKED)
                    moved.append(seal.id)
            return moved

    def reap(self) -> None:
        """End sessions not renewed within the lease and revoke grants past their time to live."""
        now = self._clock()
        with self._lock:
            for session in [s for s in self._sessions.values() if s.expires_at <= now]:
                self._end_session(session, EventKind.SESSION_EXPIRED,
                                  f"session expired: no heartbeat within {self.lease_seconds} s")
            for seal in list(self._live_seal_by_path.values()):
                expired = [g for g in seal.grants.values() if g.expires_at is not None and g.expires_at <= now]
                revocation.revoke_grants(seal, expired, f"grant expired after {self.grant_ttl_seconds} s",
                                         self._sessions, self._unix_ms())

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
        # A Seal in progress holds _sealing while it opens and leases a file; once
        # it is through (and has let the file go: we are draining), no lease is left.
        with self._sealing:
            os.close(self._root_fd)
        self._stop.set()
        self._reaper.join()
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

    def _session(self, session_id: str) -> Session:
        """The live session, renewed: every successful call counts as a heartbeat."""
        self._check_serving()
        session = self._sessions.get(session_id)
        if session is None:
            why = self._ended.get(session_id)
            if why is not None:
                raise NotFound(f"session {session_id!r} is over ({why}): open a new session")
            raise NotFound(f"session {session_id!r} is unknown to this node: open a session first")
        session.expires_at = self._clock() + self.lease_seconds
        return session

    def _seal(self, seal_id: str) -> Seal:
        seal = self._seals.get(seal_id)
        if seal is None:
            raise NotFound(f"seal {seal_id!r} is unknown: it was never made or every holder unsealed it; List shows "
                           f"this node's seals")
        return seal

    def _held_seal(self, session: Session, seal_id: str) -> Seal:
        seal = self._seal(seal_id)
        if session.id not in seal.holders:
            raise PermissionDenied(f"session {session.id} does not hold seal {seal_id} of {seal.path!r}: "
                                   f"Seal that path first")
        return seal

    def _unknown_grant(self, grant_id: str) -> RdaxError:
        for other in self._sessions.values():
            if grant_id in other.grants:
                return PermissionDenied(f"grant {grant_id} belongs to another session: only its owner can release it")
        return NotFound(f"grant {grant_id!r} is unknown: it was released, revoked or expired, or never existed")

    def _join(self, seal: Seal, session: Session, length: int) -> SealInfo:
        if length > seal.length:
            raise FailedPrecondition(
                f"{seal.path!r} is already sealed ({seal.id}) with length {seal.length}, shorter than the {length} "
                f"asked for: a held seal cannot grow; seal at most {seal.length} bytes, or seal {length} once "
                f"every holder has unsealed it")
        self._add_holder(seal, session)
        return seal.info()

    def _add_holder(self, seal: Seal, session: Session) -> None:
        seal.holders[session.id] = None
        session.seal_ids[seal.id] = None

    def _drop_hold(self, seal: Seal, session: Session, reason: str, *, notify: bool = True) -> None:
        """Revoke the session's grants on the seal and drop its hold; the last hold lets the file go."""
        if list(seal.holders) == [session.id]:
            self._revoke(seal, reason, EventKind.REVOKED, notify=notify)   # its grants go with the whole seal
        else:
            theirs = [g for g in seal.grants.values() if g.session_id == session.id]
            revocation.revoke_grants(seal, theirs, reason, self._sessions, self._unix_ms(), notify=notify)
        seal.holders.pop(session.id, None)
        session.seal_ids.pop(seal.id, None)
        if not seal.holders:
            self._seals.pop(seal.id, None)

    def _revoke(self, seal: Seal, reason: str, kind: EventKind, *, notify: bool = True) -> None:
        if seal.state != SEALED:
            return
        if self._seal_watcher is not None and seal.file is not None:
            self._seal_watcher.unwatch(seal.file.fd)
        self._seal_by_key.pop(seal.watch_key, None)
        revocation.revoke_seal(seal, reason, kind, self._sessions, self._unix_ms(), notify=notify)
        if self._live_seal_by_path.get(seal.path) is seal:
            del self._live_seal_by_path[seal.path]

    def _end_session(self, session: Session, kind: EventKind | None, reason: str) -> None:
        """Revoke the session's grants, drop its holds, end its Watch streams, and queue its QP and PD for teardown."""
        grant_ids = tuple(session.grants)
        for seal_id in list(session.seal_ids):
            self._drop_hold(self._seals[seal_id], session, reason, notify=False)
        if kind is not None:
            session.events.publish(Event(kind, "", grant_ids, reason, 0, self._unix_ms()))
        session.events.end()
        del self._sessions[session.id]
        self._ended[session.id] = reason
        while len(self._ended) > _ENDED_SESSIONS_KEPT:
            self._ended.popitem(last=False)
        self._closer.close_later(session.channel, f"session {session.id}")
        log.info("session %s of client %r ended: %s", session.id, session.client_id, reason)

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
                if self._clock() >= self._next_audit:
                    self._next_audit = self._clock() + self.audit_seconds
                    self.audit()
            except Exception:
                log.exception("reaping expired sessions and grants failed")


def _new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:16]}"
