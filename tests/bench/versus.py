"""The anchors of `make bench` (issue 13 §1, §4): rdax, librpma and NFS v4.2 over RDMA run the same durable-write
workloads on the same lab, in short interleaved blocks, and every ratio is the median of its per-block ratios.

Runs in the lab guest's root namespace, called by run.py (`Run.versus`), or alone for a quick look:

    lab/run.sh 'python tests/bench/versus.py --out results/versus-smoke.json --blocks 2'

The systems (servers in the `storage` namespace, clients in the `client` namespace, one DAX mount):
- rdax: rdax-server (mTLS) and tests/bench/rdax_peer.py: `Connection.write_flush` over one grant of a sealed file,
  posted and polled natively (rdma/fastpath); rdax_pyverbs, the same connection through its pure-pyverbs path (the
  A/B of the native fast path, not an anchor);
- librpma: tests/bench/librpma/rpma_bench.c, built here with gcc into /tmp: a server that maps a file on the DAX
  mount with MAP_SYNC and declares direct_write_to_pmem, a client driven over stdin (RDMA CM, native FLUSH);
- nfs: knfsd with svcrdma in `storage` exporting a directory of the DAX mount as the NFSv4 pseudo-root, mounted
  in `client` with proto=rdma,port=20049,vers=4.2, driven by fio (O_DIRECT).

The workloads (WORKLOADS), all durable when they are timed as done, sequential from offset 0 of one 32 MiB file:
- lat_4k: 4 KiB, one at a time: write, make durable, wait; every write timed (p50/p99), and its throughput;
- seq_1m_qd1: 1 MiB, one at a time, the same way;
- seq_4k_qd64 / seq_1m_qd64: pipelined, up to 64 writes in flight, one make-durable step at the end.
"Make durable" is RDMA FLUSH(persistent) of the range for rdax and librpma; for NFS, qd1 writes are O_DIRECT |
O_DSYNC (pwrite returns once the server has the data stable: a FILE_SYNC WRITE) and the pipelined ones O_DIRECT
libaio with an fsync at the end (fio end_fsync=1; the Linux client commits O_DIRECT writes before completing them).
"""
from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
REGION = 32 * MiB
# name, message size, queue depth, messages per block
WORKLOADS = [
    ("lat_4k", 4 * KiB, 1, 400),
    ("seq_1m_qd1", MiB, 1, 16),
    ("seq_4k_qd64", 4 * KiB, 64, 2048),
    ("seq_1m_qd64", MiB, 64, 32),
]
SYSTEMS = ("rdax", "rdax_pyverbs", "librpma", "librpma_fiemap", "nfs")
RPMA_PORT = 7791
FIEMAP_SYNC_S = 5.0   # rdax-server's seal audit period (service/node.py audit_seconds)
NFS_PORT = 20049
NFS_MOUNT = "/mnt/rdax-nfs"
PUT_BYTES = 256 * MiB
CLK_TCK = os.sysconf("SC_CLK_TCK")

WORKLOAD_NOTE = {
    "lat_4k": "4 KiB writes one at a time: write, make durable, wait; p50/p99 of each, and MiB/s",
    "seq_1m_qd1": "1 MiB writes one at a time: write, make durable, wait; MiB/s",
    "seq_4k_qd64": "4 KiB writes, up to 64 in flight, one make-durable step at the end; MiB/s",
    "seq_1m_qd64": "1 MiB writes, up to 64 in flight, one make-durable step at the end; MiB/s",
}
SYSTEM_NOTE = {
    "rdax": "rdax-server (mTLS) in storage; rdax_peer.py in client: Connection.write_flush over one grant "
            "(RDMA WRITE + FLUSH(persistent) on an ODP memory region over the sealed DAX file), depth 64, "
            "one in 16 writes signalled; posted and polled by rdma/fastpath (native, GIL released while polling)",
    "rdax_pyverbs": "the A/B of rdma/fastpath, not an anchor: rdax's same session and connection, its blocks run "
                    "through Connection's pure-pyverbs path (every work request built with pyverbs calls, the CQ "
                    "polled from Python)",
    "librpma": "tests/bench/librpma/rpma_bench.c (librpma 1.3, gcc -O2, built in the lab): server maps the DAX "
               "file MAP_SHARED_VALIDATE|MAP_SYNC, rpma_mr_reg (ODP fallback), direct_write_to_pmem; client: "
               "rpma_write + rpma_flush(PERSISTENT) (native RDMA FLUSH), busy-polled CQ, one in 16 signalled",
    "librpma_fiemap": "a diagnostic, not an anchor: the librpma pair again (its own file and port), the server "
                      "also calling ioctl(FS_IOC_FIEMAP, FIEMAP_FLAG_SYNC) over its file every 5 s, as rdax-server's "
                      "seal audit does (on a DAX file the sync writes the dirty pages back and write-protects them, "
                      "which invalidates the ODP memory region's pages)",
    "nfs": "knfsd (svcrdma, 8 threads) in storage exporting a directory of the DAX mount (fsid=0, sync); "
           "client mount proto=rdma,port=20049,vers=4.2; fio O_DIRECT: psync + sync=dsync at depth 1, "
           "libaio iodepth=64 + end_fsync=1 pipelined",
}


def say(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] versus: {what}", flush=True)


# -- CPU accounting -------------------------------------------------------------------------------
def _stat_fields(pid: int | str) -> tuple[str, list[str]]:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    comm = text[text.index("(") + 1:text.rindex(")")]
    return comm, text[text.rindex(")") + 2:].split()


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds, from /proc/<pid>/stat."""
    _, rest = _stat_fields(pid)
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def proc_run_s(pid: int | str) -> float:
    """On-CPU time of a process summed over its threads, seconds, from /proc/<pid>/task/*/schedstat
    (nanoseconds: the scheduler's own clock, where utime + stime come in clock ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def kthreads_run_s(name: str = "nfsd") -> float:
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if _stat_fields(entry)[0] == name:
                    total += proc_run_s(entry)
            except (OSError, ValueError):
                continue
    return total


def kthreads_cpu_s(name: str = "nfsd") -> tuple[float, int]:
    """utime + stime summed over the processes whose comm is `name` (knfsd's kernel threads), and how many."""
    total, n = 0.0, 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm, rest = _stat_fields(entry)
        except (OSError, ValueError):
            continue
        if comm == name:
            total += (int(rest[11]) + int(rest[12])) / CLK_TCK
            n += 1
    return total, n


def guest_busy_s() -> float:
    """CPU seconds the whole guest spent not idle (user, nice, system, irq, softirq, steal), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / CLK_TCK


# -- a JSON-lines child process -------------------------------------------------------------------
class LineProc:
    """A child answering one JSON line per request line (the librpma program), each read within a timeout."""

    def __init__(self, argv: list[str], log: Path, timeout: float, stdin: bool = True) -> None:
        self.log = open(log, "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self.log)
        self._buf = b""
        try:
            self.hello = self.read(timeout)
        except BaseException:
            self.stop()
            raise

    def read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.proc.args[-4:]}: no answer within {timeout:.0f} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise RuntimeError(f"{self.proc.args[-4:]} exited ({self.proc.wait()}); see {self.log.name}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"{Path(self.proc.args[0]).name}: {reply.get('error')}")
        return reply

    def ask(self, line: str, timeout: float) -> dict:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def stop(self, quit_line: str | None = None) -> None:
        if self.proc.poll() is None:
            try:
                if quit_line and self.proc.stdin:
                    self.proc.stdin.write(quit_line.encode() + b"\n")
                    self.proc.stdin.close()
                    self.proc.wait(timeout=20)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- librpma ----------------------------------------------------------------------------------------
def build_rpma_bench() -> tuple[Path, float]:
    """gcc the librpma program into /tmp, once per run; returns the binary and the seconds it took."""
    binary = Path(tempfile.gettempdir()) / "rpma_bench"
    src = HERE / "librpma" / "rpma_bench.c"
    if binary.exists():
        return binary, 0.0
    t0 = time.monotonic()
    build = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(src), "-lrpma", "-libverbs"],
                           capture_output=True, text=True, timeout=300)
    if build.returncode != 0:
        raise RuntimeError(f"gcc {src.name} failed:\n{build.stderr[-1500:]}")
    return binary, round(time.monotonic() - t0, 1)


class Librpma:
    """rpma_bench server (storage namespace) and client (client namespace). With fiemap_sync_s, the server also
    calls FIEMAP(FIEMAP_FLAG_SYNC) over its file that often, as rdax-server's seal audit does: a diagnostic."""

    def __init__(self, lab: dict, logs: Path, region: int = REGION, name: str = "librpma", port: int = RPMA_PORT,
                 fiemap_sync_s: float = 0.0) -> None:
        self.name = name
        self.binary, self.build_s = build_rpma_bench()
        folder = Path(lab["RDAX_DAX_MOUNT"]) / "rpma"
        folder.mkdir(exist_ok=True)
        ip = lab["RDAX_STORAGE_IP"]
        self.server = LineProc(["ip", "netns", "exec", lab["RDAX_STORAGE_NS"], str(self.binary), "server", ip,
                                str(port), str(folder / name), str(region), str(fiemap_sync_s)],
                               logs / f"{name}-server.log", timeout=60, stdin=False)
        self.server_pid = int(self.server.hello["pid"])
        try:
            self.client = LineProc(["ip", "netns", "exec", lab["RDAX_CLIENT_NS"], str(self.binary), "client", ip,
                                    str(port)], logs / f"{name}-client.log", timeout=60)
        except BaseException:
            self.server.stop()
            raise
        self.info = {"build_s": self.build_s, "server": self.server.hello, "client": self.client.hello,
                     "version": _dpkg_version("librpma0")}
        self.run(MiB, 64, region // MiB)   # first touch of the ODP region, untimed

    def server_cpu_s(self) -> float:
        return proc_cpu_s(self.server_pid)

    def run(self, size: int, depth: int, count: int) -> dict:
        return self.client.ask(f"run {size} {depth} {count}", timeout=120)

    def block(self, workloads: list = WORKLOADS) -> dict[str, dict]:
        return {name: self.run(size, depth, count) for name, size, depth, count in workloads}

    def close(self) -> None:
        self.client.stop("quit")
        self.server.stop()


def _dpkg_version(package: str) -> str | None:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
    return out.stdout.strip() or None


# -- NFS v4.2 over RDMA -------------------------------------------------------------------------------
class Nfs:
    """knfsd in the storage namespace (svcrdma), the client mount made from the client namespace.

    `ip netns exec` runs each command in a mount namespace of its own, so every script that needs
    /proc/fs/nfsd mounts it again (one nfsd filesystem per network namespace); rpc.mountd (which answers the
    kernel's export upcalls) stays in the foreground so that we hold its pid. The client mount is made with
    nsenter --net only: it lands in the root mount namespace (visible to fio wherever it runs) while its RPC
    transport belongs to the client network namespace."""

    name = "nfs"

    def __init__(self, lab: dict, logs: Path, threads: int = 8) -> None:
        self.lab, self.logs = lab, logs
        self.storage, self.client_ns = lab["RDAX_STORAGE_NS"], lab["RDAX_CLIENT_NS"]
        self.export = Path(lab["RDAX_DAX_MOUNT"]) / "nfs"
        self.export.mkdir(exist_ok=True)
        self.log = open(logs / "nfs.log", "w")
        self.mountd = None
        self.mounted = False
        try:
            self._setup(lab, threads)
        except BaseException:
            self.close()
            raise

    def _setup(self, lab: dict, threads: int) -> None:
        self._sh(None, "modprobe -a nfsd rpcrdma nfsv4")
        Path("/etc/exports").write_text(
            f"{self.export} {lab['RDAX_CLIENT_IP']}(rw,sync,fsid=0,no_subtree_check,no_root_squash,insecure)\n")
        Path("/var/lib/nfs").mkdir(parents=True, exist_ok=True)
        self._sh(self.storage, """
            mount -t nfsd nfsd /proc/fs/nfsd
            # the NFSv4 grace period (90 s by default) refuses new OPENs: the shortest the kernel takes
            # (and a short lease: the server waits a lease time before it drops an old client's state)
            echo 20 > /proc/fs/nfsd/nfsv4leasetime || echo "nfsv4leasetime not set"
            echo 10 > /proc/fs/nfsd/nfsv4gracetime || echo "nfsv4gracetime not set"
            exportfs -ra && exportfs -v""")
        self.mountd = subprocess.Popen(
            ["ip", "netns", "exec", self.storage, "bash", "-c",
             "mount -t nfsd nfsd /proc/fs/nfsd && exec rpc.mountd -F -N 2 -N 3"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        time.sleep(1.0)
        if self.mountd.poll() is not None:
            raise RuntimeError(f"rpc.mountd exited ({self.mountd.returncode}); see nfs.log")
        self._sh(self.storage, f"""
            mount -t nfsd nfsd /proc/fs/nfsd
            rpc.nfsd -N 3 {threads}
            echo rdma {NFS_PORT} > /proc/fs/nfsd/portlist
            echo "portlist: $(tr '\\n' ' ' < /proc/fs/nfsd/portlist)"
            echo "versions: $(cat /proc/fs/nfsd/versions)  threads: $(cat /proc/fs/nfsd/threads)" """)
        self.t_server = time.monotonic()
        Path(NFS_MOUNT).mkdir(parents=True, exist_ok=True)
        self._sh(None, f"nsenter --net=/run/netns/{self.client_ns} mount -t nfs -o "
                       f"proto=rdma,port={NFS_PORT},vers=4.2 {lab['RDAX_STORAGE_IP']}:/ {NFS_MOUNT}", timeout=90)
        self.mounted = True
        self._sh(None, f"grep ' {NFS_MOUNT} ' /proc/mounts")
        self.options = next((line.split()[3] for line in open("/proc/mounts") if f" {NFS_MOUNT} " in line), None)
        self.threads = kthreads_cpu_s("nfsd")[1]
        self.info = {"mount_options": self.options, "nfsd_threads": self.threads,
                     "nfs_utils": _dpkg_version("nfs-kernel-server"), "fio": _fio_version()}
        # The first OPEN may wait out the grace period; lay the file out (untimed) meanwhile.
        t0 = time.monotonic()
        self.fio([("warm", MiB, 64, REGION // MiB)], "versus", timeout=180)
        self.info["first_pass_s"] = round(time.monotonic() - t0, 1)

    def _sh(self, netns: str | None, script: str, timeout: float = 60) -> str:
        argv = ["bash", "-c", f"set -e\n{script}"]
        if netns:
            argv = ["ip", "netns", "exec", netns] + argv
        self.log.write(f"$ {' '.join(argv)}\n")
        self.log.flush()
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        self.log.write(out.stdout + out.stderr)
        self.log.flush()
        if out.returncode != 0:
            raise RuntimeError(f"{script.strip().splitlines()[-1].strip()}: exit {out.returncode}: "
                               f"{(out.stdout + out.stderr).strip()[-600:]}")
        return out.stdout

    def server_cpu_s(self) -> float:
        return kthreads_cpu_s("nfsd")[0]

    def fio(self, jobs: list[tuple[str, int, int, int]], filename: str, timeout: float = 300,
            fresh: bool = False) -> dict[str, dict]:
        """One fio process, the jobs one after another (stonewall); answers per job name."""
        lines = ["[global]", f"filename={NFS_MOUNT}/{filename}", "rw=write", "direct=1", "offset=0",
                 "lat_percentiles=1", "percentile_list=50:99", "stonewall", "fallocate=none"]
        for name, size, depth, count in jobs:
            lines += [f"[{name}]", f"bs={size}", f"size={size * count}"]
            lines += (["ioengine=psync", "sync=dsync"] if depth == 1 else
                      ["ioengine=libaio", f"iodepth={depth}", "end_fsync=1"])
        if fresh:
            lines.insert(lines.index("[global]") + 1, "create_on_open=1")
        jobfile = Path(tempfile.gettempdir()) / f"versus-{filename}.fio"
        jobfile.write_text("\n".join(lines) + "\n")
        out = subprocess.run(["ip", "netns", "exec", self.client_ns, "fio", "--output-format=json", str(jobfile)],
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"fio exited {out.returncode}: {(out.stderr or out.stdout)[-800:]}")
        text = out.stdout
        doc = json.loads(text[text.index("{"):])   # fio may print notes before the JSON
        rows = {}
        for job, (name, size, depth, count) in zip(doc["jobs"], jobs):
            w = job["write"]
            lat = w.get("lat_ns") or {}
            pct = lat.get("percentile") or {}
            secs = w["runtime"] / 1e3
            row = {"size": size, "depth": depth, "messages": w.get("total_ios"), "bytes": w["io_bytes"],
                   "seconds": secs, "bw_mib_s": round(w["io_bytes"] / MiB / secs, 3) if secs else None}
            if depth == 1:
                row.update(samples=w.get("total_ios"),
                           p50_us=_us(pct.get("50.000000")), p99_us=_us(pct.get("99.000000")),
                           min_us=_us(lat.get("min")), max_us=_us(lat.get("max")), mean_us=_us(lat.get("mean")))
            if job.get("error"):
                raise RuntimeError(f"fio job {name}: error {job['error']}")
            rows[name] = row
        return rows

    def block(self, workloads: list = WORKLOADS) -> dict[str, dict]:
        return self.fio(workloads, "versus")

    def close(self) -> None:
        steps = []
        if self.mounted:
            steps.append((None, f"umount -f -l {NFS_MOUNT}"))
        steps.append((self.storage, "mount -t nfsd nfsd /proc/fs/nfsd; rpc.nfsd 0; exportfs -ua"))
        for netns, script in steps:
            try:
                self._sh(netns, script, timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                self.log.write(f"teardown: {exc}\n")
        if self.mountd is not None and self.mountd.poll() is None:
            self.mountd.send_signal(signal.SIGTERM)
            try:
                self.mountd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.mountd.kill()
                self.mountd.wait()
        self.log.close()


def _us(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e3, 2)


def _fio_version() -> str | None:
    fio = shutil.which("fio")
    if not fio:
        return None
    return subprocess.run([fio, "--version"], capture_output=True, text=True).stdout.strip()


# -- rdax, through run.py's peer -----------------------------------------------------------------------
class Rdax:
    name = "rdax"
    native: bool | None = None   # as the connection is (native where rdma/fastpath is built)

    def __init__(self, call, server_pid: int, region: int = REGION, opened: dict | None = None) -> None:
        """`call(op, need_seconds, **args)`: run.Run.call (answers None when the peer failed). `opened`: the
        peer's versus session is open already (another Rdax's)."""
        self.call, self.server_pid = call, server_pid
        opened = opened or call("versus_open", 120, region=region, depth=64)
        if not opened:
            raise RuntimeError("rdax: versus_open failed (see problems)")
        self.info = opened

    def server_cpu_s(self) -> float:
        return proc_cpu_s(self.server_pid)

    def block(self, workloads: list = WORKLOADS) -> dict[str, dict]:
        reply = self.call("versus_block", 240, workloads=workloads, native=self.native)
        if not reply:
            raise RuntimeError(f"{self.name}: versus_block failed (see problems)")
        return reply["rows"]

    def put(self, size: int) -> dict | None:
        return self.call("put", 300, size=size, name="bench-put", server_pid=self.server_pid)

    def close(self) -> None:
        pass


class RdaxPyverbs(Rdax):
    """The same session's blocks through Connection's pure-pyverbs path."""

    name = "rdax_pyverbs"
    native = False


def anchors(lab: dict, logs: Path) -> list[tuple[str, object]]:
    """(name, constructor) of the systems beside rdax, in SYSTEMS order."""
    return [("librpma", lambda: Librpma(lab, logs)),
            ("librpma_fiemap", lambda: Librpma(lab, logs, name="librpma_fiemap", port=RPMA_PORT + 1,
                                               fiemap_sync_s=FIEMAP_SYNC_S)),
            ("nfs", lambda: Nfs(lab, logs))]


# -- the interleaved blocks and their ratios -----------------------------------------------------------
def _spread(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "blocks": 0, "per_block": values}
    return {"median": round(statistics.median(vals), 3), "min": round(min(vals), 3), "max": round(max(vals), 3),
            "blocks": len(vals), "per_block": [None if v is None else round(v, 3) for v in values]}


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


RATIOS = {
    # name: (system a, system b, workload, figure); a / b per block
    "rdax_vs_librpma_lat_4k_p50": ("rdax", "librpma", "lat_4k", "p50_us"),
    "rdax_vs_rdax_pyverbs_lat_4k_p50": ("rdax", "rdax_pyverbs", "lat_4k", "p50_us"),
    "rdax_vs_rdax_pyverbs_bw_1m": ("rdax", "rdax_pyverbs", "seq_1m_qd64", "bw_mib_s"),
    "rdax_vs_rdax_pyverbs_bw_4k": ("rdax", "rdax_pyverbs", "seq_4k_qd64", "bw_mib_s"),
    "rdax_pyverbs_vs_librpma_lat_4k_p50": ("rdax_pyverbs", "librpma", "lat_4k", "p50_us"),
    "rdax_pyverbs_vs_librpma_bw_4k": ("rdax_pyverbs", "librpma", "seq_4k_qd64", "bw_mib_s"),
    "rdax_vs_librpma_lat_4k_p99": ("rdax", "librpma", "lat_4k", "p99_us"),
    "rdax_vs_librpma_bw_1m": ("rdax", "librpma", "seq_1m_qd64", "bw_mib_s"),
    "rdax_vs_librpma_bw_4k": ("rdax", "librpma", "seq_4k_qd64", "bw_mib_s"),
    "rdax_vs_librpma_bw_1m_qd1": ("rdax", "librpma", "seq_1m_qd1", "bw_mib_s"),
    "rdax_vs_librpma_bw_4k_qd1": ("rdax", "librpma", "lat_4k", "bw_mib_s"),
    "librpma_fiemap_vs_librpma_lat_4k_p50": ("librpma_fiemap", "librpma", "lat_4k", "p50_us"),
    "librpma_fiemap_vs_librpma_bw_1m": ("librpma_fiemap", "librpma", "seq_1m_qd64", "bw_mib_s"),
    "librpma_fiemap_vs_librpma_bw_1m_qd1": ("librpma_fiemap", "librpma", "seq_1m_qd1", "bw_mib_s"),
    "rdax_vs_librpma_fiemap_lat_4k_p50": ("rdax", "librpma_fiemap", "lat_4k", "p50_us"),
    "rdax_vs_librpma_fiemap_bw_1m": ("rdax", "librpma_fiemap", "seq_1m_qd64", "bw_mib_s"),
    "rdax_vs_nfs_lat_4k_p50": ("rdax", "nfs", "lat_4k", "p50_us"),
    "rdax_vs_nfs_lat_4k_p99": ("rdax", "nfs", "lat_4k", "p99_us"),
    "rdax_vs_nfs_bw_1m": ("rdax", "nfs", "seq_1m_qd64", "bw_mib_s"),
    "rdax_vs_nfs_bw_4k": ("rdax", "nfs", "seq_4k_qd64", "bw_mib_s"),
    "rdax_vs_nfs_bw_1m_qd1": ("rdax", "nfs", "seq_1m_qd1", "bw_mib_s"),
    "rdax_vs_nfs_bw_4k_qd1": ("rdax", "nfs", "lat_4k", "bw_mib_s"),
}
HEADLINE = ("rdax_vs_librpma_lat_4k_p50", "rdax_vs_librpma_bw_1m", "rdax_vs_librpma_bw_4k", "rdax_vs_nfs_lat_4k_p50")


def versus(systems: dict, blocks: int, budget_left, note) -> dict:
    """Blocks of every system's WORKLOADS, workload by workload: each workload runs on every system back to back
    (seconds apart, so that a ratio's two figures share the host's weather), the systems' order rotated each
    block and every other block reversed (ABC, CBA, BCA, ACB, ...). The server's CPU (utime + stime) is read
    around each system's part."""
    names = [n for n in SYSTEMS if n in systems]
    rows: dict[str, list[dict]] = {n: [] for n in names}
    cpu: dict[str, dict] = {n: {"server_cpu_s": 0.0, "guest_busy_s": 0.0, "bytes": 0} for n in names}
    order_log = []
    per_block_s = None
    for b in range(blocks):
        left = budget_left()
        if per_block_s and left < per_block_s * 1.5 + 60:
            note(f"versus: stopped after {b} of {blocks} blocks: out of time ({left:.0f} s left)")
            break
        t_block = time.monotonic()
        order = names[b % len(names):] + names[:b % len(names)]
        if b % 2:
            # A rotation keeps the cyclic order, so every system would follow the same one every block (rdax
            # followed NFS's fio in 4 of 5 blocks: whatever the kernel is left doing after it, rdax paid for).
            # Every other block runs backwards: each system then follows both of its neighbours.
            order.reverse()
        order_log.append(order)
        got: dict[str, dict] = {n: {} for n in names}
        failed: set[str] = set()
        for workload in WORKLOADS:
            for n in order:
                if n in failed:
                    continue
                sysm = systems[n]
                c0, g0 = sysm.server_cpu_s(), guest_busy_s()
                try:
                    part = sysm.block([workload])
                except Exception as exc:  # noqa: BLE001 - one failed block is noted, the others still count
                    note(f"versus: {n} block {b + 1} {workload[0]}: {exc}")
                    failed.add(n)
                    continue
                cpu[n]["server_cpu_s"] += sysm.server_cpu_s() - c0
                cpu[n]["guest_busy_s"] += guest_busy_s() - g0
                cpu[n]["bytes"] += sum(r.get("bytes") or 0 for r in part.values())
                got[n].update(part)
        for n in order:
            rows[n].append({} if n in failed else got[n])
            if n in failed:
                continue
            lat, bw = got[n].get("lat_4k", {}), got[n].get("seq_1m_qd64", {})
            say(f"block {b + 1} {n:>7}: 4 KiB durable p50 {lat.get('p50_us')} us p99 {lat.get('p99_us')} us, "
                f"1 MiB qd64 {bw.get('bw_mib_s')} MiB/s, 4 KiB qd64 {got[n].get('seq_4k_qd64', {}).get('bw_mib_s')} "
                f"MiB/s, 1 MiB qd1 {got[n].get('seq_1m_qd1', {}).get('bw_mib_s')} MiB/s")
        per_block_s = time.monotonic() - t_block

    out_systems = {}
    for n in names:
        per_w = {}
        for wname, size, depth, count in WORKLOADS:
            got = [r.get(wname) for r in rows[n]]
            keys = ("bw_mib_s", "p50_us", "p99_us") if depth == 1 else ("bw_mib_s",)
            entry = {"size": size, "depth": depth, "messages_per_block": count}
            for k in keys:
                vals = [g.get(k) for g in got if g and g.get(k) is not None]
                entry[k] = round(statistics.median(vals), 2) if vals else None
                entry[f"{k}_blocks"] = [g.get(k) if g else None for g in got]
            per_w[wname] = entry
        c = cpu[n]
        gib = c["bytes"] / GiB
        per_w["server_cpu_s_per_gib_in_blocks"] = round(c["server_cpu_s"] / gib, 4) if gib else None
        per_w["guest_cpu_s_per_gib_in_blocks"] = round(c["guest_busy_s"] / gib, 4) if gib else None
        per_w["bytes_in_blocks"] = c["bytes"]
        per_w["where"] = SYSTEM_NOTE[n]
        per_w["setup"] = getattr(systems[n], "info", None)
        out_systems[n] = per_w

    ratios = {}
    for key, (a, b_, wname, fig) in RATIOS.items():
        if a not in rows or b_ not in rows:
            continue
        per_block = [_div((ra.get(wname) or {}).get(fig), (rb.get(wname) or {}).get(fig))
                     for ra, rb in zip(rows[a], rows[b_])]
        ratios[key] = _spread(per_block)
    return {"blocks_planned": blocks, "blocks": len(order_log), "order": order_log, "workloads": {
        w: {"size": s, "depth": d, "messages_per_block": c, "what": WORKLOAD_NOTE[w]} for w, s, d, c in WORKLOADS},
        "region_bytes": REGION, "systems": out_systems, "ratios": ratios}


def cpu_put(rdax: Rdax | None, nfs: Nfs | None, size: int = PUT_BYTES, overwrites: int = 2) -> dict:
    """Node CPU in the data path (issue 13 §4): the storage side's CPU seconds per GiB during puts of `size`
    bytes. rdax: the rdax-server process (utime + stime of all its threads, /proc/<pid>/stat) around whole puts
    through rdax.client (connect, Seal + Grant, RemoteFile.write_from in 1 MiB requests, FLUSH, close). NFS: the
    sum over knfsd's `nfsd` kernel threads around fio writing the same bytes through the mount (1 MiB, libaio
    iodepth 64, O_DIRECT, end_fsync).

    First one put of a new file (for rdax that includes Seal's preparation: allocate and zero-fill the file in
    the node process), then `overwrites` puts over that same file (the file's blocks exist: what is left is
    the data path); the headline is the overwrites' total. Beside: the same from the scheduler's nanosecond
    clock (schedstat; utime + stime count 10 ms ticks), and the whole guest's busy CPU (both sides, and the
    soft-RoCE work the kernel does in softirq and kworkers, which no server process is charged for)."""
    out: dict = {"bytes_per_put": size, "overwrites": overwrites, "clock_tick_s": 1 / CLK_TCK}

    def measure(server_stat, server_run, do) -> dict:
        c0, r0, g0, t0 = server_stat(), server_run(), guest_busy_s(), time.monotonic()
        detail = do()
        c, r, g = server_stat() - c0, server_run() - r0, guest_busy_s() - g0
        return {"server_cpu_s": round(c, 3), "server_run_s": round(r, 4), "guest_busy_s": round(g, 2),
                "wall_s": round(time.monotonic() - t0, 2), "detail": detail}

    def per_gib(m: dict, nbytes: int) -> dict:
        gib = nbytes / GiB
        return {**m, "bytes": nbytes, "server_cpu_s_per_gib": round(m["server_cpu_s"] / gib, 4),
                "server_run_s_per_gib": round(m["server_run_s"] / gib, 4),
                "guest_cpu_s_per_gib": round(m["guest_busy_s"] / gib, 3)}

    def total(ms: list[dict]) -> dict:
        return {k: round(sum(m[k] for m in ms), 4) for k in ("server_cpu_s", "server_run_s", "guest_busy_s",
                                                              "wall_s")}

    if rdax is not None:
        stat, run = rdax.server_cpu_s, lambda: proc_run_s(rdax.server_pid)
        first = measure(stat, run, lambda: rdax.put(size))
        again = [measure(stat, run, lambda: rdax.put(size)) for _ in range(overwrites)]
        if first["detail"] and all(m["detail"] for m in again):
            out["rdax"] = {"new_file": per_gib(first, size), "overwrite": per_gib(total(again), size * overwrites),
                           "overwrite_puts": again}
            out["rdax"]["node_cpu_s_per_gib"] = out["rdax"]["overwrite"]["server_cpu_s_per_gib"]
            # The data phase alone (write_from + FLUSH, control plane apart), from the node's schedstat.
            runs = [m["detail"].get("data_phase_server_run_s") for m in again]
            if all(r is not None for r in runs):
                secs = sum(m["detail"]["data_phase_s"] for m in again)
                out["rdax"]["data_phase"] = {"server_run_s": round(sum(runs), 5), "seconds": round(secs, 3),
                                             "server_run_s_per_s": round(sum(runs) / secs, 5) if secs else None}
                out["rdax"]["node_data_cpu_s_per_gib"] = round(sum(runs) / (size * overwrites / GiB), 4)
    if nfs is not None:
        stat, run = nfs.server_cpu_s, kthreads_run_s
        job = [("put", MiB, 64, size // MiB)]
        first = measure(stat, run, lambda: nfs.fio(job, "put", fresh=True, timeout=300)["put"])
        again = [measure(stat, run, lambda: nfs.fio(job, "put", timeout=300)["put"]) for _ in range(overwrites)]
        out["nfs"] = {"new_file": per_gib(first, size), "overwrite": per_gib(total(again), size * overwrites),
                      "overwrite_puts": again, "nfsd_threads": kthreads_cpu_s("nfsd")[1]}
        out["nfs"]["server_cpu_s_per_gib"] = out["nfs"]["overwrite"]["server_cpu_s_per_gib"]
    return out


# -- alone, for a quick look ------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/versus-smoke.json")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--put", type=int, default=64 * MiB)
    args = parser.parse_args(argv)
    lab = dict(os.environ)
    if lab.get("RDAX_LAB") != "1":
        print("versus: run inside the lab: lab/run.sh 'python tests/bench/versus.py'", file=sys.stderr)
        return 2
    out = Path(args.out)
    logs = out.parent / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    wanted = args.systems.split(",")
    problems: list[str] = []

    def note(what: str) -> None:
        say(what)
        problems.append(what)

    systems: dict = {}
    server = peer = None
    doc: dict = {}
    try:
        if "rdax" in wanted:
            import run as bench_run   # noqa: PLC0415 - its Server and Peer; only needed here
            root = Path(lab["RDAX_DAX_MOUNT"]) / "bench"
            root.mkdir(exist_ok=True)
            server = bench_run.Server(lab, root, logs / "server.log")
            peer = bench_run.Peer(lab, server.target, logs / "peer.log")

            def call(op: str, need: float, **kw) -> dict | None:
                try:
                    return peer.call(op, timeout=max(need * 4, 60), **kw)
                except bench_run.PeerError as exc:
                    note(str(exc))
                    return None
            systems["rdax"] = Rdax(call, server.pid)
            if "rdax_pyverbs" in wanted and systems["rdax"].info.get("native"):
                systems["rdax_pyverbs"] = RdaxPyverbs(call, server.pid, opened=systems["rdax"].info)
        for name, make in anchors(lab, logs):
            if name in wanted:
                try:
                    systems[name] = make()
                    say(f"{name} up: {systems[name].info}")
                except Exception as exc:  # noqa: BLE001
                    note(f"{name}: {type(exc).__name__}: {exc}")
        deadline = time.monotonic() + 900
        doc = {"versus": versus(systems, args.blocks, lambda: deadline - time.monotonic(), note)}
        doc["versus"]["cpu_put"] = cpu_put(systems.get("rdax"), systems.get("nfs"), args.put)
    finally:
        for s in systems.values():
            try:
                s.close()
            except Exception as exc:  # noqa: BLE001
                note(f"closing {s.name}: {exc}")
        if peer is not None:
            peer.close()
        if server is not None:
            server.stop()
    doc["problems"] = problems
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: v["median"] for k, v in doc["versus"]["ratios"].items()}, indent=1))
    print(f"versus: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
