"""Tests for fanotify seal watching and the FIEMAP audit: breaks a lease cannot see revoke the seal."""
from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import pytest
from conftest import CLIENT_ENDPOINT, MIB, PAGE, FakeFabric, is_leased, wait_until

from rdax.service.fanotify import FAN_ATTRIB, FAN_MOVE_SELF, SealWatcher, describe, file_key
from rdax.service.grants import ACCESS_READ, ACCESS_WRITE
from rdax.service.node import Node
from rdax.service.sessions import EventKind


def test_watcher_reports_other_process_with_key_and_ignores_own(tmp_path: Path) -> None:
    seen: list[tuple[bytes, int, int]] = []
    watcher = SealWatcher(lambda key, mask, pid: seen.append((key, mask, pid)))
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        key = watcher.watch(fd)
        os.write(fd, b"mine")          # our own write: not reported
        os.fchmod(fd, 0o640)           # our own chmod: not reported
        subprocess.run(["chmod", "600", str(path)], check=True)
        subprocess.run(["mv", str(path), str(tmp_path / "g")], check=True)
        assert wait_until(lambda: len(seen) >= 2)
        assert [k for k, _, _ in seen] == [key, key]
        assert seen[0][1] & FAN_ATTRIB and seen[1][1] & FAN_MOVE_SELF
        assert all(pid != os.getpid() for _, _, pid in seen)
    finally:
        watcher.close()
        os.close(fd)


def test_file_key_differs_between_files(tmp_path: Path) -> None:
    a = os.open(tmp_path / "a", os.O_RDWR | os.O_CREAT, 0o600)
    b = os.open(tmp_path / "b", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert file_key(a) != file_key(b) and file_key(a) == file_key(a)
    finally:
        os.close(a)
        os.close(b)


def test_describe_names_each_bit() -> None:
    assert describe(FAN_MOVE_SELF) == "renamed"
    assert "chmod" in describe(FAN_ATTRIB)


@pytest.mark.parametrize("breaker, argv, words", [
    ("rename", ["mv", "{path}", "{path}.moved"], "renamed"),
    ("chmod", ["chmod", "640", "{path}"], "attributes changed"),
    ("link", ["ln", "{path}", "{path}.link"], "attributes changed"),
    ("unlink", ["rm", "{path}"], "attributes changed"),
])
def test_revoke_on_path_breaker(node: Node, fabric: FakeFabric, export_root: Path, breaker, argv, words) -> None:
    sid = node.open_session("c1", CLIENT_ENDPOINT).session_id
    seal = node.seal(sid, "f", MIB, create=True)
    grant = node.grant(sid, seal.seal_id, 0, PAGE, ACCESS_WRITE | ACCESS_READ)
    events = node.watch(sid, poll_seconds=0.01)
    path = export_root / "f"
    run = subprocess.run([a.format(path=path) for a in argv], capture_output=True, text=True, timeout=10)
    assert run.returncode == 0, run.stderr   # the breaker's own operation succeeds
    event = next(events)
    assert event.kind == EventKind.REVOKED and event.grant_ids == (grant.grant_id,)
    assert words in event.reason and "pid" in event.reason
    assert fabric.live_regions == []
    info = node.stat(sid, seal.seal_id)
    assert info.state == "REVOKED" and info.epoch == 2
    if path.exists():
        assert not is_leased(path), "the lease must be released once the seal is revoked"


def test_audit_revokes_seal_whose_extents_moved(node: Node, fabric: FakeFabric, export_root: Path,
                                                monkeypatch) -> None:
    sid = node.open_session("c1", CLIENT_ENDPOINT).session_id
    seal = node.seal(sid, "f", MIB, create=True)
    node.grant(sid, seal.seal_id, 0, PAGE, ACCESS_WRITE)
    assert node.audit() == []   # nothing moved yet
    # Punch a hole through our own descriptor: fanotify ignores our pid, the audit must not.
    libc = ctypes.CDLL(None, use_errno=True)
    fd = node._seals[seal.seal_id].file.fd
    assert libc.fallocate(fd, 0x01 | 0x02, ctypes.c_long(0), ctypes.c_long(PAGE)) == 0
    assert node.audit() == [seal.seal_id]
    info = node.stat(sid, seal.seal_id)
    assert info.state == "REVOKED" and "FIEMAP audit" in info.revoked_reason
    assert fabric.live_regions == []
