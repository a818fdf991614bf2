"""Find an RDMA device by name, netdev or IP, and open it (context + PD)."""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field

import pyverbs.enums as e
from pyverbs.device import Context
from pyverbs.pd import PD
from pyverbs.pyverbs_error import PyverbsError

from .errors import DeviceNotFound, VerbsError

SYSFS = "/sys/class/infiniband"
PORT = 1


def list_devices() -> list[str]:
    try:
        return sorted(os.listdir(SYSFS))
    except FileNotFoundError:
        return []


def netdevs(name: str) -> set[str]:
    """The network devices behind a device's GIDs."""
    ndevs = f"{SYSFS}/{name}/ports/{PORT}/gid_attrs/ndevs"
    found = set()
    for idx in os.listdir(ndevs) if os.path.isdir(ndevs) else ():
        try:
            with open(f"{ndevs}/{idx}") as f:
                found.add(f.read().strip())
        except OSError:  # unused GID slots cannot be read
            continue
    return found


def first_netdev(name: str) -> str | None:
    """The network device behind a device's first usable GID (soft-RoCE binds one netdev per device).

    Not netdevs(): rxe's GID table has 1024 slots, and opening each slot's sysfs file took about a second of a
    client's connect in the lab (several under load); the first readable slot is enough here."""
    ndevs = f"{SYSFS}/{name}/ports/{PORT}/gid_attrs/ndevs"
    for idx in sorted(os.listdir(ndevs), key=int) if os.path.isdir(ndevs) else ():
        try:
            with open(f"{ndevs}/{idx}") as f:
                return f.read().strip()
        except OSError:  # unused GID slots cannot be read
            continue
    return None


def _gid_table(context: Context) -> dict[str, int]:
    """IPv4 address -> GID index (IPv4-mapped RoCE v2 GIDs) of an open device: one ibv_query_gid_table call, where
    the sysfs scan (_ipv4_gids) opens two files per slot of a 1024-slot table."""
    found: dict[str, int] = {}
    for entry in context.query_gid_table(context.query_port(PORT).gid_tbl_len):
        if entry.port_num != PORT or entry.gid_type != e.IBV_GID_TYPE_ROCE_V2:
            continue
        addr = ipaddress.IPv6Address(entry.gid_str())
        if addr.ipv4_mapped:
            found.setdefault(str(addr.ipv4_mapped), entry.gid_index)
    return found


def _ipv4_gids(name: str) -> dict[str, int]:
    """IPv4 address -> GID index (IPv4-mapped RoCE v2 GIDs) of a device, from sysfs (no device opened)."""
    gids = f"{SYSFS}/{name}/ports/{PORT}/gids"
    found: dict[str, int] = {}
    for idx in sorted(os.listdir(gids), key=int) if os.path.isdir(gids) else ():
        try:
            with open(f"{gids}/{idx}") as f:
                raw = f.read().strip()
            with open(f"{SYSFS}/{name}/ports/{PORT}/gid_attrs/types/{idx}") as f:
                gid_type = f.read().strip()
        except OSError:
            continue
        addr = ipaddress.IPv6Address(raw)
        if addr.ipv4_mapped and "v2" in gid_type:
            found.setdefault(str(addr.ipv4_mapped), int(idx))
    return found


def find_device(name: str | None = None, netdev: str | None = None, ip: str | None = None) -> str:
    """The name of the one device matching all given selectors."""
    candidates = list_devices()
    if not candidates:
        raise DeviceNotFound("find_device", {"name": name, "netdev": netdev, "ip": ip},
                             detail=f"no RDMA devices in {SYSFS} (is rdma_rxe loaded and a link added?)")
    if name is not None:
        candidates = [d for d in candidates if d == name]
    if netdev is not None:
        candidates = [d for d in candidates if netdev in netdevs(d)]
    if ip is not None:
        candidates = [d for d in candidates if ip in _ipv4_gids(d)]
    if len(candidates) != 1:
        raise DeviceNotFound("find_device", {"name": name, "netdev": netdev, "ip": ip},
                             detail=f"{len(candidates)} devices match (have {list_devices()})")
    return candidates[0]


def local_device() -> str:
    """The one device whose netdev lives in this process's network namespace."""
    mine = set()
    for name in list_devices():
        ndev = first_netdev(name)
        if ndev is None:
            continue
        try:
            socket.if_nametoindex(ndev)   # resolves only in our own namespace
            mine.add(name)
        except OSError:
            continue
    if len(mine) != 1:
        raise DeviceNotFound("local_device", {}, detail=f"{sorted(mine) or 'no'} device(s) with a netdev in this "
                                                        f"network namespace (all: {list_devices()}); name one")
    return mine.pop()


@dataclass
class Device:
    """An open device: its context, the GID used for RoCE v2, and its PDs.

    Close it (or use it as a context manager) to release every PD; pyverbs
    closes children (QPs, CQs, MRs) before their parents.
    """

    name: str
    ip: str | None = None
    context: Context = field(init=False)
    gid_index: int = field(init=False)
    gid: str = field(init=False)

    def __post_init__(self) -> None:
        try:
            self.context = Context(name=self.name)
        except PyverbsError as exc:
            raise VerbsError("ibv_open_device", {"name": self.name}, detail=str(exc)) from exc
        try:
            try:
                gids = _gid_table(self.context)
            except PyverbsError:   # a provider without ibv_query_gid_table: the sysfs scan
                gids = _ipv4_gids(self.name)
            if not gids:
                raise DeviceNotFound("open_device", {"name": self.name},
                                     detail="the device has no IPv4 RoCE v2 GID (is its netdev up with an address?)")
            if self.ip is None:
                self.ip = next(iter(gids))
            if self.ip not in gids:
                raise DeviceNotFound("open_device", {"name": self.name, "ip": self.ip},
                                     detail=f"no GID for that IP (device has {sorted(gids)})")
            self.gid_index = gids[self.ip]
            try:
                self.gid = str(self.context.query_gid(PORT, self.gid_index))
            except PyverbsError as exc:
                raise VerbsError("ibv_query_gid", {"name": self.name}, detail=str(exc)) from exc
        except BaseException:
            self.context.close()
            raise

    def alloc_pd(self) -> PD:
        try:
            return PD(self.context)
        except PyverbsError as exc:
            raise VerbsError("ibv_alloc_pd", {"device": self.name}, detail=str(exc)) from exc

    def close(self) -> None:
        self.context.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_device(name: str | None = None, netdev: str | None = None, ip: str | None = None) -> Device:
    return Device(find_device(name=name, netdev=netdev, ip=ip), ip=ip)
