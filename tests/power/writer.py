"""The power-loss writer, in the lab's client namespace (RDAX_TLS_* in the environment): seal a few files on
the node and write random ranges into them, each made durable by the node's acknowledgement, logging every
write before it is posted and every acknowledgement after it arrives (powerkit.py describes the log), until
the power goes (or --seconds pass).

    ip netns exec client python tests/power/writer.py --target 10.77.0.1:7710 --log L --prefix r0 --seed 7
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from powerkit import ALIGN, write_bytes

from rdax.client import connect


class Log:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def put(self, **record) -> None:
        """One line, one write(2), then fsync: on the 9p share it is on the host when this returns."""
        os.write(self.fd, (json.dumps(record) + "\n").encode())
        os.fsync(self.fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("--prefix", required=True, help="the files are PREFIX/f0, PREFIX/f1, ... beneath the export root")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--files", type=int, default=3)
    ap.add_argument("--length", type=int, default=8 << 20)
    ap.add_argument("--min-write", type=int, default=64 << 10)
    ap.add_argument("--max-write", type=int, default=1 << 20)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--go", type=Path, help="wait for this file (the node is up) before connecting")
    args = ap.parse_args()

    # Started with the node, so that this process's imports overlap the node's start-up.
    deadline = time.monotonic() + 300
    while args.go and not args.go.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    rng = random.Random(args.seed)
    log = Log(args.log)
    session = connect(args.target)
    files = [session.open(f"{args.prefix}/f{k}", args.length) for k in range(args.files)]   # Seal + Grant
    log.put(type="start", seed=args.seed, t=time.time(),
            files=[{"file": k, "path": f"{args.prefix}/f{k}", "length": args.length} for k in range(args.files)])
    print(f"writer: {args.files} files of {args.length} bytes sealed, writing", flush=True)

    deadline = time.monotonic() + args.seconds
    seq = 0
    while time.monotonic() < deadline:
        k = rng.randrange(args.files)
        n = rng.randrange(args.min_write, args.max_write + 1, ALIGN)
        offset = rng.randrange(0, args.length - n + 1, ALIGN)
        # "none": the RDMA WRITE's completion alone, neither FLUSH nor Commit: not a durability promise, logged to
        # show what the emulation cannot tell apart (README: "Power loss").
        how = rng.choice(("flush", "commit", "flush", "commit", "none"))
        data = write_bytes(args.seed, k, seq, n)
        log.put(type="intent", seq=seq, file=k, offset=offset, length=n, how=how)
        if how == "flush":
            files[k].write(offset, data, flush=True)       # RDMA WRITE + FLUSH(persistent): durable on completion
        elif how == "none":
            files[k].write(offset, data)                   # completed: landed in the node's memory, no more
        else:
            files[k].write(offset, data)                   # RDMA WRITE, then the node msyncs (Commit)
            files[k].commit([(offset, n)])
        log.put(type="ack", seq=seq, file=k, path=f"{args.prefix}/f{k}", offset=offset, length=n,
                sha256=hashlib.sha256(data).hexdigest(), how=how)
        seq += 1
    print(f"writer: {seq} writes acknowledged and the power is still on after {args.seconds} s", flush=True)
    session.close()


if __name__ == "__main__":
    main()
