"""Lab fixtures: the guest's fsdax mount, the storage-side device and a
remote client process in the client namespace. No skips: a lab that cannot
provide rxe or DAX fails every test with the reason."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def lab() -> dict[str, str]:
    if os.environ.get("RDAX_LAB") != "1":
        pytest.fail("not inside the rdax lab guest (RDAX_LAB unset): run `make lab-test`", pytrace=False)
    if os.environ.get("RDAX_LAB_ERRORS"):
        pytest.fail(f"the lab could not provide its devices: {os.environ['RDAX_LAB_ERRORS']}", pytrace=False)
    mount = os.environ["RDAX_DAX_MOUNT"]
    with open("/proc/mounts") as f:
        opts = [line.split()[3] for line in f if line.split()[1] == mount]
    if not opts or "dax=always" not in opts[0]:
        pytest.fail(f"{mount} is not mounted with dax=always ({opts})", pytrace=False)
    return dict(os.environ)


@pytest.fixture
def dax_file(lab, request):
    """A fresh file on the DAX mount, removed afterwards; returns its path."""
    path = Path(lab["RDAX_DAX_MOUNT"]) / f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
    yield path
    path.unlink(missing_ok=True)


class RemotePeer:
    """tests/lab/peer.py running in the client namespace."""

    def __init__(self, netns: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, str(HERE / "peer.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def call(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer died during {op} (exit {self.proc.poll()})")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        # Do not wait for rxe's QP teardown after access errors (can be ~50 s).
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def peer(lab):
    p = RemotePeer(lab["RDAX_CLIENT_NS"])
    yield p
    p.close()
