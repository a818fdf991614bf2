"""The power-loss checker (check.py) on made-up rounds, without the lab: it accepts what a power cut may
leave and refuses what it may not, so a lab round that passes means something."""
from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from check import check
from powerkit import ALIGN, write_bytes

LENGTH = 2 << 20
SEED = 7


def make_round(root: Path, damage=None, writes: int = 25) -> Path:
    """A round of `writes` writes to three files, the last one cut in flight (nothing of it landed), written as
    the writer would have left it; `damage(files, intents)` changes the files before they are saved."""
    rng = random.Random(SEED)
    files = [bytearray(LENGTH) for _ in range(3)]
    lines: list[dict] = [{"type": "start", "seed": SEED,
                          "files": [{"file": k, "path": f"r0/f{k}", "length": LENGTH} for k in range(3)]}]
    intents = []
    for seq in range(writes):
        k = rng.randrange(3)
        n = rng.randrange(64 << 10, (512 << 10) + 1, ALIGN)
        o = rng.randrange(0, LENGTH - n + 1, ALIGN)
        how = ("flush", "commit")[seq % 2]
        data = write_bytes(SEED, k, seq, n)
        intent = {"type": "intent", "seq": seq, "file": k, "offset": o, "length": n, "how": how}
        lines.append(intent)
        intents.append(intent)
        if seq == writes - 1:
            break   # in flight at the cut
        files[k][o:o + n] = data
        lines.append({"type": "ack", "seq": seq, "file": k, "path": f"r0/f{k}", "offset": o, "length": n,
                      "sha256": hashlib.sha256(data).hexdigest(), "how": how})
    if damage:
        damage(files, intents)
    (root / "r0").mkdir(parents=True)
    for k in range(3):
        (root / "r0" / f"f{k}").write_bytes(files[k])
    log = root / "log.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"type": "ack", "se')  # a cut line
    return log


def run(tmp_path: Path, damage=None) -> dict:
    return check(make_round(tmp_path, damage), tmp_path)


def test_checker_accepts_a_clean_cut(tmp_path):
    r = run(tmp_path)
    assert r["ok"], r["errors"]
    assert r["acked"] == 24 and r["acked_by_how"] == {"flush": 12, "commit": 12}
    assert r["in_flight"]["state"] == "old"


@pytest.mark.parametrize("landed", [0.5, 1.0])
def test_checker_accepts_the_write_in_flight_torn_or_whole(tmp_path, landed):
    def tear(files, intents):
        e = intents[-1]
        cut = int(e["length"] * landed) - (13 if landed < 1 else 0)   # mid-word, mid-page
        files[e["file"]][e["offset"]:e["offset"] + cut] = write_bytes(SEED, e["file"], e["seq"], e["length"])[:cut]
    r = run(tmp_path, tear)
    assert r["ok"], r["errors"]
    assert r["in_flight"]["state"] == ("mixed" if landed < 1 else "new")


def test_checker_refuses_an_acknowledged_range_that_lost_bytes(tmp_path):
    def lose(files, intents):
        e = intents[-2]   # the last acknowledged write: nothing overwrote it
        files[e["file"]][e["offset"] + 4096:e["offset"] + 4104] = bytes(8)
    r = run(tmp_path, lose)
    assert not r["ok"]
    assert set(r["errors"]) == {"acked-commit"}, r["errors"]


def test_checker_refuses_another_files_bytes_in_the_write_in_flight(tmp_path):
    def foreign(files, intents):
        e = intents[-1]
        other = (e["file"] + 1) % 3
        files[e["file"]][e["offset"]:e["offset"] + 4096] = write_bytes(SEED, other, e["seq"], 4096)
    r = run(tmp_path, foreign)
    assert set(r["errors"]) == {"in-flight"}, r["errors"]
    assert "tag file" in r["errors"]["in-flight"][0]


def test_checker_refuses_bytes_where_nothing_was_acknowledged(tmp_path):
    def stray(files, intents):
        touched = bytearray(LENGTH)
        for e in intents:
            if e["file"] == 0:
                touched[e["offset"]:e["offset"] + e["length"]] = b"x" * e["length"]
        at = touched.index(0) // ALIGN * ALIGN if 0 in touched else None
        assert at is not None
        files[0][at:at + 8] = write_bytes(SEED, 0, 3, 8)   # an old write's word, in the wrong place
    r = run(tmp_path, stray)
    assert set(r["errors"]) == {"elsewhere"}, r["errors"]


def test_checker_refuses_a_file_that_came_back_short(tmp_path):
    def short(files, intents):
        del files[1][LENGTH // 2:]
    r = run(tmp_path, short)
    assert "files" in r["errors"]
