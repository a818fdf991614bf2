"""Revocation: taking grants back in the order that keeps clients out, and turning lease breaks (SIGIO) into revocations."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Callable, Iterable, Mapping

from .grants import Grant
from .seals import REVOKED, Seal
from .sessions import Event, EventKind, Session

log = logging.getLogger("rdax.service")


def revoke_seal(seal: Seal, reason: str, kind: EventKind, sessions: Mapping[str, Session], unix_ms: int,
                *, notify: bool = True, truncate_to: int | None = None) -> None:
    """Revoke every grant of `seal` and let its file go; the record stays (REVOKED) until every holder unseals it.

    The order is what makes it safe; the caller holds the node's lock.
    """
    seal.accepting_grants = False                  # 1. no new grants on the seal
    grants = list(seal.grants.values())
    take_back(seal, grants, sessions)              # 2. deregister every region: from here a remote access through
                                                   #    any of its rkeys fails (IBV_WC_REM_ACCESS_ERR): no packet
                                                   #    lands from here on (a write in flight may have landed in
                                                   #    part, inside its range: README, "When a seal breaks")
    seal.close_file(truncate_to)                   # 3. unmap, set a declared size, release the lease, close: only
                                                   #    now may the breaker touch the file, no client can reach it
    seal.epoch += 1                                # 4. descriptors from before are recognisably stale
    seal.state = REVOKED
    seal.revoked_reason = reason
    if notify:
        _notify(seal, seal.holders, grants, reason, kind, sessions, unix_ms)   # 5. tell every holder
    log.info("revoked seal %s of %r at epoch %d (%d grants): %s", seal.id, seal.path, seal.epoch, len(grants), reason)


def revoke_grants(seal: Seal, grants: list[Grant], reason: str, sessions: Mapping[str, Session], unix_ms: int,
                  *, notify: bool = True) -> None:
    """Revoke some grants of a seal that stays (a holder unsealed, a grant expired); bump the epoch, tell their owners."""
    if not grants:
        return
    take_back(seal, grants, sessions)
    seal.epoch += 1
    if notify:
        _notify(seal, dict.fromkeys(g.session_id for g in grants), grants, reason, EventKind.REVOKED, sessions,
                unix_ms)


def take_back(seal: Seal, grants: Iterable[Grant], sessions: Mapping[str, Session]) -> None:
    """Deregister each grant's region and forget the grant, in the seal and in its session."""
    for grant in grants:
        deregister(grant)
        seal.grants.pop(grant.id, None)
        owner = sessions.get(grant.session_id)
        if owner is not None:
            owner.grants.pop(grant.id, None)


def deregister(grant: Grant) -> None:
    # A failure is logged and the others still go: one grant left registered
    # must not keep the rest of a revocation from happening.
    try:
        grant.region.close()
    except Exception:
        log.exception("deregistering the region of grant %s (rkey %#x) failed", grant.id, grant.rkey)


def _notify(seal: Seal, session_ids: Iterable[str], grants: list[Grant], reason: str, kind: EventKind,
            sessions: Mapping[str, Session], unix_ms: int) -> None:
    for session_id in session_ids:
        session = sessions.get(session_id)
        if session is None:
            continue
        theirs = tuple(g.id for g in grants if g.session_id == session_id)
        session.last_revoked_unix_ms = unix_ms
        session.events.publish(Event(kind, seal.id, theirs, reason, seal.epoch, unix_ms))


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
