"""One client process of the soak (tests/soak/soak.py), run in the client namespace.

    ip netns exec client python tests/soak/worker.py ROLE NAME TARGET --seconds S

It connects (mutual TLS from RDAX_TLS_*), prints {"ev": "ready"}, waits for a line on stdin (the start, so
that every worker's window is the same), works for --seconds, prints its results as {"ev": "done", ...} and
closes its session. Events it prints on the way are JSON lines too, with CLOCK_MONOTONIC times (every
namespace of the guest shares that clock).

Roles:
- writer: seals soak/w-NAME, writes 64 KiB chunks through it in a circle, each made durable before the next
  (RDMA FLUSH, or every 8th by a node-side Commit), and records which write each chunk last acknowledged;
  the soak checks those bytes on the storage side at the end. Nothing breaks its file.
- victim: seals soak/v-NAME and writes with FLUSH until a breaker revokes the seal; prints "sealed" and
  "revoked" events (the soak times revocation from its break to the "revoked" event) and seals again.
- grants: Grant / Release of random small ranges of a file of its own, timing each call.
- seals: Seal(create) / Unseal of files of its own, timing each call.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import zlib

CHUNK = 64 << 10
FILE_LENGTH = 4 << 20
VICTIM_PAUSE = 0.2
COMMIT_EVERY = 8   # one durable write in 8 goes through Commit (node-side msync) instead of RDMA FLUSH


def seed_of(name: str, write_index: int) -> int:
    """The seed of the bytes of a writer's write number `write_index` (the soak recomputes it to check)."""
    return zlib.crc32(name.encode()) << 32 | write_index


def chunk_bytes(name: str, write_index: int) -> bytes:
    return random.Random(seed_of(name, write_index)).randbytes(CHUNK)


_print_lock = threading.Lock()


def emit(**event: object) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def writer(session, name: str, deadline: float, reconnect) -> dict:
    f = session.open(f"soak/w-{name}", FILE_LENGTH)
    f.size = FILE_LENGTH
    chunks = FILE_LENGTH // CHUNK
    acked: dict[int, int] = {}
    lat_us: list[float] = []
    i, errors = 0, []
    while time.monotonic() < deadline:
        slot = i % chunks
        data = chunk_bytes(name, i)
        t0 = time.perf_counter()
        try:
            if i % COMMIT_EVERY == COMMIT_EVERY - 1:
                f.write(slot * CHUNK, data)
                f.commit([(slot * CHUNK, CHUNK)])
            else:
                f.write(slot * CHUNK, data, flush=True)
        except Exception as exc:  # noqa: BLE001 - reported: a writer's file is never broken, any error counts
            errors.append(f"{type(exc).__name__}: {exc}")
            break
        lat_us.append((time.perf_counter() - t0) * 1e6)
        acked[slot] = i
        i += 1
    f.close()
    return {"acked": acked, "writes": len(lat_us), "acknowledged_bytes": len(lat_us) * CHUNK,
            "write_lat_us": lat_us, "errors": errors}


def victim(session, name: str, deadline: float, reconnect) -> dict:
    """Write until revoked, then seal again. A write in flight when the node deregisters its region makes the
    QP fail, and the node then ends the session (SESSION_ENDED): the victim opens a new one, as a client must."""
    from rdax.client import GrantRevoked, RdaxClientError, SessionLost

    path = f"soak/v-{name}"
    revoked = threading.Event()

    def on_revoke(event) -> None:
        if event.grant_ids:
            emit(ev="revoked", t=time.monotonic(), reason=event.reason, grant_ids=list(event.grant_ids))
        revoked.set()

    seals, writes, reconnects, errors, retries = 0, 0, 0, [], []
    abandoned, reconnect_s, write_fail_s = [], [], []
    session.on_revoke.append(on_revoke)
    while time.monotonic() < deadline:
        if session.lost is not None or session.conn.state() == "ERR":
            # The QP failed (a write met a deregistered region): the node ends such a session, so do not wait.
            # Destroying a QP after access errors took rxe ~40 s here, holding the GIL all along (pyverbs'
            # QP.close): the process would stand still. Its verbs objects are kept until the process exits.
            abandoned.append(session)
            session.channel.close()
            t0 = time.monotonic()
            session = reconnect()
            reconnect_s.append(round(time.monotonic() - t0, 2))
            session.on_revoke.append(on_revoke)
            reconnects += 1
        revoked.clear()
        try:
            f = session.open(path, 1 << 20)
        except SessionLost:
            continue
        except RdaxClientError as exc:
            # A breaker may be holding the file open this very moment, or the node just ended the session.
            retries.append(f"seal: {exc}")
            time.sleep(0.2)
            continue
        seals += 1
        emit(ev="sealed", t=time.monotonic(), seal_id=f.info.seal_id, grant_id=f.grant.grant_id)
        data = bytes(CHUNK)
        i = 0
        while time.monotonic() < deadline and not revoked.is_set():
            try:
                posted = time.monotonic()
                f.write((i % 16) * CHUNK, data, flush=True)
                writes += 1
                # A pause between writes: most breaks then find no write in flight and the QP survives them;
                # the rest meet a deregistered region, and the victim opens a new session.
                time.sleep(VICTIM_PAUSE)
            except (GrantRevoked, SessionLost):
                break
            except Exception as exc:  # noqa: BLE001 - an access error after a revocation is expected
                write_fail_s.append(round(time.monotonic() - posted, 2))   # how long the failing write took
                # Expected only when the node revoked the grant or ended the session: both are told on Watch.
                told_by = time.monotonic() + 5
                while not (revoked.is_set() or session.lost) and time.monotonic() < told_by:
                    time.sleep(0.05)
                if not (revoked.is_set() or session.lost):
                    errors.append(f"write: {type(exc).__name__}: {exc}")
                break
            i += 1
        try:
            f.close()
        except Exception:  # noqa: BLE001 - a revoked seal or an ended session has nothing left to let go
            pass
    return {"seals": seals, "writes": writes, "reconnects": reconnects, "reconnect_s": reconnect_s,
            "failed_write_s": write_fail_s, "errors": errors,
            "seal_retries": len(retries), "retry_reasons": retries[:5], "_session": session}


def grants(session, name: str, deadline: float, reconnect) -> dict:
    from rdax.v1 import rdax_pb2 as pb

    info = session.seal(f"soak/g-{name}", FILE_LENGTH)
    rng = random.Random(name)
    lat: dict[str, list[float]] = {"Grant": [], "Release": [], "Heartbeat": []}
    while time.monotonic() < deadline:
        offset = rng.randrange(FILE_LENGTH // 4096) * 4096
        length = min(rng.choice([4096, 16384, 65536]), FILE_LENGTH - offset)
        t0 = time.perf_counter()
        g = session.grant(info.seal_id, offset, length)
        t1 = time.perf_counter()
        session.release(g.grant_id)
        t2 = time.perf_counter()
        session.stub.Heartbeat(pb.HeartbeatRequest(session_id=session.session_id), timeout=30)
        t3 = time.perf_counter()
        lat["Grant"].append((t1 - t0) * 1e6)
        lat["Release"].append((t2 - t1) * 1e6)
        lat["Heartbeat"].append((t3 - t2) * 1e6)
    session.unseal(info.seal_id)
    return {"rpc_us": lat, "errors": []}


def seals(session, name: str, deadline: float, reconnect) -> dict:
    lat: dict[str, list[float]] = {"Seal": [], "Unseal": []}
    i = 0
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        info = session.seal(f"soak/s-{name}-{i % 4}", 1 << 20)
        t1 = time.perf_counter()
        session.unseal(info.seal_id)
        t2 = time.perf_counter()
        lat["Seal"].append((t1 - t0) * 1e6)
        lat["Unseal"].append((t2 - t1) * 1e6)
        i += 1
    return {"rpc_us": lat, "errors": []}


ROLES = {"writer": writer, "victim": victim, "grants": grants, "seals": seals}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("name")
    p.add_argument("target")
    p.add_argument("--seconds", type=float, required=True)
    args = p.parse_args()
    from rdax.client import connect

    def reconnect():
        return connect(args.target, client_id=f"soak-{args.role}-{args.name}")

    session = reconnect()
    emit(ev="ready", session=session.session_id[:4])
    sys.stdin.readline()   # the start
    deadline = time.monotonic() + args.seconds
    try:
        result = ROLES[args.role](session, args.name, deadline, reconnect)
    except Exception as exc:  # noqa: BLE001 - reported to the soak, which fails on it
        result = {"errors": [f"{type(exc).__name__}: {exc}"]}
    session = result.pop("_session", session)
    emit(ev="done", role=args.role, name=args.name, **result)
    session.close()


if __name__ == "__main__":
    main()
