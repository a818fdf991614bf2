"""The soak's short version (issue 11 §3; `make soak` is the long one with figures): writers, victims whose
files are broken on a schedule, Grant/Release and Seal/Unseal churn, all at once against one node."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "soak"))

import soak  # noqa: E402


def test_soak_many_clients_breakers_and_churn_lose_nothing_and_leak_nothing(lab):
    r = soak.run(lab, writers=3, victims=3, granters=1, sealers=1, seconds=40, break_every=1.5,
                 logs=Path("results/soak-test-logs"), perftest=False)
    # Its logs and its report stay in results/soak-test-logs for whoever reads a failure.
    (Path("results/soak-test-logs") / "soak.json").write_text(json.dumps(r, indent=2))
    assert r["client_errors"] == {}, r["client_errors"]
    # Nothing acknowledged lost or misplaced: every writer's file checked chunk by chunk on the storage side.
    assert r["acknowledged_bytes"] > 0 and r["chunks_checked"] > 0
    assert r["acknowledged_bytes_lost"] == 0 and r["acknowledged_bytes_misplaced"] == 0, r["writers"]
    # Every break revoked, by every kind of breaker, and the victims told.
    assert r["breaks"] >= 3, r["breaks"]
    assert r["breaks_not_revoked"] == []
    assert r["revocations"] == r["breaks"]
    assert all(v["count"] > 0 for v in r["revocation_ms_by_kind"].values()), r["revocation_ms_by_kind"]
    # The control plane kept answering through it all.
    assert {"Grant", "Release", "Heartbeat", "Seal", "Unseal"} <= set(r["rpc_us"]), r["rpc_us"]
    assert all(v["count"] > 10 for v in r["rpc_us"].values()), r["rpc_us"]
    # The node is back where it started: no QP, CQ, PD or MR left behind, no descriptor, no runaway memory.
    assert r["node"]["alive_at_end"]
    assert r["rdma_res_leaked"] == 0, r["node"]
    assert r["fds_leaked"] <= 0, r["node"]
    assert r["rss_growth_mb"] < 64, r["node"]
