"""Client library: connect to an rdax node, seal a remote file, and write,
read, flush and commit it over RDMA through a grant.

    with rdax.client.connect("10.77.0.1:7710") as session:
        with session.open("data/blob", length=1 << 30) as f:
            f.write(0, payload)
            f.flush(0, len(payload))
"""
from __future__ import annotations

import functools
import getpass
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, Protocol, TypedDict, TypeVar, Unpack

import grpc

from rdax.rdma import Abandoned, Access, Chunk, Connection, EndpointInfo, LocalBuffer, local_device, open_device
from rdax.v1 import rdax_pb2 as pb
from rdax.v1 import rdax_pb2_grpc as pb_grpc

from .errors import GrantRevoked, RemoteError, SessionLost
from .tls import TlsFiles, secure_channel, tls_from_env

MiB = 1 << 20
PAGE = 4096
ALL_ACCESS = Access.WRITE | Access.READ | Access.ATOMIC | Access.FLUSH

P = ParamSpec("P")
R = TypeVar("R")
Request = TypeVar("Request")
Response = TypeVar("Response")


class Readable(Protocol):
    """What RemoteFile.write_from reads: a binary file (open(..., "rb")), or anything else with readinto."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


class SessionOptions(TypedDict, total=False):
    """connect()'s keyword arguments for the Session."""

    client_id: str | None
    staging: int
    chunk: int
    depth: int


def _call(rpc: str, fn: Callable[[Request], Response], request: Request) -> Response:
    try:
        return fn(request)
    except grpc.RpcError as exc:
        raise RemoteError(rpc, exc.code(), exc.details()) from None


@dataclass
class Grant:
    grant_id: str
    seal_id: str
    remote_addr: int
    rkey: int
    offset: int
    length: int
    access: int
    epoch: int
    write_alignment: int = 1   # WRITE/READ start addresses must be multiples of it (the node says)

    @classmethod
    def from_pb(cls, g: pb.GrantDescriptor) -> Grant:
        return cls(g.grant_id, g.seal_id, g.remote_addr, g.rkey, g.offset, g.length, g.access, g.epoch,
                   max(1, g.write_alignment))


class Session:
    """One session with a node: a gRPC channel, one RC connection, a staging
    buffer, a heartbeat and a Watch stream that records revocations."""

    def __init__(self, target: str, device: str | None = None, client_id: str | None = None,
                 staging: int = 16 * MiB, chunk: int = MiB, depth: int = 64, tls: TlsFiles | None = None,
                 insecure: bool = False) -> None:
        self.target = target
        self.channel = open_channel(target, tls, insecure)
        self.stub = pb_grpc.RdaxStub(self.channel)
        self.chunk = chunk
        self.dev = open_device(name=device or local_device())
        self.pd = self.dev.alloc_pd()
        self.conn = Connection(self.dev, self.pd, depth=depth)
        self.staging = LocalBuffer(self.pd, staging)
        self.revoked: dict[str, GrantRevoked] = {}
        self.lost: SessionLost | None = None   # set once the node ended the session: every operation raises it
        self.on_revoke: list[Callable[[pb.Event], None]] = []
        self._closed = threading.Event()
        ep = self.conn.endpoint()
        reply = _call("OpenSession", self.stub.OpenSession, pb.OpenSessionRequest(
            client_id=client_id or f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}",
            endpoint=pb.Endpoint(qpn=ep.qpn, gid=ep.gid, psn=ep.psn, mtu=ep.mtu)))
        self.session_id = reply.session_id
        self.lease_seconds = reply.lease_seconds or 30
        node = reply.endpoint
        self.conn.connect(EndpointInfo(node.qpn, node.gid, node.psn, node.mtu))
        self._watcher = threading.Thread(target=self._watch, name="rdax-watch", daemon=True)
        self._watcher.start()
        self._heart = threading.Thread(target=self._heartbeat, name="rdax-heartbeat", daemon=True)
        self._heart.start()

    # -- background ----------------------------------------------------------
    def _watch(self) -> None:
        try:
            for event in self.stub.Watch(pb.WatchRequest(session_id=self.session_id)):
                for gid in event.grant_ids:
                    self.revoked[gid] = GrantRevoked(gid, event.reason, event.epoch)
                if event.kind in (pb.Event.SESSION_EXPIRED, pb.Event.SESSION_ENDED, pb.Event.SHUTDOWN):
                    self._lose(event.reason)
                for callback in self.on_revoke:
                    callback(event)
        except grpc.RpcError:
            return  # the channel failed or we cancelled it: the heartbeat tells whether the session is gone
        if not self._closed.is_set():
            # The node ends a session's Watch streams only when the session is over (closed by the node or by
            # another process of this identity): its QP is gone, waiting for completions is pointless.
            self._lose("the node ended the session's Watch stream: the session is over")

    def _lose(self, reason: str) -> None:
        """The node ended the session: its QP is gone and will answer nothing, so stop waiting for it now."""
        if self.lost is None:
            self.lost = SessionLost(reason)
            self.conn.abandon(reason)

    def _heartbeat(self) -> None:
        while not self._closed.wait(max(1.0, self.lease_seconds / 3)):
            try:
                self.stub.Heartbeat(pb.HeartbeatRequest(session_id=self.session_id), timeout=10)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND and not self._closed.is_set():
                    self._lose(exc.details() or "the node no longer knows this session")
            except ValueError:   # "Cannot invoke RPC on closed channel": someone closed it under us; nothing to renew
                return

    # -- control plane -------------------------------------------------------
    def seal(self, path: str, length: int, create: bool = True) -> pb.SealInfo:
        return _call("Seal", self.stub.Seal, pb.SealRequest(
            session_id=self.session_id, path=path, length=length, create=create)).seal

    def grant(self, seal_id: str, offset: int, length: int, access: Access = ALL_ACCESS) -> Grant:
        reply = _call("Grant", self.stub.Grant, pb.GrantRequest(
            session_id=self.session_id, seal_id=seal_id, offset=offset, length=length, access=int(access)))
        return Grant.from_pb(reply.grant)

    def release(self, grant_id: str) -> None:
        _call("Release", self.stub.Release, pb.ReleaseRequest(session_id=self.session_id, grant_id=grant_id))

    def unseal(self, seal_id: str, size: int | None = None) -> None:
        """Drop this session's hold; `size`: the file's size once the last holder lets go (bytes written)."""
        _call("Unseal", self.stub.Unseal, pb.UnsealRequest(session_id=self.session_id, seal_id=seal_id, size=size))

    def stat(self, seal_id: str) -> pb.SealInfo:
        return _call("Stat", self.stub.Stat, pb.StatRequest(session_id=self.session_id, seal_id=seal_id))

    def extend(self, seal_id: str, length: int) -> pb.SealInfo:
        """Grow a held seal to `length` bytes in place (its grants stay valid)."""
        return _call("Extend", self.stub.Extend, pb.ExtendRequest(session_id=self.session_id, seal_id=seal_id,
                                                                  length=length)).seal

    def stat_path(self, path: str) -> pb.SealInfo:
        """A file by path, sealed or not: its size (file_size) and its seal if it has one (state UNSEALED if not)."""
        return _call("Stat", self.stub.Stat, pb.StatRequest(session_id=self.session_id, path=path))

    def list(self) -> list[pb.SealInfo]:
        return list(_call("List", self.stub.List, pb.ListRequest(session_id=self.session_id)).seals)

    def open(self, path: str, length: int, create: bool = True, access: Access = ALL_ACCESS) -> RemoteFile:
        """Seal `path` (length bytes) and grant this session `access` to all of it."""
        info = self.seal(path, length, create)
        try:
            grant = self.grant(info.seal_id, 0, length, access)
        except Exception:
            self.unseal(info.seal_id)
            raise
        return RemoteFile(self, info, grant)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self.stub.CloseSession(pb.CloseSessionRequest(session_id=self.session_id), timeout=10)
        except grpc.RpcError:
            pass
        self.channel.close()
        self.staging.close()
        self.conn.close()
        self.pd.close()
        self.dev.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fails_fast(method: Callable[Concatenate[RemoteFile, P], R]) -> Callable[Concatenate[RemoteFile, P], R]:
    """A transfer the node abandoned (session ended) raises SessionLost, not the verbs error under it."""
    @functools.wraps(method)
    def transfer(self: RemoteFile, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except Abandoned:
            raise (self.session.lost or SessionLost("the connection was abandoned")) from None
    return transfer


class RemoteFile:
    """A sealed remote file and this session's grant over it."""

    def __init__(self, session: Session, info: pb.SealInfo, grant: Grant) -> None:
        self.session = session
        self.info = info
        self.grant = grant
        self.length = grant.length
        self.size: int | None = None   # set it (bytes) to leave the file that long when it is let go
        self._tail = b""   # append(): the bytes of the last, partial page, rewritten with the next record

    def _check(self, offset: int, length: int, transfer: bool = False) -> None:
        """Raise unless [offset, offset+length) can be reached through the
        grant; a `transfer` (RDMA WRITE/READ) must also start where the node
        says its writes land (Grant.write_alignment)."""
        revoked = self.session.revoked.get(self.grant.grant_id)
        if revoked:
            raise revoked
        if self.session.lost is not None:
            raise self.session.lost
        if offset < 0 or length < 0 or offset + length > self.grant.offset + self.grant.length \
                or offset < self.grant.offset:
            raise ValueError(f"[{offset}, {offset + length}) is outside the grant "
                             f"[{self.grant.offset}, {self.grant.offset + self.grant.length})")
        align = self.grant.write_alignment
        if transfer and length and self._remote(offset) % align:
            # Refused rather than sent: the node's RDMA path would put these
            # bytes at the start of the page, over someone else's (its canary
            # found so at start-up: an rxe ODP kernel bug, LAB-NOTES.md).
            start = offset - self._remote(offset) % align
            raise ValueError(f"offset {offset}: this node takes RDMA writes and reads only from {align}-byte "
                             f"boundaries of the file; start at {start} and include the {offset - start} bytes "
                             f"before (read them first to keep them)")

    def _remote(self, offset: int) -> int:
        return self.grant.remote_addr + (offset - self.grant.offset)

    @_fails_fast
    def write(self, offset: int, data: bytes | bytearray | memoryview, flush: bool = False) -> int:
        """RDMA WRITE `data` at `offset`, pipelined through the staging buffer.

        flush=True posts a FLUSH(persistent) of the range behind the last
        write, so the bytes are durable when this returns — one wait, not two.
        """
        view = memoryview(data).cast("B")
        total = len(view)
        self._check(offset, total, transfer=True)
        s = self.session
        if 0 < total <= s.chunk and total <= s.staging.length:
            # One request (the common small write), without the staging loop
            # and its helpers: each Python step before the post adds to the
            # write's latency (about 100 us of a 4 KiB write+flush in the lab,
            # tests/bench/hotpath.py).
            s.staging.view()[:total] = view
            rkey, raddr = self.grant.rkey, self._remote(offset)
            c = Chunk(s.staging.addr, s.staging.lkey, total, rkey, raddr)
            if flush:
                s.conn.write_flush([c], rkey, raddr, total)
            else:
                s.conn.write([c])
            return total
        done = 0
        while done < total:
            n = min(s.staging.length, total - done)
            s.staging.view()[:n] = view[done:done + n]
            last = done + n == total
            self._post_staged(offset + done, n, flush_from=offset if (flush and last) else None)
            done += n
        return done

    @_fails_fast
    def writev(self, pieces: Sequence[tuple[int, bytes | bytearray | memoryview]], flush: bool = True) -> int:
        """Write many (offset, data) pieces as one batch: each piece goes to its own part of the staging buffer,
        every request is posted before the first wait (up to the connection's depth in flight, completions
        reaped in batches), and with `flush` one FLUSH(persistent) of the span they cover goes behind them, so
        all are durable when this returns. For many small records: one wait instead of one per record.
        Returns the bytes written; the pieces must fit in the staging buffer together (pass fewer otherwise)."""
        s = self.session
        views = [(offset, memoryview(data).cast("B")) for offset, data in pieces]
        staged = sum(len(v) for _, v in views)
        if staged > s.staging.length:
            raise ValueError(f"writev of {staged} bytes: more than the staging buffer's {s.staging.length}; "
                             f"split the pieces into batches of at most that many bytes")
        for offset, view in views:
            self._check(offset, len(view), transfer=True)
        if not staged:
            return 0
        rkey, staging, at, chunks = self.grant.rkey, s.staging.view(), 0, []
        for offset, view in views:
            n = len(view)
            if not n:
                continue
            staging[at:at + n] = view
            chunks += [Chunk(s.staging.addr + at + o, s.staging.lkey, min(s.chunk, n - o), rkey,
                             self._remote(offset + o)) for o in range(0, n, s.chunk)]
            at += n
        if flush:
            lo = min(offset for offset, view in views if len(view))
            hi = max(offset + len(view) for offset, view in views)
            s.conn.write_flush(chunks, rkey, self._remote(lo), hi - lo)
        else:
            s.conn.write(chunks)
        return staged

    def _staged_chunks(self, offset: int, n: int) -> list[Chunk]:
        """The staging buffer's first n bytes <-> the file's [offset, offset+n), one request per chunk."""
        s = self.session
        return [Chunk(s.staging.addr + o, s.staging.lkey, min(s.chunk, n - o), self.grant.rkey,
                      self._remote(offset + o)) for o in range(0, n, s.chunk)]

    def _post_staged(self, offset: int, n: int, flush_from: int | None = None) -> None:
        s = self.session
        chunks = self._staged_chunks(offset, n)
        if flush_from is None:
            s.conn.write(chunks)
        else:
            s.conn.write_flush(chunks, self.grant.rkey, self._remote(flush_from), offset + n - flush_from)

    @_fails_fast
    def write_from(self, src: Readable, offset: int = 0, length: int | None = None,
                   progress: Callable[[int], object] | None = None) -> int:
        """Stream `length` bytes (or to EOF) from a binary file object."""
        s = self.session
        view = s.staging.view()
        done = 0
        while length is None or done < length:
            want = s.staging.length if length is None else min(s.staging.length, length - done)
            n = src.readinto(view[:want])
            if not n:
                break
            self._check(offset + done, n, transfer=True)
            self._post_staged(offset + done, n)
            done += n
            if progress:
                progress(n)
        return done

    @_fails_fast
    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length, transfer=True)
        s = self.session
        out = bytearray()
        while len(out) < length:
            n = min(s.staging.length, length - len(out))
            s.conn.read(self._staged_chunks(offset + len(out), n))
            out += s.staging.read(n)
        return bytes(out)

    @_fails_fast
    def flush(self, offset: int = 0, length: int | None = None) -> None:
        """FLUSH(persistent) the range: when this returns the bytes are durable."""
        length = self.length - offset if length is None else length
        self._check(offset, length)
        self.session.conn.flush(self.grant.rkey, self._remote(offset), length)

    @_fails_fast
    def atomic_write(self, offset: int, value: bytes) -> None:
        self._check(offset, 8)
        self.session.conn.atomic_write(self.grant.rkey, self._remote(offset), value)

    def extend(self, new_length: int) -> None:
        """Grow the seal to `new_length` and take one grant over all of it (the old one is released after)."""
        self.info = self.session.extend(self.info.seal_id, new_length)
        grant = self.session.grant(self.info.seal_id, 0, new_length, Access(self.grant.access))
        old, self.grant, self.length = self.grant, grant, new_length
        self.session.release(old.grant_id)

    def append(self, data: bytes | bytearray | memoryview, flush: bool = True) -> int:
        """Write `data` at the end of the file (`size`, 0 at first), growing the seal as needed; returns the
        offset it was written at. Records need no alignment: the partial last page is rewritten with the next
        record, since writes must start on the node's write_alignment."""
        end = self.size or 0
        need = end + len(data)
        if need > self.length:
            self.extend(max(-(-need // PAGE) * PAGE, 2 * self.length))
        align = self.grant.write_alignment
        start = end - end % align
        if len(self._tail) != end - start:   # a file we did not write the end of: read its partial page back
            self._tail = self.read(start, end - start) if end > start else b""
        payload = self._tail + bytes(data)
        self.write(start, payload, flush=flush)
        self.size = need
        keep = need % align
        self._tail = payload[len(payload) - keep:] if keep else b""
        return end

    def commit(self, ranges: list[tuple[int, int]] | None = None) -> int:
        """Ask the node to persist ranges (for clients that cannot FLUSH)."""
        ranges = ranges or [(self.grant.offset, self.grant.length)]
        reply = _call("Commit", self.session.stub.Commit, pb.CommitRequest(
            session_id=self.session.session_id, seal_id=self.info.seal_id,
            ranges=[pb.Range(offset=o, length=n) for o, n in ranges]))
        return reply.bytes

    def close(self, size: int | None = None) -> None:
        """Release the grant and drop this session's hold on the seal; with `size`, the file is set to that many
        bytes when the last holder lets it go (seals are whole pages: `rdax put` of 1000 bytes declares 1000)."""
        size = self.size if size is None else size
        rpcs: tuple[Callable[[], None], ...] = (lambda: self.session.release(self.grant.grant_id),
                                                lambda: self.session.unseal(self.info.seal_id, size))
        for rpc in rpcs:
            try:
                rpc()
            except RemoteError as exc:
                if exc.code != grpc.StatusCode.NOT_FOUND:
                    raise

    def __enter__(self) -> RemoteFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_channel(target: str, tls: TlsFiles | None = None, insecure: bool = False) -> grpc.Channel:
    """A gRPC channel to a node: mutual TLS with `tls`, else with RDAX_TLS_CA/CERT/KEY; plaintext only if asked."""
    if insecure:
        if tls is not None:
            raise ValueError("insecure=True and TLS files together: choose one")
        return grpc.insecure_channel(target)
    tls = tls or tls_from_env()
    if tls is None:
        raise ValueError(f"no TLS files for {target}: rdax nodes require mutual TLS; pass tls=TlsFiles(ca, cert, key) "
                         f"or set RDAX_TLS_CA, RDAX_TLS_CERT and RDAX_TLS_KEY (--tls-ca/--tls-cert/--tls-key), or "
                         f"insecure=True (--insecure) for a node started with --insecure")
    return secure_channel(target, tls)


def connect(target: str, device: str | None = None, tls: TlsFiles | None = None, insecure: bool = False,
            **kwargs: Unpack[SessionOptions]) -> Session:
    """A session with the node at `target` (HOST:PORT) over mutual TLS (tls, or RDAX_TLS_* from the environment)."""
    return Session(target, device=device, tls=tls, insecure=insecure, **kwargs)
