"""Lab: the node's Prometheus metrics after a put and a revocation (--metrics-listen)."""
from __future__ import annotations

import random
import re
import urllib.request

import pytest
from conftest import Client, Server

MiB = 1 << 20


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=20).read().decode()
    # Label values may hold spaces (reason="lease break"): the value is what follows the last space.
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([^#].*) (\S+)$", text, re.M)}


@pytest.fixture
def metered(lab, export_root, pki):
    port = 8100 + random.randrange(100)
    server = Server(lab, export_root, 7500 + random.randrange(90), "--metrics-listen",
                    f"{lab['RDAX_STORAGE_IP']}:{port}", pki=pki)
    server.metrics_url = f"http://{lab['RDAX_STORAGE_IP']}:{port}/metrics"
    yield server
    server.stop()


def test_metrics_move_after_a_put_and_a_revocation(lab, metered, pki):
    before = scrape(metered.metrics_url)
    assert before["rdax_canary_ok"] == 1 and before["rdax_write_alignment_bytes"] == 4096
    client = Client(lab, metered.target, pki)
    try:
        assert client.call("open", name="f", path="metered", length=4 * MiB)["ok"]
        assert client.call("write", name="f", offset=0, length=4 * MiB, seed=3, flush=True)["ok"]
        live = scrape(metered.metrics_url)
        assert live["rdax_live_sessions"] == 1 and live["rdax_live_grants"] == 1
        assert live["rdax_live_registered_bytes"] == 4 * MiB
        with open(metered.root / "metered", "rb"):   # a lease breaker
            pass
        assert client.call("revoked", name="f")["revoked"]
        after = scrape(metered.metrics_url)
    finally:
        client.close()
    assert after["rdax_grants_total"] - before.get("rdax_grants_total", 0) == 1
    # Another process's open() is seen by the lease (SIGIO) and by fanotify (OPEN): whichever comes first revokes.
    revoked = {k: v for k, v in after.items() if k.startswith("rdax_revocations_total{")}
    assert sum(revoked.values()) == 1 and set(revoked) <= {'rdax_revocations_total{reason="lease break"}',
                                                          'rdax_revocations_total{reason="seal broken"}'}, revoked
    assert after["rdax_revocation_seconds_count"] == 1 and after["rdax_revocation_seconds_sum"] < 1.0
    assert after['rdax_rpc_seconds_count{code="OK",method="Grant"}'] == 1
    assert after['rdax_rpc_seconds_count{code="OK",method="OpenSession"}'] == 1
    assert after["rdax_live_grants"] == 0
    assert after.get("rdax_lease_breaks_total", 0) + after.get("rdax_fanotify_events_total", 0) >= 1
