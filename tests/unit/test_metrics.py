"""Tests for service.metrics: the numbers a Prometheus scrape sees move as the node works."""
from __future__ import annotations

import socket
import urllib.request

from conftest import CLIENT_ENDPOINT, MIB, PAGE, FakeFabric, open_from_another_process

from rdax.service.metrics import NodeMetrics
from rdax.service.node import Node


def value(metrics: NodeMetrics, name: str, **labels: str) -> float:
    got = metrics.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_metrics_follow_seal_grant_release_and_revocation(make_node, export_root, fabric: FakeFabric) -> None:
    metrics = NodeMetrics()
    node: Node = make_node(metrics=metrics)
    sid = node.open_session("c", CLIENT_ENDPOINT).session_id
    seal = node.seal(sid, "f", MIB, create=True).seal_id
    node.seal(sid, "f", MIB)
    grant = node.grant(sid, seal, 0, 2 * PAGE, 3)
    node.grant(sid, seal, 2 * PAGE, PAGE, 1)
    assert value(metrics, "rdax_seals_total", kind="new") == 1
    assert value(metrics, "rdax_grants_total") == 2
    assert value(metrics, "rdax_live_grants") == 2 and value(metrics, "rdax_live_registered_bytes") == 3 * PAGE
    assert value(metrics, "rdax_live_sessions") == 1 and value(metrics, "rdax_live_seals") == 1
    node.release(sid, grant.grant_id)
    assert value(metrics, "rdax_releases_total") == 1 and value(metrics, "rdax_live_grants") == 1
    assert open_from_another_process(export_root / "f", block=True).returncode == 0   # a lease breaker
    assert value(metrics, "rdax_revocations_total", reason="lease break") == 1
    assert value(metrics, "rdax_lease_breaks_total") == 1
    assert value(metrics, "rdax_revocation_seconds_count") == 1
    assert value(metrics, "rdax_live_seals") == 0 and value(metrics, "rdax_live_grants") == 0


def test_metrics_served_over_http(make_node) -> None:
    metrics = NodeMetrics()
    make_node(metrics=metrics)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics.serve(f"127.0.0.1:{port}")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "rdax_live_sessions 0.0" in text and "rdax_revocation_seconds_bucket" in text
