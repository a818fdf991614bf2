"""The gRPC face of a Node: messages in, Node calls, messages or statuses out — no rules of its own."""
from __future__ import annotations

import errno
import functools
import logging
import sys
from typing import Any, Callable, Iterator, TypeVar

import grpc

from rdax.v1 import rdax_pb2 as pb
from rdax.v1 import rdax_pb2_grpc

from .errors import RdaxError
from .fabric_api import Endpoint
from .grants import GrantDescriptor
from .node import Node
from .seals import SealInfo
from .sessions import Event

log = logging.getLogger("rdax.service")

Handler = TypeVar("Handler", bound=Callable[..., Any])


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a client sees for an exception: RdaxError carries its own, verbs errors are mapped, the rest is INTERNAL."""
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


def _unary(method: Handler) -> Handler:
    """Run a unary handler; turn any exception into context.abort with the most specific status."""
    @functools.wraps(method)
    def handler(self: "RdaxServicer", request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method.__name__)
            context.abort(code, message)
    return handler  # type: ignore[return-value]


class RdaxServicer(rdax_pb2_grpc.RdaxServicer):
    """rdax.v1.Rdax over a Node."""

    def __init__(self, node: Node) -> None:
        self._node = node

    @_unary
    def OpenSession(self, request: pb.OpenSessionRequest, context: grpc.ServicerContext) -> pb.OpenSessionResponse:
        endpoint = endpoint_from_pb(request.endpoint) if request.HasField("endpoint") else None
        opened = self._node.open_session(request.client_id, endpoint)
        return pb.OpenSessionResponse(session_id=opened.session_id, endpoint=endpoint_to_pb(opened.endpoint),
                                      lease_seconds=opened.lease_seconds)

    @_unary
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse(lease_seconds=self._node.heartbeat(request.session_id))

    @_unary
    def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.ServicerContext) -> pb.CloseSessionResponse:
        self._node.close_session(request.session_id)
        return pb.CloseSessionResponse()

    @_unary
    def Seal(self, request: pb.SealRequest, context: grpc.ServicerContext) -> pb.SealResponse:
        info = self._node.seal(request.session_id, request.path, request.length, request.create)
        return pb.SealResponse(seal=seal_info_to_pb(info))

    @_unary
    def Grant(self, request: pb.GrantRequest, context: grpc.ServicerContext) -> pb.GrantResponse:
        grant = self._node.grant(request.session_id, request.seal_id, request.offset, request.length, request.access)
        return pb.GrantResponse(grant=grant_to_pb(grant))

    @_unary
    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        self._node.release(request.session_id, request.grant_id)
        return pb.ReleaseResponse()

    @_unary
    def Commit(self, request: pb.CommitRequest, context: grpc.ServicerContext) -> pb.CommitResponse:
        ranges = [(r.offset, r.length) for r in request.ranges]
        return pb.CommitResponse(bytes=self._node.commit(request.session_id, request.seal_id, ranges))

    @_unary
    def Unseal(self, request: pb.UnsealRequest, context: grpc.ServicerContext) -> pb.UnsealResponse:
        return pb.UnsealResponse(epoch=self._node.unseal(request.session_id, request.seal_id))

    @_unary
    def Stat(self, request: pb.StatRequest, context: grpc.ServicerContext) -> pb.SealInfo:
        return seal_info_to_pb(self._node.stat(request.session_id, request.seal_id))

    @_unary
    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        return pb.ListResponse(seals=[seal_info_to_pb(info) for info in self._node.list_seals(request.session_id)])

    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.Event]:
        try:
            # is_active: stop polling once the client cancels or goes away.
            events = self._node.watch(request.session_id, keep_going=context.is_active)
        except Exception as exc:
            context.abort(*status_of(exc))
        for event in events:
            yield event_to_pb(event)


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
        holder_sessions=info.holder_sessions, revoked_reason=info.revoked_reason)


def grant_to_pb(grant: GrantDescriptor) -> pb.GrantDescriptor:
    return pb.GrantDescriptor(
        grant_id=grant.grant_id, remote_addr=grant.remote_addr, rkey=grant.rkey, offset=grant.offset,
        length=grant.length, access=grant.access, epoch=grant.epoch, expires_unix_ms=grant.expires_unix_ms,
        seal_id=grant.seal_id, write_alignment=grant.write_alignment)


def event_to_pb(event: Event) -> pb.Event:
    return pb.Event(kind=int(event.kind), seal_id=event.seal_id, grant_ids=event.grant_ids, reason=event.reason,
                    epoch=event.epoch, unix_ms=event.unix_ms)
