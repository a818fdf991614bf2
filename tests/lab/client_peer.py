"""An rdax client for lab tests, run in the client namespace: one JSON
command per line on stdin, one JSON answer per line on stdout.

    ip netns exec client python tests/lab/client_peer.py TARGET
"""
from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from labkit import pattern, serve

from rdax.client import GrantRevoked, RdaxClientError, RemoteError, RemoteFile, SessionLost, connect
from rdax.rdma import Access, Chunk, VerbsError, WorkCompletionError


class ClientPeer:
    def __init__(self, target: str) -> None:
        self.target = target
        self.session = connect(target)
        self.files: dict[str, RemoteFile] = {}
        self.notified_at: dict[str, float] = {}   # grant id -> CLOCK_MONOTONIC when Watch told us
        self.seen: list[dict] = []                # every Watch event, in order
        self.session.on_revoke.append(self._on_revoke)
        self._streams: list[Any] = []             # Watch streams kept open by watch_flood (call, future, iterator)

    def _on_revoke(self, event) -> None:
        now = time.monotonic()
        self.seen.append({"kind": event.kind, "reason": event.reason, "grant_ids": list(event.grant_ids)})
        for grant_id in event.grant_ids:
            self.notified_at.setdefault(grant_id, now)

    # -- a hostile client's tools -------------------------------------------------
    def rpc(self, method: str, fields: dict, timeout: float = 30.0) -> dict:
        """Any Rdax RPC with any fields, straight through the stub: the reply, or the status it got."""
        import grpc
        from google.protobuf import json_format

        from rdax.v1 import rdax_pb2 as pb

        request_name = {"List": "ListRequest", "Stat": "StatRequest"}.get(method, f"{method}Request")
        request = json_format.ParseDict(fields, getattr(pb, request_name)())
        started = time.monotonic()
        try:
            reply = getattr(self.session.stub, method)(request, timeout=timeout)
            if method == "Watch":
                reply = next(iter(reply))
        except grpc.RpcError as exc:
            return {"code": exc.code().name, "details": exc.details() or "", "ms": (time.monotonic() - started) * 1e3}
        return {"code": "OK", "ms": (time.monotonic() - started) * 1e3,
                "reply": json_format.MessageToDict(reply, preserving_proto_field_name=True)}

    def rpc_latency(self, method: str, fields: dict, count: int, pause: float = 0.0) -> dict:
        """`count` calls of one RPC in a row: the latencies in ms and the codes seen."""
        times: list[float] = []
        codes: dict[str, int] = {}
        for _ in range(count):
            r = self.rpc(method, fields)
            times.append(r["ms"])
            codes[r["code"]] = codes.get(r["code"], 0) + 1
            time.sleep(pause)
        return {"ms": times, "codes": codes}

    def open_sessions(self, count: int) -> dict:
        """`count` OpenSession calls with made-up endpoints (no QP of ours behind them): the codes seen."""
        codes: dict[str, int] = {}
        opened, details = [], ""
        for i in range(count):
            r = self.rpc("OpenSession", {"client_id": f"flood-{i}", "endpoint": {
                "qpn": 0x100 + i, "gid": "::ffff:10.77.0.2", "psn": 1, "mtu": 4096}})
            codes[r["code"]] = codes.get(r["code"], 0) + 1
            if r["code"] == "OK":
                opened.append(r["reply"]["session_id"])
            else:
                details = r["details"]
        return {"codes": codes, "opened": opened, "details": details}

    def watch_flood(self, count: int) -> dict:
        """Open `count` Watch streams on this session and keep them open; how many the node took."""
        import grpc

        from rdax.v1 import rdax_pb2 as pb

        refused: dict[str, int] = {}
        for _ in range(count):
            stream = self.session.stub.Watch(pb.WatchRequest(session_id=self.session.session_id))
            self._streams.append(stream)
        time.sleep(2.0)
        for stream in self._streams:
            if stream.done() and stream.code() != grpc.StatusCode.OK:
                refused[stream.code().name] = refused.get(stream.code().name, 0) + 1
        return {"opened": len(self._streams) - sum(refused.values()), "refused": refused}

    def end_watch_flood(self) -> dict:
        for stream in self._streams:
            stream.cancel()
        n, self._streams = len(self._streams), []
        return {"cancelled": n}

    def raw_read(self, rkey: int, remote_addr: int, length: int) -> dict:
        """RDMA READ with any rkey/address, bypassing the library's checks."""
        s = self.session
        s.conn.read([Chunk(s.staging.addr, s.staging.lkey, length, rkey, remote_addr)])
        return {"bytes": length}

    def reconnect(self) -> dict:
        """A new session (the old one's QP may be in the error state)."""
        old, self.session = self.session, connect(self.target)
        self.session.on_revoke.append(self._on_revoke)
        threading.Thread(target=old.close, daemon=True).start()   # rxe teardown after errors can be slow
        self.files.clear()
        return {"session_id": self.session.session_id}

    def reconnect_sampled(self, keep_old: bool = True, every: float = 0.25) -> dict:
        """reconnect(), timed, with the connecting thread's stack sampled every `every` s (a poor man's py-spy: the
        guest has none): where a slow connect spends its time. keep_old: the old session's verbs objects are not
        destroyed (as the soak's victims do), only its gRPC channel closed."""
        import collections
        import traceback

        old = self.session
        done: dict[str, Any] = {}

        def run() -> None:
            try:
                done["session"] = connect(self.target)
            except Exception as exc:  # noqa: BLE001 - handed back below
                done["error"] = exc
        started = time.monotonic()
        if keep_old:
            old.channel.close()
        else:
            old.close()
        closed_s = time.monotonic() - started
        thread = threading.Thread(target=run, name="connect")
        thread.start()
        samples: collections.Counter[str] = collections.Counter()
        while thread.is_alive():
            thread.join(every)
            frame = sys._current_frames().get(thread.ident or 0)
            if frame is not None:
                where = traceback.extract_stack(frame)[-3:]
                samples[" <- ".join(f"{f.name}:{f.lineno}" for f in reversed(where))] += 1
        took = time.monotonic() - started
        if "error" in done:
            raise done["error"]
        self.session = done["session"]
        self.session.on_revoke.append(self._on_revoke)
        self.files.clear()
        return {"close_s": round(closed_s, 2), "connect_s": round(took - closed_s, 2),
                "samples": samples.most_common(8), "session_id": self.session.session_id}

    def events(self) -> dict:
        return {"events": self.seen, "lost": str(self.session.lost or "")}

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

    def writev(self, name: str, pieces: list[list[int]], flush: bool = True) -> dict:
        """RemoteFile.writev of (offset, length, seed) pieces."""
        return {"bytes": self.files[name].writev([(o, pattern(seed, n)) for o, n, seed in pieces], flush=flush)}

    def append(self, name: str, length: int, seed: int) -> dict:
        f = self.files[name]
        return {"offset": f.append(pattern(seed, length)), "size": f.size, "length": f.length}

    def reopen(self, name: str, path: str, size: int) -> dict:
        """Seal `path` again after a revocation and go on appending at `size`."""
        on_disk = self.session.stat_path(path).file_size   # the whole file: its size is set when it is let go
        info = self.session.seal(path, max(4096, -(-max(size, on_disk) // 4096) * 4096), create=False)
        grant = self.session.grant(info.seal_id, 0, info.length, Access(15))
        f = RemoteFile(self.session, info, grant)
        f.size = size
        self.files[name] = f
        return {"seal_id": info.seal_id, "length": info.length}

    def close_file_sized(self, name: str) -> dict:
        f = self.files.pop(name)
        f.close()
        return {"size": f.size}

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

    def stream(self, name: str, chunk: int = 65536, seconds: float = 60.0, at: int | None = None) -> dict:
        """RDMA WRITE chunk after chunk (write i carries byte i % 251 + 1), through the file or always `at`,
        until something fails; report how many completed and what stopped them."""
        f = self.files[name]
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            offset = (i * chunk) % f.length if at is None else at
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


def handshake(mode: str, target: str) -> dict:
    """One call to the node with the given transport (no RDMA): how far a client without the right
    credentials gets. plaintext: no TLS at all; nocert: TLS, the right CA, no client certificate; env: the
    RDAX_TLS_* files (a valid identity, or another CA's certificate)."""
    import grpc

    from rdax.client.tls import secure_channel, tls_from_env
    from rdax.v1 import rdax_pb2 as pb
    from rdax.v1 import rdax_pb2_grpc

    tls = tls_from_env()
    if mode == "plaintext":
        channel = grpc.insecure_channel(target)
    elif mode == "nocert":
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(open(tls.ca, "rb").read()))
    else:
        assert tls is not None, "env: RDAX_TLS_* unset"
        channel = secure_channel(target, tls)
    stub = rdax_pb2_grpc.RdaxStub(channel)
    try:
        opened = stub.OpenSession(pb.OpenSessionRequest(client_id="handshake", endpoint=pb.Endpoint(
            qpn=0x77, gid="::ffff:10.77.0.2", psn=1, mtu=4096)), timeout=20)
        stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id), timeout=20)
        return {"code": "OK"}
    except grpc.RpcError as exc:
        return {"code": exc.code().name, "details": exc.details() or ""}
    finally:
        channel.close()


def main() -> None:
    if sys.argv[1] == "--handshake":
        print(json.dumps(handshake(sys.argv[2], sys.argv[3])), flush=True)
        return
    peer = ClientPeer(sys.argv[1])
    print(json.dumps({"ok": True, "session_id": peer.session.session_id}), flush=True)
    serve(peer, _error)
    # "quit": close the session like a well-behaved client (a test that wants an abrupt end kills us instead).
    threading.Thread(target=peer.session.close, daemon=True).start()
    time.sleep(0.5)


if __name__ == "__main__":
    main()
