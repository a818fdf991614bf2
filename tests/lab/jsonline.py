"""The JSON-lines loop shared by the lab's remote drivers (peer.py, client_peer.py)."""
from __future__ import annotations

import json
import sys
from typing import Callable


def serve(target: object, errors: Callable[[Exception], dict | None]) -> None:
    """Answer one JSON command per stdin line by calling target.<op>(**args);
    `errors` turns an expected exception into an answer (None: re-raise)."""
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        if op == "quit":
            break
        try:
            reply = {"ok": True, **getattr(target, op)(**req)}
        except Exception as exc:  # noqa: BLE001 - mapped or re-raised just below
            reply = errors(exc)
            if reply is None:
                raise
            reply = {"ok": False, "error": str(exc), **reply}
        print(json.dumps(reply), flush=True)
