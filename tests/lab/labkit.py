"""What the lab's tests and remote drivers share: the data pattern they write and check, and the
JSON-lines loop of the drivers (peer.py, client_peer.py, tests/bench/rdax_peer.py)."""
from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable


def pattern(seed: int, length: int) -> bytes:
    """`length` pseudo-random bytes, the same for the same seed on both sides of a test."""
    return random.Random(seed).randbytes(length)


def serve(target: object, errors: Callable[[Exception], dict | None]) -> None:
    """Answer one JSON command per stdin line by calling target.<op>(**args);
    `errors` turns an expected exception into an answer (None: re-raise)."""
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        if op == "quit":
            break
        reply: dict | None
        try:
            reply = {"ok": True, **getattr(target, op)(**req)}
        except Exception as exc:  # mapped or re-raised just below
            reply = errors(exc)
            if reply is None:
                raise
            reply = {"ok": False, "error": str(exc), **reply}
        print(json.dumps(reply), flush=True)
