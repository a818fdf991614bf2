"""Prometheus metrics of a storage node: what it holds, what it did, how long it took (--metrics-listen)."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .node import Node

# RPCs take milliseconds; revocations should take less than 100 ms (README).
_RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_REVOKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class NodeMetrics:
    """The node's counters and histograms, in a registry of its own (one per node, so tests can read them)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.seals = Counter("rdax_seals", "Seals made (joined: a session joined a live seal)", ["kind"], registry=r)
        self.grants = Counter("rdax_grants", "Grants handed out", registry=r)
        self.releases = Counter("rdax_releases", "Grants given back by their client", registry=r)
        self.revocations = Counter("rdax_revocations", "Seals or grants revoked, by cause", ["reason"], registry=r)
        self.revocation_seconds = Histogram(
            "rdax_revocation_seconds", "Time to revoke a seal: stop grants, deregister, unmap, release the lease",
            buckets=_REVOKE_BUCKETS, registry=r)
        self.rpc_seconds = Histogram("rdax_rpc_seconds", "gRPC call latency on the node", ["method", "code"],
                                     buckets=_RPC_BUCKETS, registry=r)
        self.lease_breaks = Counter("rdax_lease_breaks", "Seals revoked because their write lease broke", registry=r)
        self.fanotify_events = Counter("rdax_fanotify_events", "fanotify events on sealed files", registry=r)
        self.audit_runs = Counter("rdax_audit_runs", "FIEMAP audits of every live seal", registry=r)
        self.audit_seconds = Histogram("rdax_audit_seconds", "Duration of one FIEMAP audit pass",
                                       buckets=_REVOKE_BUCKETS, registry=r)
        self.violations = Counter("rdax_violations", "Sessions ended by a QP in the error state",
                                  ["excused"], registry=r)
        self.canary_ok = Gauge("rdax_canary_ok", "1 if the start-up canary's bytes landed intact", registry=r)
        self.write_alignment = Gauge("rdax_write_alignment_bytes",
                                     "Where RDMA WRITEs must start (multiples of this), measured by the canary",
                                     registry=r)

    def watch(self, node: Node) -> None:
        """Report the node's live sessions, seals, grants and registered bytes on every scrape."""
        self.registry.register(_NodeState(node))

    def serve(self, address: str) -> None:
        """Serve /metrics over plaintext HTTP on HOST:PORT (only when the operator names it: --metrics-listen)."""
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)


class _NodeState(Collector):
    """Gauges read from the node at scrape time (a count under its lock: no per-object work)."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._node.state_counts()
        for name, help_text in (("sessions", "Live sessions"), ("seals", "Live (SEALED) seals"),
                                ("grants", "Live grants"), ("registered_bytes", "Bytes under live grants")):
            yield GaugeMetricFamily(f"rdax_live_{name}", help_text, value=state[name])

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


class JsonFormatter(logging.Formatter):
    """--log-format json: one JSON object per log line, for collectors."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))
