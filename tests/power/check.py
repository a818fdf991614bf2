"""The power-loss checker: read the writer's log and the files as the boot after the cut found them on the
recovered filesystem (guest.py --recover copies them out; test_power_loss.py runs this on the host, where it
takes a second instead of a minute under emulation) and check

  - every acknowledged range byte for byte: the file holds what the node acknowledged last there (and its
    sha256 is the logged one where no later write overlaps it);
  - the one write that was in flight (logged, not acknowledged): each byte is the old or the new one;
  - everything else in every file: exactly what the acknowledged writes left (zeros where none went), so no
    byte of another file, another write or another place is anywhere;

and report the figures as JSON.

    python tests/power/check.py --log L --root /mnt/pmem/power --out RESULT.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from powerkit import read_log, write_bytes

MAX_ERRORS = 20


def describe(data: bytes, at: int) -> str:
    """Whose bytes the 8-byte word at `at` looks like (its tag)."""
    word = at - at % 8
    if word + 8 > len(data):
        return "?"
    tag = struct.unpack_from("<I", data, word + 4)[0]
    if data[word:word + 8] == bytes(8):
        return "zeros"
    return f"tag file {(tag >> 24) - 1} seq {tag & 0xFFFFFF}"


def check(log_path: Path, root: Path) -> dict:
    entries = read_log(log_path)
    # Errors by kind: log, files (missing, wrong length), acked-flush / acked-commit (an acknowledged range
    # lost bytes), in-flight (a byte neither old nor new), elsewhere (not zero where nothing was acknowledged).
    result: dict = {"log": str(log_path), "ok": True, "errors": {}, "error_count": 0, "acked": 0,
                    "acked_by_how": {}, "sha256_checked": 0, "superseded": 0, "bytes_checked": 0, "in_flight": None}

    def error(kind: str, msg: str) -> None:
        result["ok"] = False
        result["error_count"] += 1
        if result["error_count"] <= MAX_ERRORS:
            result["errors"].setdefault(kind, []).append(msg)

    starts = [e for e in entries if e.get("type") == "start"]
    if not starts:
        result["note"] = "the power went before the files were sealed: nothing to check"
        return result
    start = starts[0]
    seed = start["seed"]
    files = {f["file"]: f for f in start["files"]}
    intents = [e for e in entries if e.get("type") == "intent"]
    acks = {e["seq"]: e for e in entries if e.get("type") == "ack"}
    for i, e in enumerate(intents):
        if e["seq"] != i:
            error("log", f"intent {i} has seq {e['seq']}")
        if i < len(intents) - 1 and e["seq"] not in acks:
            error("log", f"write {e['seq']} has no acknowledgement but a later write was posted")
    in_flight = intents[-1] if intents and intents[-1]["seq"] not in acks else None

    # What the files must hold: zeros (Seal zero-fills), then every acknowledged write in order.
    model = {k: bytearray(f["length"]) for k, f in files.items()}
    data_of: dict[int, bytes] = {}
    for e in intents:
        if e["seq"] in acks:
            data = write_bytes(seed, e["file"], e["seq"], e["length"])
            if hashlib.sha256(data).hexdigest() != acks[e["seq"]]["sha256"]:
                error("log", f"write {e['seq']}'s logged sha256 is not that of its bytes (writer/checker mismatch)")
            model[e["file"]][e["offset"]:e["offset"] + e["length"]] = data
            data_of[e["seq"]] = data

    # Read the files back from the recovered filesystem.
    content: dict[int, bytes] = {}
    for k, f in files.items():
        path = root / f["path"]
        try:
            content[k] = path.read_bytes()
        except OSError as exc:
            error("files", f"{f['path']}: {exc}")
            content[k] = b""
        if len(content[k]) != f["length"]:
            error("files", f"{f['path']}: {len(content[k])} bytes after recovery, sealed with {f['length']}")

    # The write in flight: each byte old or new.
    skip: dict[int, tuple[int, int]] = {}
    if in_flight:
        k, o, n = in_flight["file"], in_flight["offset"], in_flight["length"]
        new = write_bytes(seed, k, in_flight["seq"], n)
        old = bytes(model[k][o:o + n])
        got = content[k][o:o + n]
        if got == new:
            state = "new"
        elif got == old:
            state = "old"
        else:
            state = "mixed"
            bad = [i for blk in range(0, n, 4096)
                   if got[blk:blk + 4096] not in (new[blk:blk + 4096], old[blk:blk + 4096])
                   for i in range(blk, min(blk + 4096, len(got))) if got[i] != new[i] and got[i] != old[i]]
            if len(got) < n:
                bad.append(len(got))
            for i in bad[:MAX_ERRORS]:
                error("in-flight", f"{files[k]['path']}: byte {o + i} of the write in flight (seq {in_flight['seq']}) "
                      f"is neither old nor new ({describe(got, i)})")
        new_blocks = sum(got[i:i + 4096] == new[i:i + 4096] for i in range(0, n, 4096))
        result["in_flight"] = {**in_flight, "state": state, "blocks_new": new_blocks, "blocks": n // 4096}
        skip[k] = (o, o + n)
        result["bytes_checked"] += n

    def last_ack_at(k: int, at: int) -> dict | None:
        """The last acknowledged write to file k over byte `at`."""
        covering = [acks[e["seq"]] for e in intents if e["seq"] in acks and e["file"] == k
                    and e["offset"] <= at < e["offset"] + e["length"]]
        return covering[-1] if covering else None

    # Everything else: exactly the model.
    for k, f in files.items():
        lo, hi = skip.get(k, (0, 0))
        for a, b in ((0, lo), (hi, f["length"])):
            got, want = content[k][a:b], bytes(model[k][a:b])
            result["bytes_checked"] += b - a
            if got != want:
                for i in range(0, b - a, 4096):
                    if got[i:i + 4096] != want[i:i + 4096]:
                        j = next(j for j in range(i, min(i + 4096, b - a))
                                 if j >= len(got) or got[j] != want[j])
                        owner = last_ack_at(k, a + j)
                        kind = f"acked-{owner['how']}" if owner else "elsewhere"
                        error(kind, f"{f['path']}: 4 KiB block at {a + i} differs from the acknowledged state, first "
                              f"at {a + j} (found {describe(got, j)}, want {describe(want, j)})")

    # Every acknowledged range on its own: its sha256, unless a later write (acknowledged or in flight)
    # overlaps it; those are covered by the byte-for-byte comparison with the final state above.
    later: dict[int, list[tuple[int, int, int]]] = {}
    for e in intents:
        later.setdefault(e["file"], []).append((e["seq"], e["offset"], e["offset"] + e["length"]))
    for seq, ack in sorted(acks.items()):
        result["acked"] += 1
        result["acked_by_how"][ack["how"]] = result["acked_by_how"].get(ack["how"], 0) + 1
        k, o, n = ack["file"], ack["offset"], ack["length"]
        if any(s > seq and a < o + n and o < b for s, a, b in later[k]):
            result["superseded"] += 1
            continue
        if hashlib.sha256(content[k][o:o + n]).hexdigest() != ack["sha256"]:
            error(f"acked-{ack['how']}", f"{ack['path']}: acknowledged range [{o}, {o + n}) "
                  f"(seq {seq}, {ack['how']}) does not hold its bytes after the power cut")
        else:
            result["sha256_checked"] += 1
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("--root", type=Path, required=True, help="where the log's file paths are (the export root)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    result = check(args.log, args.root)
    args.out.write_text(json.dumps(result, indent=1))
    print(summary(result), flush=True)
    sys.exit(0 if result["ok"] else 1)


def summary(result: dict) -> str:
    lines = [(f"check: {result['log']}: {'OK' if result['ok'] else 'FAILED'}, {result['acked']} acknowledged ranges "
             f"({result['sha256_checked']} by sha256, {result['superseded']} overwritten later), "
             f"in flight: {(result['in_flight'] or {}).get('state')}")]
    lines += [f"check: {kind}: {e}" for kind, errors in result["errors"].items() for e in errors]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
