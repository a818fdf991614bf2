"""The audit trail: one JSON line per security-relevant event (sessions, seals, grants, revocations, refusals)."""
from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO, Any

MAX_QUOTED = 200   # client-supplied strings are quoted at most this long


def quote(text: str, limit: int = MAX_QUOTED) -> str:
    """`text` for a message or a log line: cut at `limit` characters, saying how long it really was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


class Audit:
    """Writes audit events as JSON lines to a file (appended, line-buffered) or to stderr.

    Events are small dicts with `ts` (unix seconds), `event` and the fields
    given; values that are strings from a client are cut by the caller (quote).
    A write error is reported once on stderr and does not fail the request.
    """

    def __init__(self, path: str | None = None, stream: IO[str] | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._own = path is not None and path != "-"
        self._stream: IO[str] = open(path, "a", buffering=1, encoding="utf-8") if self._own \
            else (stream or sys.stderr)   # type: ignore[arg-type]
        self._failed = False

    def event(self, event: str, **fields: Any) -> None:
        record = {"ts": round(time.time(), 6), "event": event, **fields}
        line = json.dumps(record, separators=(",", ":"), default=str)
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError) as exc:
                if not self._failed:
                    self._failed = True
                    print(f"rdax-server: cannot write the audit log {self.path}: {exc}", file=sys.stderr)

    def close(self) -> None:
        if self._own:
            with self._lock:
                self._stream.close()


class NullAudit(Audit):
    """An audit trail that drops everything (unit tests that do not look at it)."""

    def __init__(self) -> None:
        self.path = None
        self.records: list[dict[str, Any]] = []

    def event(self, event: str, **fields: Any) -> None:
        self.records.append({"event": event, **fields})

    def close(self) -> None:
        pass
