"""perftest baselines across the lab's two namespaces: ib_write_bw and ib_write_lat, server in the storage
namespace, client in the client namespace, over the IPv4 RoCE v2 GID of each rxe device."""
from __future__ import annotations

import ipaddress
import os
import re
import resource
import subprocess
import tempfile
import time
from dataclasses import dataclass

SYSFS = "/sys/class/infiniband"


def roce_v2_ipv4_gid_index(device: str, port: int = 1) -> int:
    """The GID index of `device`'s IPv4-mapped RoCE v2 GID (what perftest's -x wants)."""
    gids = f"{SYSFS}/{device}/ports/{port}/gids"
    for idx in sorted(os.listdir(gids), key=int):
        try:
            with open(f"{gids}/{idx}") as f:
                addr = ipaddress.IPv6Address(f.read().strip())
            with open(f"{SYSFS}/{device}/ports/{port}/gid_attrs/types/{idx}") as f:
                kind = f.read().strip()
        except (OSError, ValueError):
            continue   # unused slots cannot be read
        if addr.ipv4_mapped and "v2" in kind:
            return int(idx)
    raise RuntimeError(f"{device} has no IPv4 RoCE v2 GID in {gids} (is its netdev up with an address?)")


@dataclass(frozen=True)
class Side:
    netns: str
    device: str
    gid_index: int


def _table_row(text: str) -> tuple[str, list[float]]:
    """The header line starting with '#bytes' and the numbers on the line after it."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("#bytes"):
            for row in lines[i + 1:]:
                if row.strip() and not row.strip().startswith("-"):
                    return line, [float(x) for x in row.split()]
    raise ValueError(f"no result table in perftest output:\n{text[-1500:]}")


def parse_bw(text: str) -> dict:
    """ib_write_bw: #bytes #iterations BW peak[MiB/sec] BW average[MiB/sec] MsgRate[Mpps]."""
    header, v = _table_row(text)
    if "BW average[MiB/sec]" not in header or len(v) < 5:
        raise ValueError(f"unexpected ib_write_bw table: {header!r} {v}")
    depth = re.search(r"TX depth\s*:\s*(\d+)", text)
    return {"size": int(v[0]), "iters": int(v[1]), "bw_peak_mib_s": v[2], "bw_mib_s": v[3], "msg_rate_mpps": v[4],
            "tx_depth": int(depth.group(1)) if depth else None}


def parse_lat(text: str) -> dict:
    """ib_write_lat: #bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9% (usec)."""
    header, v = _table_row(text)
    if "t_typical" not in header or "99% percentile" not in header or len(v) < 9:
        raise ValueError(f"unexpected ib_write_lat table: {header!r} {v}")
    return {"size": int(v[0]), "iters": int(v[1]), "min_us": v[2], "max_us": v[3], "p50_us": v[4],
            "mean_us": v[5], "stdev_us": v[6], "p99_us": v[7], "p999_us": v[8]}


class Perftest:
    """Runs one perftest tool as a server/client pair and returns the client's parsed result."""

    def __init__(self, server: Side, client: Side, server_ip: str, log=None) -> None:
        self.server, self.client, self.server_ip = server, client, server_ip
        self.log = log

    def _argv(self, side: Side, tool: str, size: int, iters: int, extra: list[str]) -> list[str]:
        return ["ip", "netns", "exec", side.netns, tool, "-d", side.device, "-x", str(side.gid_index), "-F",
                "-s", str(size), "-n", str(iters), *extra]

    def run(self, tool: str, size: int, iters: int, extra: list[str] | None = None, timeout: float = 90.0) -> dict:
        extra = extra or []
        # The server's banner sits in its stdout buffer (a pipe), so do not wait for it: the client retries
        # while the server is not listening yet.
        server_out = tempfile.TemporaryFile()
        server = subprocess.Popen(self._argv(self.server, tool, size, iters, extra), stdout=server_out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            argv = self._argv(self.client, tool, size, iters, extra) + [self.server_ip]
            time.sleep(0.5)
            for attempt in range(10):
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.monotonic()
                client = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                        stdin=subprocess.DEVNULL)
                wall = time.monotonic() - t0
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                if client.returncode == 0:
                    break
                if "Couldn't connect" not in client.stdout + client.stderr or attempt == 9 \
                        or server.poll() is not None:
                    server_out.seek(0)
                    raise RuntimeError(f"{' '.join(argv)} exited {client.returncode}:\n"
                                       f"{(client.stdout + client.stderr)[-1500:]}\nserver (exit {server.poll()}):"
                                       f"\n{server_out.read()[-800:].decode(errors='replace')}")
                time.sleep(0.5)
            if self.log:
                self.log.write(f"$ {' '.join(argv)}\n{client.stdout}\n")
            parsed = (parse_bw if "bw" in tool else parse_lat)(client.stdout)
            parsed.update(wall_s=round(wall, 3), cpu_user_s=round(after.ru_utime - before.ru_utime, 3),
                          cpu_sys_s=round(after.ru_stime - before.ru_stime, 3))
            server.wait(timeout=30)
            return parsed
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
            server_out.close()
