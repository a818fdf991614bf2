"""What the power-loss writer (writer.py) and checker (check.py) share: the bytes of every write and the log.

Every write is 8-byte words: 4 pseudo-random bytes (seeded by the run, the file and the write's sequence
number) and a 4-byte tag, (file number + 1) << 24 | sequence number. So the bytes of one write are the
same for the writer and the checker, and bytes that belong to another file, another write or another place
never look like the right ones.

The log (one JSON object a line, fsynced after each) says, in order:
  {"type": "start", "seed": S, "files": [{"file": k, "path": P, "length": L}, ...]}
  {"type": "intent", "seq": s, "file": k, "offset": o, "length": n, "how": "flush"|"commit"|"none"}  before
  {"type": "ack", "seq": s, "file": k, "path": P, "offset": o, "length": n, "sha256": H, "how": ...}
                                after the node acknowledged it (FLUSH completed, or Commit returned; "none":
                                the RDMA WRITE completed, which promises no durability, logged for comparison)
The writer has one write outstanding at a time, so at most one write (the last intent without an ack) was
in flight when the power went.
"""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path

ALIGN = 4096


def write_bytes(seed: int, file: int, seq: int, length: int) -> bytes:
    """The `length` bytes (a multiple of 8) of write `seq` to file `file`."""
    words = length // 8
    noise = random.Random(f"{seed}/{file}/{seq}").randbytes(4 * words)
    tag = struct.pack("<I", ((file + 1) << 24) | (seq & 0xFFFFFF)) * words
    out = bytearray(length)
    for lane in range(4):
        out[lane::8] = noise[lane::4]
        out[4 + lane::8] = tag[lane::4]
    return bytes(out)


def read_log(path: Path) -> list[dict]:
    """The log's complete lines (a line cut short by the power cut is left out)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out
