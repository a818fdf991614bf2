"""An rdax client for lab tests, run in the client namespace: one JSON
command per line on stdin, one JSON answer per line on stdout.

    ip netns exec client python tests/lab/client_peer.py TARGET
"""
from __future__ import annotations

import json
import sys
import time

from rdax.client import GrantRevoked, RdaxClientError, RemoteError, RemoteFile, SessionLost, connect
from rdax.rdma import Access, Chunk, VerbsError, WorkCompletionError

from labkit import pattern, serve


class ClientPeer:
    def __init__(self, target: str) -> None:
        self.session = connect(target)
        self.files: dict[str, object] = {}
        self.notified_at: dict[str, float] = {}   # grant id -> CLOCK_MONOTONIC when Watch told us
        self.session.on_revoke.append(self._on_revoke)

    def _on_revoke(self, event) -> None:
        now = time.monotonic()
        for grant_id in event.grant_ids:
            self.notified_at.setdefault(grant_id, now)

    def open(self, name: str, path: str, length: int, access: int = 15, offset: int = 0,
             grant_length: int | None = None) -> dict:
        """Seal `path` and take a grant over [offset, offset+grant_length)."""
        info = self.session.seal(path, length)
        grant = self.session.grant(info.seal_id, offset, grant_length or length - offset, Access(access))
        self.files[name] = RemoteFile(self.session, info, grant)
        return {"seal_id": info.seal_id, "grant_id": grant.grant_id, "rkey": grant.rkey,
                "remote_addr": grant.remote_addr, "epoch": grant.epoch, "write_alignment": grant.write_alignment}

    def write(self, name: str, offset: int, length: int, seed: int, flush: bool = False) -> dict:
        return {"bytes": self.files[name].write(offset, pattern(seed, length), flush=flush)}

    def flush(self, name: str, offset: int, length: int) -> dict:
        self.files[name].flush(offset, length)
        return {}

    def commit(self, name: str, offset: int, length: int) -> dict:
        return {"bytes": self.files[name].commit([(offset, length)])}

    def read_equals(self, name: str, offset: int, length: int, seed: int) -> dict:
        return {"equal": self.files[name].read(offset, length) == pattern(seed, length)}

    def raw_write(self, rkey: int, remote_addr: int, length: int, seed: int) -> dict:
        """RDMA WRITE with any rkey/address, bypassing the library's checks."""
        s = self.session
        s.staging.write(pattern(seed, length))
        s.conn.write([Chunk(s.staging.addr, s.staging.lkey, length, rkey, remote_addr)])
        return {"bytes": length}

    def stream(self, name: str, chunk: int = 65536, seconds: float = 60.0) -> dict:
        """RDMA WRITE chunk after chunk (write i carries byte i % 251 + 1) until
        something fails; report how many completed and what stopped them."""
        f = self.files[name]
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            offset = (i * chunk) % f.length
            try:
                f.write(offset, bytes([i % 251 + 1]) * chunk)
            except (GrantRevoked, SessionLost, WorkCompletionError, VerbsError) as exc:
                return {"writes": i, "stopped_by": type(exc).__name__, "error": str(exc)}
            i += 1
        return {"writes": i, "stopped_by": "time", "error": ""}

    def revoked(self, name: str, timeout: float = 10.0) -> dict:
        """Wait until the Watch stream reported this file's grant revoked."""
        grant_id = self.files[name].grant.grant_id
        deadline = time.monotonic() + timeout
        while grant_id not in self.session.revoked and time.monotonic() < deadline:
            time.sleep(0.05)
        exc = self.session.revoked.get(grant_id)
        return {"revoked": exc is not None, "reason": exc.reason if exc else "", "epoch": exc.epoch if exc else 0,
                "notified_at": self.notified_at.get(grant_id, 0.0)}

    def state(self) -> dict:
        return {"state": self.session.conn.state()}

    def close_file(self, name: str) -> dict:
        self.files.pop(name).close()
        return {}


def _error(exc: Exception) -> dict | None:
    if isinstance(exc, WorkCompletionError):
        return {"status": exc.status}
    if isinstance(exc, RemoteError):
        return {"code": exc.code.name}
    if isinstance(exc, (RdaxClientError, VerbsError, ValueError)):
        return {}
    return None


def main() -> None:
    peer = ClientPeer(sys.argv[1])
    print(json.dumps({"ok": True, "session_id": peer.session.session_id}), flush=True)
    serve(peer, _error)


if __name__ == "__main__":
    main()
