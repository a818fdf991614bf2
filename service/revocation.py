"""Revocation: taking grants back in the order that keeps clients out, and turning lease breaks (SIGIO) into revocations.

A seal's revocation is decided under the node's lock and carried out after it, so that no other call waits for
its slow steps (deregistering N regions, unmapping, closing). The order is what makes it safe:

1. under the node's lock (revoke_seal): no new grants on the seal; its grants leave the tables; the record says
   REVOKED at epoch + 1, so descriptors from before are recognisably stale;
2. just after the lock, on the same thread (deregister): every region that left the tables is deregistered, and
   so is any region a Grant was registering meanwhile (it finds the seal revoked when it comes back for the
   lock, and deregisters its own). From here a remote access through any of the seal's rkeys fails
   (IBV_WC_REM_ACCESS_ERR): no packet lands (a write in flight may have landed in part, inside its range: README,
   "When a seal breaks");
3. only once the last of those regions is deregistered (Seal.unsettled is 0), whoever deregistered it lets the
   file go (let_go): unmap, set a declared size, release the lease, close. Only now may the breaker touch the
   file: no client can reach it;
4. every holder is told (Watch).
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from typing import Callable, Iterable, Mapping

from .fabric_api import Region
from .grants import Grant
from .seals import REVOKED, Seal
from .sessions import Event, EventKind, Session

log = logging.getLogger("rdax.service")

Notices = list[tuple[Session, Event]]   # events to publish once the regions they announce are deregistered


@dataclasses.dataclass(eq=False)
class Revocation:
    """A seal revoked under the node's lock whose file is still to be let go (step 3), and whom to tell (step 4)."""

    seal: Seal
    reason: str
    grants: int
    truncate_to: int | None
    notices: Notices
    started: float = dataclasses.field(default_factory=time.monotonic)
    letting_go: bool = False   # step 3 is queued: once only


def revoke_seal(seal: Seal, reason: str, kind: EventKind, sessions: Mapping[str, Session], unix_ms: int,
                *, notify: bool = True, truncate_to: int | None = None) -> tuple[Revocation, list[Grant]]:
    """Step 1 of revoking `seal` (the caller holds the node's lock): the grants it took out of the tables, whose
    regions the caller deregisters as soon as it lets go of the lock (step 2), and the Revocation whose file is let go
    after them (let_go). The record stays (REVOKED) until every holder unseals it."""
    seal.accepting_grants = False                  # no new grants; a registration in flight stays out of the tables
    grants = list(seal.grants.values())
    take_out(seal, grants, sessions)
    seal.epoch += 1                                # descriptors from before are recognisably stale
    seal.state = REVOKED
    seal.revoked_reason = reason
    notices = _notices(seal, seal.holders, grants, reason, kind, sessions, unix_ms) if notify else []
    return Revocation(seal, reason, len(grants), truncate_to, notices), grants


def revoke_grants(seal: Seal, grants: list[Grant], reason: str, sessions: Mapping[str, Session], unix_ms: int,
                  *, notify: bool = True) -> Notices:
    """Revoke some grants of a seal that stays (a holder unsealed, a grant expired): out of the tables, epoch bumped
    (the caller holds the node's lock); the caller deregisters their regions, then publishes the notices."""
    if not grants:
        return []
    take_out(seal, grants, sessions)
    seal.epoch += 1
    if not notify:
        return []
    return _notices(seal, dict.fromkeys(g.session_id for g in grants), grants, reason, EventKind.REVOKED, sessions,
                    unix_ms)


def take_out(seal: Seal, grants: Iterable[Grant], sessions: Mapping[str, Session]) -> None:
    """Forget each grant, in the seal and in its session; its region stays registered until deregister()."""
    for grant in grants:
        seal.grants.pop(grant.id, None)
        owner = sessions.get(grant.session_id)
        if owner is not None:
            owner.grants.pop(grant.id, None)


def deregister(grants: Iterable[Grant]) -> None:
    """Deregister each grant's region (step 2), outside the node's lock."""
    for grant in grants:
        close_region(grant.region, f"grant {grant.id} (rkey {grant.rkey:#x})")


def close_region(region: Region, what: str) -> None:
    # A failure is logged and the others still go: one region left registered
    # must not keep the rest of a revocation from happening.
    try:
        region.close()
    except Exception:
        log.exception("deregistering the region of %s failed", what)


def let_go(revocation: Revocation) -> None:
    """Steps 3 and 4, once no region over the seal's mapping is left (the caller holds no lock)."""
    seal = revocation.seal
    try:
        seal.close_file(revocation.truncate_to)   # unmap, set a declared size, release the lease, close
    finally:
        publish(revocation.notices)   # promised: the holders' streams end only after these
    log.info("revoked seal %s of %r at epoch %d (%d grants): %s", seal.id, seal.path, seal.epoch, revocation.grants,
             revocation.reason)


def publish(notices: Notices) -> None:
    for session, event in notices:
        session.events.publish(event, promised=True)


def _notices(seal: Seal, session_ids: Iterable[str], grants: list[Grant], reason: str, kind: EventKind,
             sessions: Mapping[str, Session], unix_ms: int) -> Notices:
    by_session: dict[str, list[str]] = {}   # one pass over the grants, under the node's lock
    for grant in grants:
        by_session.setdefault(grant.session_id, []).append(grant.id)
    out = []
    for session_id in session_ids:
        session = sessions.get(session_id)
        if session is None:
            continue
        # Now, under the lock: an access error from here on is a client that has not heard yet, not an attack.
        session.last_revoked_unix_ms = unix_ms
        session.events.promise()   # published once the regions are gone; the session's end waits for it
        out.append((session, Event(kind, seal.id, tuple(by_session.get(session_id, ())), reason, seal.epoch,
                                   unix_ms)))
    return out


# -- lease breaks --------------------------------------------------------------
# Another process opening or truncating a leased file makes the kernel send
# SIGIO, whose default action kills the process (a helper measured exit code
# 157). So SIGIO is blocked in every thread and taken with sigtimedwait by a
# thread of its own. Python's siginfo has no si_fd: the watcher cannot tell
# which file it was and checks every seal's lease (F_GETLEASE) instead.

_guard_lock = threading.Lock()
_guard_users = 0
_previous_handler: Callable[..., object] | int | None = None
_watcher_threads: set[int] = set()


def install_sigio_guard() -> None:
    """Block SIGIO in the calling thread, and so in every thread it starts afterwards; call it before any lease is taken.

    From the main thread it also installs a handler, for threads started
    before the guard: a SIGIO delivered to one of them is forwarded to the
    watchers instead of killing the process. Call it first thing in main().
    """
    global _guard_users, _previous_handler
    with _guard_lock:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGIO})
        if _guard_users == 0 and threading.current_thread() is threading.main_thread():
            _previous_handler = signal.signal(signal.SIGIO, _forward_to_watchers)
        _guard_users += 1


def remove_sigio_guard() -> None:
    """Undo one install_sigio_guard(); the last one restores the main thread's SIGIO handling (no lease may be held)."""
    global _guard_users, _previous_handler
    with _guard_lock:
        _guard_users = max(0, _guard_users - 1)
        if _guard_users or threading.current_thread() is not threading.main_thread():
            return
        # Unblock while our handler is still in place: a SIGIO still pending must not meet SIG_DFL.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGIO})
        if _previous_handler is not None:
            signal.signal(signal.SIGIO, _previous_handler)
            _previous_handler = None


def _forward_to_watchers(signum: int, frame: object) -> None:
    for ident in list(_watcher_threads):
        try:
            signal.pthread_kill(ident, signal.SIGIO)
        except (ProcessLookupError, OSError):
            pass


class LeaseBreakWatcher:
    """A thread that waits for SIGIO and then calls `check` — also every `poll_seconds`, in case a signal went astray."""

    def __init__(self, check: Callable[[], object], poll_seconds: float = 1.0) -> None:
        self._check = check
        self._poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rdax-lease-breaks", daemon=True)

    def start(self) -> None:
        """Start the thread; the caller must block SIGIO already (install_sigio_guard) so that the thread inherits that."""
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None and self._thread.is_alive():
            try:
                signal.pthread_kill(self._thread.ident, signal.SIGIO)  # wake it from sigtimedwait
            except (ProcessLookupError, OSError):
                pass
            self._thread.join()

    def _run(self) -> None:
        ident = threading.get_ident()
        _watcher_threads.add(ident)
        try:
            while not self._stop.is_set():
                signal.sigtimedwait({signal.SIGIO}, self._poll_seconds)
                if self._stop.is_set():
                    return
                try:
                    self._check()
                except Exception:
                    log.exception("checking the seals' leases failed")
        finally:
            _watcher_threads.discard(ident)
