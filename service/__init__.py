"""rdax.service: the storage node — seals, grants, revocation and the gRPC servicer."""
# Only the gRPC-free core is re-exported: rdax.service.server and .servicer
# import grpc, rdax.service.fabric and .canary import pyverbs (lab only).
from .errors import RdaxError
from .fabric_api import Channel, Endpoint, Fabric, Region
from .grants import GrantDescriptor
from .node import Node, OpenedSession
from .seals import SealInfo
from .sessions import Event, EventKind

__all__ = [
    "Channel", "Endpoint", "Event", "EventKind", "Fabric", "GrantDescriptor", "Node", "OpenedSession",
    "RdaxError", "Region", "SealInfo",
]
