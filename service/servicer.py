"""The gRPC face of a Node: who is calling (from the TLS certificate), messages in, Node calls, statuses out."""
from __future__ import annotations

import asyncio
import errno
import functools
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from rdax.v1 import rdax_pb2 as pb
from rdax.v1 import rdax_pb2_grpc

from .audit import quote
from .errors import RdaxError
from .fabric_api import Endpoint
from .grants import GrantDescriptor
from .identity import ANONYMOUS, PeerIdentity, identity_from_auth_context
from .node import Node
from .seals import SealInfo
from .sessions import Event

log = logging.getLogger("rdax.service")

Request = TypeVar("Request")
Response = TypeVar("Response")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a client sees for an exception: RdaxError carries its own, verbs errors are mapped, the rest is
    INTERNAL."""
    if isinstance(exc, RdaxError):
        return grpc.StatusCode[exc.code], exc.message
    verbs_error = _verbs_error_class()
    if verbs_error is not None and isinstance(exc, verbs_error):
        if getattr(exc, "errno", None) in (errno.ENOMEM, errno.EAGAIN):
            return grpc.StatusCode.RESOURCE_EXHAUSTED, f"the node is out of RDMA resources: {exc}"
        return grpc.StatusCode.UNAVAILABLE, f"the node's RDMA device failed: {exc}"
    return grpc.StatusCode.INTERNAL, f"internal error in the storage node: {type(exc).__name__}: {exc}"


def _verbs_error_class() -> type | None:
    # rdax.rdma imports pyverbs, which hosts without RDMA lack; a VerbsError
    # can only exist once the real fabric has loaded it, so look, don't import.
    rdma = sys.modules.get("rdax.rdma")
    return getattr(rdma, "VerbsError", None)


class Unauthenticated(Exception):
    """A call without a verified client certificate on a node that requires one (cannot happen over mTLS)."""


def _unary(method: Callable[[RdaxServicer, Request, grpc.ServicerContext, PeerIdentity], Response]
           ) -> Callable[[RdaxServicer, Request, grpc.ServicerContext], Response]:
    """Run a unary handler for the caller's identity; turn any exception into context.abort with the most specific
    status, and write every refusal to the audit trail."""
    @functools.wraps(method)
    def handler(self: RdaxServicer, request: Request, context: grpc.ServicerContext) -> Response:
        rpc = method.__name__
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            caller = self.caller(context)
        except Unauthenticated as exc:
            self._node.audit_log.event("refused", rpc=rpc, identity="", peer=context.peer(), code="UNAUTHENTICATED",
                                       reason=str(exc))
            self._node.metrics.rpc_seconds.labels(rpc, "UNAUTHENTICATED").observe(time.perf_counter() - started)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        try:
            return method(self, request, context, caller)
        except Exception as exc:
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", rpc)
            self._node.audit_log.event("refused", rpc=rpc, identity=caller.name, peer=context.peer(),
                                       code=code.name, reason=quote(message, 400))
            context.abort(code, message)
        finally:
            self._node.metrics.rpc_seconds.labels(rpc, code.name).observe(time.perf_counter() - started)
    return handler


class RdaxServicer(rdax_pb2_grpc.RdaxServicer):
    """rdax.v1.Rdax over a Node. `insecure`: no TLS, every caller is 'anonymous' (held to the policy all the same).

    Unary calls are plain functions that the aio server runs in its thread pool; Watch is an async generator, so
    a stream waiting for events holds no thread.
    """

    def __init__(self, node: Node, *, insecure: bool = False) -> None:
        self._node = node
        self._insecure = insecure

    def caller(self, context: grpc.ServicerContext | grpc.aio.ServicerContext[Any, Any]) -> PeerIdentity:
        """The identity of the caller: from its verified certificate, never from a request field."""
        if self._insecure:
            return ANONYMOUS
        try:
            # Ignored for mypy: the stubs give the sync context's auth_context() as Mapping[str, bytes] (with a
            # FIXME) and the aio one's as Mapping[str, Iterable[bytes]]; gRPC gives a dict of lists of bytes.
            identity = identity_from_auth_context(context.auth_context())  # type: ignore[arg-type]
        except ValueError as exc:   # a verified certificate that names nobody
            raise Unauthenticated(str(exc)) from None
        if identity is None:
            raise Unauthenticated("no verified client certificate: connect with mutual TLS (a certificate signed by "
                                  "the node's client CA; rdax-admin certs client makes one)")
        return identity

    @_unary
    def OpenSession(self, request: pb.OpenSessionRequest, context: grpc.ServicerContext,
                    caller: PeerIdentity) -> pb.OpenSessionResponse:
        endpoint = endpoint_from_pb(request.endpoint) if request.HasField("endpoint") else None
        opened = self._node.open_session(request.client_id, endpoint, identity=caller.name,
                                         cert_not_after=caller.not_after, peer=context.peer())
        return pb.OpenSessionResponse(session_id=opened.session_id, endpoint=endpoint_to_pb(opened.endpoint),
                                      lease_seconds=opened.lease_seconds)

    @_unary
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext,
                  caller: PeerIdentity) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse(lease_seconds=self._node.heartbeat(request.session_id, identity=caller.name))

    @_unary
    def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.ServicerContext,
                     caller: PeerIdentity) -> pb.CloseSessionResponse:
        self._node.close_session(request.session_id, identity=caller.name)
        return pb.CloseSessionResponse()

    @_unary
    def Seal(self, request: pb.SealRequest, context: grpc.ServicerContext, caller: PeerIdentity) -> pb.SealResponse:
        info = self._node.seal(request.session_id, request.path, request.length, request.create,
                               identity=caller.name)
        return pb.SealResponse(seal=seal_info_to_pb(info))

    @_unary
    def Extend(self, request: pb.ExtendRequest, context: grpc.ServicerContext,
               caller: PeerIdentity) -> pb.ExtendResponse:
        info = self._node.extend(request.session_id, request.seal_id, request.length, identity=caller.name)
        return pb.ExtendResponse(seal=seal_info_to_pb(info))

    @_unary
    def Grant(self, request: pb.GrantRequest, context: grpc.ServicerContext, caller: PeerIdentity) -> pb.GrantResponse:
        grant = self._node.grant(request.session_id, request.seal_id, request.offset, request.length, request.access,
                                 identity=caller.name)
        return pb.GrantResponse(grant=grant_to_pb(grant))

    @_unary
    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext,
                caller: PeerIdentity) -> pb.ReleaseResponse:
        self._node.release(request.session_id, request.grant_id, identity=caller.name)
        return pb.ReleaseResponse()

    @_unary
    def Commit(self, request: pb.CommitRequest, context: grpc.ServicerContext,
               caller: PeerIdentity) -> pb.CommitResponse:
        ranges = [(r.offset, r.length) for r in request.ranges]
        size = request.size if request.HasField("size") else None
        return pb.CommitResponse(bytes=self._node.commit(request.session_id, request.seal_id, ranges,
                                                         identity=caller.name, size=size))

    @_unary
    def Unseal(self, request: pb.UnsealRequest, context: grpc.ServicerContext,
               caller: PeerIdentity) -> pb.UnsealResponse:
        size = request.size if request.HasField("size") else None
        return pb.UnsealResponse(epoch=self._node.unseal(request.session_id, request.seal_id, identity=caller.name,
                                                         size=size))

    @_unary
    def Stat(self, request: pb.StatRequest, context: grpc.ServicerContext, caller: PeerIdentity) -> pb.SealInfo:
        return seal_info_to_pb(self._node.stat(request.session_id, request.seal_id, identity=caller.name,
                                               path=request.path))

    @_unary
    def List(self, request: pb.ListRequest, context: grpc.ServicerContext, caller: PeerIdentity) -> pb.ListResponse:
        return pb.ListResponse(seals=[seal_info_to_pb(info)
                                      for info in self._node.list_seals(request.session_id, identity=caller.name)])

    async def Watch(self, request: pb.WatchRequest,
                    context: grpc.aio.ServicerContext[pb.WatchRequest, pb.Event]) -> AsyncIterator[pb.Event]:
        try:
            caller = self.caller(context)
        except Unauthenticated as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        loop = asyncio.get_running_loop()
        try:
            # The node's lock may be held for a while (a revocation): not on the event loop's thread.
            follower = await asyncio.to_thread(self._node.watch_async, request.session_id, loop,
                                               identity=caller.name)
        except Exception as exc:  # noqa: BLE001 - becomes the call's status (abort raises) and an audit record
            code, message = status_of(exc)
            self._node.audit_log.event("refused", rpc="Watch", identity=caller.name, peer=context.peer(),
                                       code=code.name, reason=quote(message, 400))
            await context.abort(code, message)
        try:
            async for event in follower:
                yield event_to_pb(event)
        finally:
            follower.close()   # also when the client cancels: the stream's quota comes back


# -- messages <-> core types ----------------------------------------------------
def endpoint_from_pb(message: pb.Endpoint) -> Endpoint:
    return Endpoint(qpn=message.qpn, gid=message.gid, psn=message.psn, mtu=message.mtu)


def endpoint_to_pb(endpoint: Endpoint) -> pb.Endpoint:
    return pb.Endpoint(qpn=endpoint.qpn, gid=endpoint.gid, psn=endpoint.psn, mtu=endpoint.mtu)


def seal_info_to_pb(info: SealInfo) -> pb.SealInfo:
    return pb.SealInfo(
        seal_id=info.seal_id, path=info.path, length=info.length, epoch=info.epoch,
        extents=pb.ExtentSummary(count=info.extent_count, fingerprint=info.fingerprint),
        grant_ids=info.grant_ids, owner_session=info.owner_session, state=info.state,
        holder_sessions=info.holder_sessions, revoked_reason=info.revoked_reason, holder_count=info.holder_count,
        file_size=info.file_size)


def grant_to_pb(grant: GrantDescriptor) -> pb.GrantDescriptor:
    return pb.GrantDescriptor(
        grant_id=grant.grant_id, remote_addr=grant.remote_addr, rkey=grant.rkey, offset=grant.offset,
        length=grant.length, access=grant.access, epoch=grant.epoch, expires_unix_ms=grant.expires_unix_ms,
        seal_id=grant.seal_id, write_alignment=grant.write_alignment)


def event_to_pb(event: Event) -> pb.Event:
    # Ignored for mypy: the .pyi wants an Event.Kind (an int subclass that exists only there) or its name; the int
    # is the same value, which protobuf takes.
    return pb.Event(kind=int(event.kind),  # type: ignore[arg-type]
                    seal_id=event.seal_id, grant_ids=event.grant_ids, reason=event.reason,
                    epoch=event.epoch, unix_ms=event.unix_ms, length=event.length)
