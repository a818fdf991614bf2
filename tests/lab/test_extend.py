"""Lab: seals that grow — an append-only writer across several Extends, and with a breaker in the middle."""
from __future__ import annotations

import random

from labkit import pattern

KiB = 1 << 10


def records(seed: int, count: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(seed * 1000 + i, rng.randrange(1, 90 * KiB)) for i in range(count)]


def test_extend_append_only_writer_across_several_extends(server, clients):
    (client,) = clients(1)
    assert client.call("open", name="log", path="log", length=64 * KiB)["ok"]
    lengths = set()
    for seed, size in records(1, 24):
        r = client.call("append", name="log", length=size, seed=seed)
        assert r["ok"], r
        lengths.add(r["length"])
    assert len(lengths) >= 3, f"the seal grew only to {sorted(lengths)}"
    assert client.call("events")["events"] and all(e["kind"] == 5 for e in client.call("events")["events"])
    closed = client.call("close_file_sized", name="log")
    expected = b"".join(pattern(seed, size) for seed, size in records(1, 24))
    assert closed["size"] == len(expected)
    data = (server.root / "log").read_bytes()
    assert data == expected, "the log is not the records in order (or kept the seal's padding)"


def test_extend_with_a_breaker_in_the_middle(server, clients):
    (client,) = clients(1)
    assert client.call("open", name="log", path="broken-log", length=64 * KiB)["ok"]
    first, second = records(2, 10), records(3, 10)
    for seed, size in first:
        assert client.call("append", name="log", length=size, seed=seed)["ok"]
    size_before = client.call("append", name="log", length=1, seed=99)
    assert size_before["ok"]
    with open(server.root / "broken-log", "rb"):   # the breaker: a lease break revokes
        pass
    assert client.call("revoked", name="log")["revoked"]
    r = client.call("append", name="log", length=100, seed=98)
    assert not r["ok"] and "revoked" in r["error"], r
    # The writer seals again and goes on where the log ended before the break.
    assert client.call("reopen", name="log", path="broken-log", size=size_before["size"])["ok"]
    for seed, size in second:
        assert client.call("append", name="log", length=size, seed=seed)["ok"]
    client.call("close_file_sized", name="log")
    expected = (b"".join(pattern(s, n) for s, n in first) + pattern(99, 1)
                + b"".join(pattern(s, n) for s, n in second))
    assert (server.root / "broken-log").read_bytes() == expected
