"""Node-wide and per-identity limits that keep one client from starving the rest: rates and request sizes."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_PATH_BYTES = 4096          # a path in a request
MAX_REQUEST_BYTES = 64 * 1024  # one gRPC request message
MAX_COMMIT_RANGES = 1024       # ranges in one Commit


@dataclass(frozen=True)
class Limits:
    """The node's own limits (the policy holds the per-identity quotas)."""

    max_sessions: int = 1024               # live sessions, all identities together
    open_session_rate: float = 20.0        # OpenSession calls per second, per identity (token bucket) ...
    open_session_burst: int = 40           # ... with this burst
    node_open_session_rate: float = 100.0  # and for the whole node
    node_open_session_burst: int = 200
    violations_allowed: int = 3            # remote access violations per identity within ...
    violation_window: float = 60.0         # ... this many seconds, before it is refused new sessions ...
    violation_penalty: float = 60.0        # ... for this long


class TokenBucket:
    """`rate` tokens a second up to `burst`; take() says whether one was there and, if not, when the next one comes."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._stamp = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0.0 if a token was taken, else the seconds until one will be there."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate


class ViolationLog:
    """Remote access violations per identity; an identity over the allowance is refused sessions for a while."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
        self._seen: dict[str, list[float]] = {}
        self._banned_until: dict[str, float] = {}

    def record(self, identity: str) -> bool:
        """Count one violation; True if the identity is now refused new sessions."""
        now = self._clock()
        window = [t for t in self._seen.get(identity, []) if t > now - self._limits.violation_window]
        window.append(now)
        self._seen[identity] = window[-(self._limits.violations_allowed + 1):]
        if len(window) > self._limits.violations_allowed:
            self._banned_until[identity] = now + self._limits.violation_penalty
            return True
        return False

    def refused_for(self, identity: str) -> float:
        """Seconds the identity is still refused new sessions (0 if it is not)."""
        until = self._banned_until.get(identity)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self._banned_until[identity]
            return 0.0
        return left
