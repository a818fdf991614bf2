"""The real fabric over rdax.rdma: one PD and one RC QP per session, one memory region per grant (pinned, ODP as
fallback; after the first refused pin, ODP straight away)."""
from __future__ import annotations

import contextlib
import errno

from rdax.rdma import (
    Access,
    ConnectError,
    Connection,
    Device,
    DeviceNotFound,
    EndpointInfo,
    MemoryRegion,
    RegistrationError,
    VerbsError,
    open_device,
    register,
)
from rdax.rdma.mr import RegistrationMemo

from .errors import InvalidArgument, RdaxError, ResourceExhausted, Unavailable
from .fabric_api import REQUIRED_MTU, Endpoint

QP_REMOTE_ACCESS = Access.WRITE | Access.READ | Access.ATOMIC | Access.FLUSH
# The node never posts work requests: its QP only answers the client's.
NODE_QP_DEPTH = 4


class RdmaChannel:
    """A session's PD and RC QP on the node's device, connected to the client's QP."""

    def __init__(self, device: Device, remote: Endpoint, mtu: int, memo: RegistrationMemo | None = None) -> None:
        self.memo = memo
        with contextlib.ExitStack() as undo:
            self.pd = device.alloc_pd()
            undo.callback(self.pd.close)
            self.connection = Connection(device, self.pd, depth=NODE_QP_DEPTH, remote_access=QP_REMOTE_ACCESS)
            undo.callback(self.connection.close)
            self.connection.connect(EndpointInfo(remote.qpn, remote.gid, remote.psn, remote.mtu), mtu=mtu)
            undo.pop_all()
        mine = self.connection.endpoint(self.connection.mtu)
        self.endpoint = Endpoint(mine.qpn, mine.gid, mine.psn, mine.mtu)

    def register(self, addr: int, length: int, access: int) -> MemoryRegion:
        try:
            return register(self.pd, addr, length, Access(access), memo=self.memo)
        except VerbsError as exc:
            raise service_error(exc, "registering the grant's memory region") from exc

    def failed(self) -> bool:
        """Whether the QP went to the error state (a remote access error, a broken peer): it carries nothing more."""
        # timeout 0: a QP the teardown thread is destroying (which can take rxe long) is not the reaper's to wait for;
        # CLOSED and CLOSING are not failures.
        try:
            return self.connection.state(timeout=0) in ("ERR", "SQE")
        except VerbsError:
            return False

    def close(self) -> None:
        # QP and CQ before the PD they live in; pyverbs closes remaining MRs with the PD.
        self.connection.close()
        self.pd.close()


class RdmaFabric:
    """The node's RDMA device, chosen by name or by IP address, and the channels opened on it."""

    def __init__(self, device: str | None = None, ip: str | None = None, mtu: int = REQUIRED_MTU) -> None:
        self.device = open_device(name=device, ip=ip)
        self.mtu = mtu
        self.registrations = RegistrationMemo()   # shared by every channel: one pinned probe per node

    def open_channel(self, remote: Endpoint) -> RdmaChannel:
        try:
            return RdmaChannel(self.device, remote, self.mtu, self.registrations)
        except ConnectError as exc:
            raise InvalidArgument(
                f"cannot connect the node's QP to the client's endpoint (qpn {remote.qpn}, gid {remote.gid}): "
                f"{exc}; check what the client sent") from exc
        except VerbsError as exc:
            raise service_error(exc, "opening the session's PD and QP") from exc

    def close(self) -> None:
        self.device.close()


def service_error(exc: VerbsError, doing: str) -> RdaxError:
    """A verbs failure as the error a client sees, with the failing call in the message."""
    out_of_memory = exc.errno in (errno.ENOMEM, errno.EAGAIN) or "Cannot allocate memory" in str(exc)
    if out_of_memory:
        return ResourceExhausted(f"{doing} failed, the node is out of RDMA resources: {exc}; release grants or "
                                 f"sessions, or raise the node's locked-memory limit")
    if isinstance(exc, DeviceNotFound):
        return Unavailable(f"{doing} failed, the node's RDMA device is gone: {exc}")
    if isinstance(exc, RegistrationError):
        return RdaxError(f"{doing} failed: {exc}")
    return Unavailable(f"{doing} failed: {exc}")
