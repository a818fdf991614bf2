"""Sessions: a client's channel (PD + QP), its lease, its grants and held seals, its event stream, and channel teardown."""
from __future__ import annotations

import asyncio
import collections
import enum
import ipaddress
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .audit import quote
from .errors import FailedPrecondition, InvalidArgument
from .fabric_api import REQUIRED_MTU, Channel, Endpoint
from .grants import Grant

log = logging.getLogger("rdax.service")

MAX_CLIENT_ID = 256
_END = object()  # what a watcher's inbox receives when the session is over


def check_client(client_id: str, endpoint: Endpoint | None) -> None:
    if len(client_id) > MAX_CLIENT_ID:
        raise InvalidArgument(f"client_id is {len(client_id)} characters long: keep it to {MAX_CLIENT_ID}")
    if endpoint is None:
        raise InvalidArgument("endpoint is missing: send the client QP's qpn, gid, psn and mtu")
    if not 0 < endpoint.qpn < 1 << 24:
        raise InvalidArgument(f"endpoint.qpn {endpoint.qpn} is not a QP number (1 .. 2^24-1)")
    if not 0 <= endpoint.psn < 1 << 24:
        raise InvalidArgument(f"endpoint.psn {endpoint.psn} does not fit in 24 bits")
    canonical_gid(endpoint.gid)
    if not 256 <= endpoint.mtu <= 4096 or endpoint.mtu & (endpoint.mtu - 1):
        raise InvalidArgument(f"endpoint.mtu {endpoint.mtu} is not an RDMA path MTU (256, 512, 1024, 2048 or 4096): "
                              f"send mtu={REQUIRED_MTU}")
    if endpoint.mtu != REQUIRED_MTU:
        raise FailedPrecondition(
            f"endpoint.mtu is {endpoint.mtu}, but rdax needs path MTU {REQUIRED_MTU}: rxe silently loses data "
            f"written through ODP memory regions below it (only the first MTU bytes of each 4 KiB page land while "
            f"the write reports success); give the client's netdev an MTU that allows RoCE MTU 4096 (e.g. 9000) "
            f"and connect with mtu=4096")


def canonical_gid(gid: str) -> str:
    """Any valid IPv6 text form of a GID (compressed, IPv4-mapped, expanded) as the fully expanded form verbs takes."""
    try:
        packed = ipaddress.IPv6Address(gid[:64]).packed
    except ValueError:
        raise InvalidArgument(
            f"endpoint.gid {quote(gid, 64)!r} is not a GID in IPv6 notation: send any IPv6 text form, e.g. "
            f"::ffff:10.77.0.2 (RoCE v2 over IPv4, IPv4-mapped), fe80::1 or "
            f"0000:0000:0000:0000:0000:ffff:0a4d:0002") from None
    # Eight groups of four hex digits, which is what pyverbs' GID() parses. Not IPv6Address.exploded: Python
    # 3.13 writes an IPv4-mapped address as ...:ffff:10.77.0.2 there, which pyverbs refuses.
    return ":".join(packed[i:i + 2].hex() for i in range(0, 16, 2))


class EventKind(enum.IntEnum):
    """The values of rdax.v1.Event.Kind."""

    REVOKED = 1
    SESSION_EXPIRED = 2
    SHUTDOWN = 3
    SESSION_ENDED = 4   # the node ended the session: its QP failed, its certificate expired, policy
    EXTENDED = 5        # the seal grew: Event.length is its new length


@dataclass(frozen=True)
class Event:
    """A recall: these grants are gone because of `reason`; the seal is at `epoch` now (rdax.v1.Event)."""

    kind: EventKind
    seal_id: str
    grant_ids: tuple[str, ...]
    reason: str
    epoch: int
    unix_ms: int
    length: int = 0   # EXTENDED: the new length


class EventStream:
    """One session's events, fanned out to its Watch streams and kept in a backlog while nobody watches.

    A revocation decides its notices under the node's lock but publishes them only once its regions are
    deregistered and its file let go; the session may end meanwhile (its QP failed on the revoked rkey, the reaper
    noticed). So a notice is promised when it is decided, and the end waits for every promised notice: a client
    always learns which grant went and why before it learns that its session is over."""

    BACKLOG = 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inboxes: list[queue.SimpleQueue[object]] = []
        self._async_inboxes: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[object]]] = []
        self._backlog: collections.deque[Event] = collections.deque(maxlen=self.BACKLOG)
        self._promised = 0            # notices decided and not yet published
        self._ending = False          # end() was called: it happens once nothing promised is left
        self._final: Event | None = None
        self._ended = False

    def promise(self) -> None:
        """A notice for this stream is decided: it will be published (publish(..., promised=True)) before the end."""
        with self._lock:
            self._promised += 1

    def publish(self, event: Event, *, promised: bool = False) -> None:
        with self._lock:
            if promised:
                self._promised -= 1
            if self._ended:
                return
            self._deliver(event)
            if self._ending and not self._promised:
                self._finish()

    def end(self, final: Event | None = None) -> None:
        """No more events after `final` (if any): now, or once every promised notice is published."""
        with self._lock:
            if self._ended or self._ending:
                return
            self._ending, self._final = True, final
            if not self._promised:
                self._finish()

    def _deliver(self, item: object) -> None:
        if isinstance(item, Event) and not self._inboxes and not self._async_inboxes:
            # Nobody is watching: keep it, or a client that reconnects its Watch misses its recall.
            self._backlog.append(item)
        for inbox in self._inboxes:
            inbox.put(item)
        for loop, queue_ in self._async_inboxes:
            _put_threadsafe(loop, queue_, item)

    def _finish(self) -> None:
        if self._final is not None:
            self._deliver(self._final)
        self._ended = True
        self._deliver(_END)

    def subscribe_async(self, loop: asyncio.AbstractEventLoop) -> "AsyncFollower":
        """Subscribe an asyncio consumer (a Watch stream that holds no thread while it waits)."""
        inbox: asyncio.Queue[object] = asyncio.Queue()
        with self._lock:
            while self._backlog:
                inbox.put_nowait(self._backlog.popleft())
            if self._ended:
                inbox.put_nowait(_END)
            self._async_inboxes.append((loop, inbox))
        return AsyncFollower(self, loop, inbox)

    def _unsubscribe_async(self, inbox: "asyncio.Queue[object]") -> None:
        with self._lock:
            self._async_inboxes = [(lp, q) for lp, q in self._async_inboxes if q is not inbox]

    def follow(self, keep_going: Callable[[], bool], poll_seconds: float) -> Iterator[Event]:
        """Subscribe now; the iterator yields events until the session ends or keep_going() turns False."""
        inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        with self._lock:
            while self._backlog:
                inbox.put(self._backlog.popleft())
            if self._ended:
                inbox.put(_END)
            self._inboxes.append(inbox)
        return self._drain(inbox, keep_going, poll_seconds)

    def _drain(self, inbox: queue.SimpleQueue[object], keep_going: Callable[[], bool],
               poll_seconds: float) -> Iterator[Event]:
        try:
            while keep_going():
                try:
                    item = inbox.get(timeout=poll_seconds)
                except queue.Empty:
                    continue  # look at keep_going() again: the client may have gone
                if item is _END:
                    return
                assert isinstance(item, Event)
                yield item
        finally:
            with self._lock:
                self._inboxes.remove(inbox)


def _put_threadsafe(loop: asyncio.AbstractEventLoop, inbox: "asyncio.Queue[object]", item: object) -> None:
    try:
        loop.call_soon_threadsafe(inbox.put_nowait, item)
    except RuntimeError:
        pass   # the loop is closed: the node is stopping, nobody reads this inbox any more


class AsyncFollower:
    """One asyncio subscriber of an EventStream: `async for event in follower`, close() to leave."""

    def __init__(self, stream: EventStream, loop: asyncio.AbstractEventLoop, inbox: "asyncio.Queue[object]") -> None:
        self._stream, self._loop, self._inbox = stream, loop, inbox

    def __aiter__(self) -> "AsyncFollower":
        return self

    async def __anext__(self) -> Event:
        item = await self._inbox.get()
        if item is _END:
            raise StopAsyncIteration
        assert isinstance(item, Event)
        return item

    def close(self) -> None:
        self._stream._unsubscribe_async(self._inbox)


@dataclass(eq=False)
class Session:
    """A client's connection to the node: valid while renewed within the lease."""

    id: str                              # secret: whoever knows it can act for the session (only its owner does)
    client_id: str                       # free-form label from the client, for logs
    channel: Channel
    expires_at: float                    # on the node's monotonic clock
    identity: str = "anonymous"          # who opened it (from its TLS certificate): only it may use the session
    handle: str = ""                     # short, not secret: names the session in logs, audit and replies
    cert_not_after: float | None = None  # unix seconds: the session ends when the client's certificate does
    last_revoked_unix_ms: int = 0        # an access error soon after a revocation is a late client, not an attack
    grants: dict[str, Grant] = field(default_factory=dict)
    seal_ids: dict[str, None] = field(default_factory=dict)   # seals held, in the order sealed
    events: EventStream = field(default_factory=EventStream)


class ChannelCloser:
    """Destroys channels (QP, CQ, PD) on a thread of its own.

    rxe can take ~50 s to destroy a QP whose peer hit access errors
    (LAB-NOTES.md): no request, reaper pass or revocation may wait for that.
    """

    SLOW_SECONDS = 1.0

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Channel, str] | threading.Event | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="rdax-channel-closer", daemon=True)
        self._thread.start()

    def close_later(self, channel: Channel, label: str) -> None:
        self._queue.put((channel, label))

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every channel queued so far is destroyed; False on timeout."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def stop(self, timeout: float) -> bool:
        """Destroy what is queued, then end the thread; False if that took longer than `timeout`."""
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            self._close(*item)

    def _close(self, channel: Channel, label: str) -> None:
        started = time.monotonic()
        try:
            channel.close()
        except Exception:
            log.exception("destroying the QP and PD of %s failed", label)
            return
        took = time.monotonic() - started
        if took > self.SLOW_SECONDS:
            log.warning("destroying the QP and PD of %s took %.1f s", label, took)
