"""Lab: docs/protocol.md kept honest by a client written against it alone (tests/lab/guide_client.py: raw pyverbs,
grpc and the generated stubs, in the client namespace), against a real rdax-server over mutual TLS."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from pki import client_env

HERE = Path(__file__).parent
MiB = 1 << 20
WRITE, FLUSH = 1, 8


def guide_client(lab, server, *args: str, timeout: float = 300) -> dict:
    """Run guide_client.py in the client namespace as the lab identity; its JSON answer."""
    env = client_env(server.pki, "lab")
    run = subprocess.run(["ip", "netns", "exec", lab["RDAX_CLIENT_NS"], sys.executable, str(HERE / "guide_client.py"),
                          "--target", server.target, "--ip", lab["RDAX_CLIENT_IP"], *args],
                         capture_output=True, text=True, timeout=timeout, env=env)
    lines = run.stdout.strip().splitlines()
    assert lines, f"guide_client printed nothing (exit {run.returncode}):\n{run.stderr}"
    answer = json.loads(lines[-1])
    assert answer["ok"] and run.returncode == 0, f"{answer}\n{run.stderr}"
    return answer


def put_and_check(lab, server, tmp_path, remote: str, length: int, gid_form: str) -> dict:
    data = os.urandom(length)
    src = tmp_path / "src"
    src.write_bytes(data)
    (server.root / "guide").mkdir(exist_ok=True)   # the guide: parent directories must exist
    r = guide_client(lab, server, "put", str(src), remote, "--gid-form", gid_form)
    sealed = -(-length // 4096) * 4096

    # The session: the node's endpoint in the forms the guide promises.
    assert r["node_endpoint"]["mtu"] == 4096, r
    gid = r["node_endpoint"]["gid"]
    assert len(gid) == 39 and gid.count(":") == 7, f"the node's GID is not fully expanded: {gid}"
    assert r["lease_seconds"] == r["heartbeat_lease"] == 30, r
    # The seal and the grant as the guide describes them.
    assert r["seal"]["length"] == sealed and r["seal"]["epoch"] == 1 and r["seal"]["state"] == "SEALED", r
    assert r["seal"]["holder_count"] == 1 and r["seal"]["owner_is_me"], r
    g = r["grant"]
    assert g["offset"] == 0 and g["length"] == sealed and g["access"] == WRITE | FLUSH and g["epoch"] == 1, g
    assert g["write_alignment"] == 4096 and g["remote_addr_aligned"] and g["expires_unix_ms"] == 0, g
    assert r["written"] == length and r["commit_bytes"] == length, r
    assert r["stat"]["grant_ids"] == [g["grant_id"]] and r["seal"]["seal_id"] in r["listed"], r
    # Release changes no epoch; the last holder's Unseal revokes the seal (epoch 2) and forgets it.
    assert r["stat_after_release"]["grant_ids"] == [] and r["stat_after_release"]["epoch"] == 1, r
    assert r["unseal_epoch"] == 2 and r["stat_after_unseal"] == "NOT_FOUND", r
    # Watch: the only event is the REVOKED its own Unseal caused; CloseSession ends the stream cleanly.
    assert [(ev["kind"], ev["reason"], ev["epoch"]) for ev in r["events"]] == [("REVOKED", "unseal", 2)], r
    assert r["watch_end"] == "OK" and "close_error" not in r, r
    assert r["heartbeat_after_close"] == "NOT_FOUND", r

    # The bytes, read through the filesystem only now: the client unsealed and closed (reading a sealed file
    # would break its lease).
    on_disk = (server.root / remote).read_bytes()
    assert len(on_disk) == sealed
    assert hashlib.sha256(on_disk[:length]).hexdigest() == r["sha256"] == hashlib.sha256(data).hexdigest()
    assert on_disk[length:] == bytes(sealed - length), "bytes past the data are not zero"
    return r


def test_protocol_guide_client_puts_a_file_with_write_and_flush(lab, server, tmp_path):
    # A few MiB and a tail that is not a whole page: several 1 MiB WRITEs, one FLUSH behind them.
    r = put_and_check(lab, server, tmp_path, "guide/blob", 3 * MiB + 12345, "expanded")
    assert r["sent_gid"].startswith("0000:0000:0000:0000:0000:ffff:"), r


def test_protocol_guide_client_compressed_ipv4_mapped_gid(lab, server, tmp_path):
    r = put_and_check(lab, server, tmp_path, "guide/compressed", MiB, "compressed")
    assert r["sent_gid"] == f"::ffff:{lab['RDAX_CLIENT_IP']}", r


def test_protocol_guide_client_bad_endpoint_bad_flow(lab, server):
    cases = [{"gid": "not-a-gid"}, {"gid": "10.77.0.2"}, {"mtu": 5000}, {"mtu": 1024}, {}]
    r = guide_client(lab, server, "probe", "--cases", json.dumps(cases))
    bad_gid, bare_ipv4, mtu_5000, mtu_1024, good = r["results"]
    for answer in (bad_gid, bare_ipv4):
        assert answer["code"] == "INVALID_ARGUMENT", answer
        assert "is not a GID in IPv6 notation" in answer["details"] and "::ffff:10.77.0.2" in answer["details"], answer
    assert mtu_5000["code"] == "INVALID_ARGUMENT", mtu_5000
    assert "not an RDMA path MTU" in mtu_5000["details"] and "mtu=4096" in mtu_5000["details"], mtu_5000
    # A real MTU below 4096 is refused differently: the guide says why (rxe ODP loses data below it).
    assert mtu_1024["code"] == "FAILED_PRECONDITION" and "4096" in mtu_1024["details"], mtu_1024
    # The same endpoint with nothing overridden is taken.
    assert good["code"] == "OK" and good["node_gid"].count(":") == 7, good


def test_protocol_guide_client_handles_a_revocation_and_atomic_writes(lab, server, tmp_path):
    """guide 8.2: the seal is broken on the node while the client holds a grant; the client hears REVOKED, finds the
    seal REVOKED (Grant and Commit refused, the grant not releasable), unseals it, seals the path again, and
    ATOMIC_WRITEs 8 bytes at a page start and inside a page (guide 5.4)."""
    length = MiB
    data = os.urandom(length)
    src = tmp_path / "src"
    src.write_bytes(data)
    (server.root / "guide").mkdir(exist_ok=True)
    atomic_at = [4096, 8192 + 64]
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab["RDAX_CLIENT_NS"], sys.executable, str(HERE / "guide_client.py"),
         "--target", server.target, "--ip", lab["RDAX_CLIENT_IP"], "revoke", str(src), "guide/revoked",
         "--atomic-at", *map(str, atomic_at)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env(server.pki, "lab"))
    try:
        first = proc.stdout.readline()
        assert first, f"guide_client died (exit {proc.wait()}):\n{proc.stderr.read()}"
        assert json.loads(first)["phase"] == "sealed", first
        # The breaker: another process opens the sealed file. Its open returns once the grants are deregistered.
        with open(server.root / "guide/revoked", "rb") as f:
            f.read(4096)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    r = json.loads(out.strip().splitlines()[-1])
    assert r["ok"] and proc.returncode == 0, f"{r}\n{err}"

    stat = r["stat_revoked"]
    assert stat["state"] == "REVOKED" and stat["epoch"] == 2 and stat["grant_ids"] == [], stat
    assert stat["holder_count"] == 1, stat
    assert r["revoked_reason"].startswith(("lease break", "seal broken")), r
    assert r["grant_on_revoked"] == "FAILED_PRECONDITION" and r["commit_on_revoked"] == "FAILED_PRECONDITION", r
    assert r["release_revoked"] == "NOT_FOUND", r
    # Unsealing a REVOKED seal changes no epoch and sends no event.
    assert r["unseal_revoked_epoch"] == 2, r
    again = r["resealed"]
    assert again["seal_id"] != r["seal"]["seal_id"] and again["epoch"] == 1 and again["state"] == "SEALED", r
    g2 = r["grant2"]
    assert g2["access"] == 1 | 4 | 8 and g2["epoch"] == 1, g2
    events = [(ev["kind"], ev["seal_id"], ev["grant_ids"], ev["epoch"]) for ev in r["events"]]
    assert events == [("REVOKED", r["seal"]["seal_id"], [r["grant"]["grant_id"]], 2),
                      ("REVOKED", again["seal_id"], [g2["grant_id"]], 2)], r["events"]
    assert r["events"][0]["reason"] == r["revoked_reason"] and r["events"][1]["reason"] == "unseal", r["events"]
    assert r["unseal_epoch"] == 2 and r["watch_end"] == "OK", r

    # The file: the data the first seal's WRITE + FLUSH put there, with the 8-byte atomics over it.
    want = bytearray(data)
    for atomic in r["atomics"]:
        want[atomic["offset"]:atomic["offset"] + 8] = bytes.fromhex(atomic["value"])
    got = (server.root / "guide/revoked").read_bytes()
    for atomic in r["atomics"]:
        o = atomic["offset"]
        assert got[o:o + 8].hex() == atomic["value"], (
            f"ATOMIC_WRITE at {o} did not land there (page start holds {got[o & ~4095:(o & ~4095) + 8].hex()})")
    assert got == bytes(want)
