"""Build, run and drain the gRPC server of a storage node: the Rdax service, health and reflection, over mutual TLS;
and, when asked for by name, a plaintext listener that serves the health service and nothing else (for probes that
cannot present a client certificate, such as kubelet's gRPC probe).

The server is grpc.aio on an event loop of its own thread: unary calls run in a bounded thread pool, Watch streams
wait on the loop and hold no thread, so hundreds of streams cannot take the workers other clients need.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rdax.v1 import rdax_pb2, rdax_pb2_grpc

from .limits import MAX_REQUEST_BYTES
from .node import Node
from .servicer import RdaxServicer

log = logging.getLogger("rdax.service")
T = TypeVar("T")

SERVICE_NAME = rdax_pb2.DESCRIPTOR.services_by_name["Rdax"].full_name
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Unary calls only: Watch streams wait on the event loop, not in a worker.
DEFAULT_WORKERS = 32
# The plaintext health listener: anyone who reaches it may call it, so it takes little and holds little.
HEALTH_MAX_RPCS = 64
HEALTH_MAX_REQUEST_BYTES = 1024


class NodeServer:
    """The node's gRPC server on its own event-loop thread; start(), set_serving(), stop() from any other thread.

    `credentials`: grpc.ServerCredentials (mutual TLS, see tls.ServerTls), or None for plaintext, which is only
    for a node started with --insecure (every caller is then 'anonymous').
    `health_address`: also serve grpc.health.v1 — only it, with the same statuses — in plaintext there.
    """

    def __init__(self, address: str, node: Node, credentials: grpc.ServerCredentials | None,
                 max_workers: int = DEFAULT_WORKERS, health_address: str | None = None) -> None:
        self.address = address
        self._node = node
        self._credentials = credentials
        self._max_workers = max_workers
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rdax-grpc", daemon=True)
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self.port = 0
        self.health_address = health_address
        self._health_server: grpc.aio.Server | None = None
        self.health_port = 0

    def start(self) -> int:
        """Bind and start serving; returns the bound port. OSError if the address cannot be bound."""
        self._thread.start()
        self.port = self._run(self._start())
        return self.port

    async def _start(self) -> int:
        self._server = grpc.aio.server(
            migration_thread_pool=futures.ThreadPoolExecutor(self._max_workers, thread_name_prefix="rdax-rpc"),
            # A request is a few hundred bytes; nothing a client sends needs more (a 4 MiB path is refused here).
            options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
        rdax_pb2_grpc.add_RdaxServicer_to_server(RdaxServicer(self._node, insecure=self._credentials is None),
                                                 self._server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME), self._server)
        try:
            if self._credentials is None:
                port = self._server.add_insecure_port(self.address)
            else:
                port = self._server.add_secure_port(self.address, self._credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.address}: {exc}") from exc
        if port == 0:
            raise OSError(f"cannot listen on {self.address}: the address is in use or not local")
        await self._server.start()
        if self.health_address is not None:
            try:
                self.health_port = await self._start_health_only(self._health, self.health_address)
            except OSError:
                await self._server.stop(None)
                raise
        return port

    async def _start_health_only(self, servicer: health.aio.HealthServicer, address: str) -> int:
        """A second server, plaintext, with the health servicer only (no Rdax, no reflection): what it answers is
        exactly what the main port's health service answers, because it is the same servicer."""
        self._health_server = grpc.aio.server(
            maximum_concurrent_rpcs=HEALTH_MAX_RPCS,
            options=[("grpc.max_receive_message_length", HEALTH_MAX_REQUEST_BYTES)])
        health_pb2_grpc.add_HealthServicer_to_server(servicer, self._health_server)
        try:
            port = self._health_server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.health_address} (health): {exc}") from exc
        if port == 0:
            raise OSError(f"cannot listen on {self.health_address} (health): the address is in use or not local")
        await self._health_server.start()
        return port

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        servicer = self._health
        assert servicer is not None, "set_serving() before start()"
        for service in ("", SERVICE_NAME):
            self._run(servicer.set(service, status))

    def health_status(self, service: str = "") -> int:
        """The health status the server answers for `service` (tests)."""
        servicer = self._health
        assert servicer is not None, "health_status() before start()"

        async def check() -> int:
            request = health_pb2.HealthCheckRequest(service=service)
            status: int = (await servicer.Check(request, None)).status   # (Check reads nothing from its context)
            return status
        return self._run(check())

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop taking calls, give running ones `grace` seconds, then stop the loop's thread."""
        if self._server is not None and self._thread.is_alive():
            self._run(self._server.stop(grace))
        # The health listener last: probes see NOT_SERVING for as long as the node drains.
        if self._health_server is not None and self._thread.is_alive():
            self._run(self._health_server.stop(None))
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()


def create_server(address: str, node: Node, credentials: grpc.ServerCredentials | None = None,
                  max_workers: int = DEFAULT_WORKERS, health_address: str | None = None) -> NodeServer:
    """A server (not started) with Rdax, health (SERVING) and reflection for `address`; with `health_address`,
    also a plaintext health-only listener there."""
    return NodeServer(address, node, credentials, max_workers, health_address=health_address)


def drain(server: NodeServer, node: Node, grace: float = 5.0) -> None:
    """NOT_SERVING first (load balancers stop sending), then revoke everything, then stop taking calls."""
    server.set_serving(False)
    node.shutdown()   # ends every Watch stream, so stop() need not wait out their grace
    server.stop(grace)


def serve(node: Node, address: str, stop: threading.Event, credentials: grpc.ServerCredentials | None = None,
          on_ready: Callable[[str], None] = print, grace: float = 5.0,
          on_reload: Callable[[], None] | None = None, reload: threading.Event | None = None,
          health_address: str | None = None, on_health_ready: Callable[[str], None] | None = None) -> None:
    """Serve `node` on `address` until `stop` is set, then drain; on_ready gets 'HOST:PORT' once calls are taken.

    Each time `reload` is set (SIGHUP), on_reload() runs on this thread and `reload` is cleared.
    With `health_address`, grpc.health.v1 alone is also served there in plaintext (on_health_ready gets its
    'HOST:PORT' before on_ready is called).
    """
    server = create_server(address, node, credentials, health_address=health_address)
    port = server.start()
    if health_address is not None and on_health_ready is not None:
        on_health_ready(f"{health_address.rsplit(':', 1)[0]}:{server.health_port}")
    on_ready(f"{address.rsplit(':', 1)[0]}:{port}")
    try:
        while not stop.wait(0.5):   # a timeout keeps the main thread responsive to signals
            if reload is not None and reload.is_set():
                reload.clear()
                if on_reload is not None:
                    on_reload()
    finally:
        log.info("draining")
        drain(server, node, grace)
