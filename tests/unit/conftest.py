"""Shared fixtures of the node tests: a fake fabric that counts what it registers, a hand-driven clock, a Node on
ext4."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rdax.service.fabric_api import Endpoint
from rdax.service.node import Node
from rdax.service.policy import Policy

PAGE = 4096
MIB = 1 << 20
CLIENT_ENDPOINT = Endpoint(qpn=0x11, gid="::ffff:10.77.0.2", psn=0x1234, mtu=4096)
# What the node tests run under unless they say otherwise: 'anonymous' may do everything, everywhere.
OPEN_POLICY = """
[defaults]
max_sessions = 1000
[[allow]]
identity = "anonymous"
paths = ["**"]
create = true
access = ["write", "read", "atomic", "flush"]
"""


class FakeRegion:
    def __init__(self, fabric: FakeFabric, channel: FakeChannel, addr: int, length: int, access: int) -> None:
        self.fabric = fabric
        self.channel = channel
        self.addr = addr
        self.length = length
        self.access = access
        self.rkey = next(fabric.rkeys)
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.fabric.on_deregister(self)
            self.closed = True
            self.fabric.deregistrations += 1


class FakeChannel:
    def __init__(self, fabric: FakeFabric, remote: Endpoint) -> None:
        self.fabric = fabric
        self.remote = remote
        self.endpoint = Endpoint(qpn=next(fabric.qpns), gid="::ffff:10.77.0.1", psn=0x4321, mtu=4096)
        self.closed = False
        self.broken = False   # set by a test: the QP went to the error state

    def failed(self) -> bool:
        return self.broken and not self.closed

    def register(self, addr: int, length: int, access: int) -> FakeRegion:
        if self.closed:
            raise AssertionError("register on a closed channel")
        if self.fabric.fail_registration is not None:
            raise self.fabric.fail_registration
        region = FakeRegion(self.fabric, self, addr, length, access)
        self.fabric.regions.append(region)
        return region

    def close(self) -> None:
        assert not any(r.channel is self and not r.closed for r in self.fabric.regions), "PD closed with live MRs"
        self.closed = True


class FakeFabric:
    """Stands in for RDMA: records channels and regions so tests can assert nothing is left registered."""

    def __init__(self) -> None:
        self.channels: list[FakeChannel] = []
        self.regions: list[FakeRegion] = []
        self.deregistrations = 0
        self.fail_registration: Exception | None = None
        self.fail_open: Exception | None = None
        self.on_deregister: Callable[[FakeRegion], None] = lambda region: None
        self.rkeys = itertools.count(0x100)
        self.qpns = itertools.count(0x20)

    def open_channel(self, remote: Endpoint) -> FakeChannel:
        if self.fail_open is not None:
            raise self.fail_open
        channel = FakeChannel(self, remote)
        self.channels.append(channel)
        return channel

    @property
    def live_regions(self) -> list[FakeRegion]:
        return [r for r in self.regions if not r.closed]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def export_root(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    root.mkdir()
    return root


@pytest.fixture
def fabric() -> FakeFabric:
    return FakeFabric()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_node(export_root: Path, fabric: FakeFabric, clock: FakeClock):
    """Node(**overrides) on ext4: MAP_SYNC off (ext4 is not DAX); every node is shut down afterwards."""
    nodes: list[Node] = []

    def make(**overrides) -> Node:
        options: dict[str, Any] = {"lease_seconds": 30, "map_sync": False, "clock": clock,
                                   "policy": Policy.parse(OPEN_POLICY, "open.toml")}
        options.update(overrides)
        node = Node(export_root, fabric, **options)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.shutdown()


@pytest.fixture
def node(make_node) -> Node:
    return make_node()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def is_leased(path: Path) -> bool:
    """Whether /proc/locks shows a lease on `path` (looked up by inode; stat does not break leases)."""
    inode = os.stat(path).st_ino
    with open("/proc/locks") as locks:
        return any("LEASE" in line and line.split()[5].endswith(f":{inode}") for line in locks)


def is_mapped(path: Path) -> bool:
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(str(path)) for line in maps)


def open_from_another_process(path: Path, *, block: bool) -> subprocess.CompletedProcess:
    """Open `path` read-only in a child process, as a lease breaker would; exit 11 if the open would block."""
    flags = "os.O_RDONLY" if block else "os.O_RDONLY | os.O_NONBLOCK"
    code = (f"import os, sys\ntry:\n    os.close(os.open(sys.argv[1], {flags}))\n"
            f"except BlockingIOError:\n    sys.exit(11)\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], check=False, timeout=60)


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
