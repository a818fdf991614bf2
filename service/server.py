"""Build, run and drain the gRPC server of a storage node: the Rdax service, health and reflection."""
from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rdax.v1 import rdax_pb2, rdax_pb2_grpc

from .node import Node
from .servicer import RdaxServicer

log = logging.getLogger("rdax.service")

SERVICE_NAME = rdax_pb2.DESCRIPTOR.services_by_name["Rdax"].full_name
# Every Watch stream holds a worker for its whole life: leave room for them.
DEFAULT_WORKERS = 64


def create_server(address: str, node: Node, health_servicer: health.HealthServicer | None = None,
                  max_workers: int = DEFAULT_WORKERS) -> tuple[grpc.Server, int]:
    """A server (not started) with Rdax, health (SERVING) and reflection, bound to `address`; returns it and the bound port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rdax-rpc"))
    rdax_pb2_grpc.add_RdaxServicer_to_server(RdaxServicer(node), server)
    health_servicer = health_servicer or health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:   # older grpcio reports a failed bind this way
        raise OSError(f"cannot listen on {address}: the address is in use or not local")
    return server, port


def drain(server: grpc.Server, node: Node, health_servicer: health.HealthServicer, grace: float = 5.0) -> None:
    """NOT_SERVING first (load balancers stop sending), then revoke everything, then stop taking calls."""
    health_servicer.enter_graceful_shutdown()
    node.shutdown()   # ends every Watch stream, so stop() need not wait out their grace
    server.stop(grace).wait()


def serve(node: Node, address: str, stop: threading.Event, on_ready: Callable[[str], None] = print,
          grace: float = 5.0) -> None:
    """Serve `node` on `address` until `stop` is set, then drain; on_ready gets 'HOST:PORT' once calls are taken."""
    health_servicer = health.HealthServicer()
    server, port = create_server(address, node, health_servicer)
    server.start()
    on_ready(f"{address.rsplit(':', 1)[0]}:{port}")
    try:
        while not stop.wait(1.0):   # a timeout keeps the main thread responsive to signals
            pass
    finally:
        log.info("draining")
        drain(server, node, health_servicer, grace)
