"""Lab: the storage-node image (`make image`) run by podman 5 + crun in the storage namespace, with no capability at
all: --cap-drop=all, docker/seccomp.json (the runtime's default profile plus fanotify_init), no-new-privileges, the
default 8 MiB memlock limit. A client in the client namespace puts a file through it (sha256 checked here, on the
storage side), a lease break and a rename revoke grants, and SIGTERM drains it (health NOT_SERVING, grants revoked,
exit 0). Without the profile the node refuses to start and says what blocks fanotify.

The image runs unpacked (`podman run --rootfs .lab/image/current/rootfs:O`, its entrypoint and environment from the
image's own config.json): both are what lab/build-image.sh unpacked from the OCI archive `make image` made, and
`podman load` of that archive costs minutes under emulation. RDAX_CONTAINER_ARCHIVE=/src/... (an OCI archive beneath
the checkout) loads and runs the archive itself instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import Client, storage_mr_rkeys
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pki import client_env

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO / ".lab" / "image" / "current"
SECCOMP = REPO / "docker" / "seccomp.json"
STATE = Path("/run/rdax-podman")   # podman's storage: overlay on a tmpfs of its own
PODMAN = ["podman", "--root", str(STATE / "storage"), "--runroot", str(STATE / "run"), "--storage-driver", "overlay",
          "--cgroup-manager", "cgroupfs", "--events-backend", "none"]
PORT, HEALTH_PORT = 7710, 7711
MiB = 1 << 20
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def sh(*argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and run.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {run.returncode}: {run.stderr[-2000:]}", pytrace=False)
    return run


def prepare_guest() -> None:
    """What podman 5 + crun need in the lab guest and the guest's init does not do: cgroup2, a tmpfs /dev/shm, and
    a tmpfs for the overlay storage driver (the root filesystem is itself an overlay)."""
    for target, mount in (("/sys/fs/cgroup", ["-t", "cgroup2", "none"]),
                          ("/dev/shm", ["-t", "tmpfs", "-o", "mode=1777", "tmpfs"]),
                          (str(STATE), ["-t", "tmpfs", "-o", "mode=0700", "tmpfs"])):
        os.makedirs(target, exist_ok=True)
        if subprocess.run(["mountpoint", "-q", target]).returncode != 0:
            sh("mount", *mount, target)


def uverbs_of(device: str) -> str:
    """/dev/infiniband/uverbsN of an RDMA device: the only device node the container gets."""
    for entry in sorted(Path("/sys/class/infiniband_verbs").glob("uverbs*")):
        if (entry / "ibdev").read_text().strip() == device:
            return f"/dev/infiniband/{entry.name}"
    pytest.fail(f"no uverbs device for {device}", pytrace=False)


class Image:
    """How `podman run` gets the image: the unpacked root filesystem (default), or the OCI archive loaded."""

    def __init__(self) -> None:
        archive = os.environ.get("RDAX_CONTAINER_ARCHIVE")
        self.load_seconds = 0.0
        if archive:
            started = time.monotonic()
            out = sh(*PODMAN, "load", "-q", "-i", archive, timeout=900).stdout
            self.load_seconds = time.monotonic() - started
            self.ref = out.strip().rsplit(" ", 1)[-1]
            self.source = [self.ref]
            self.entrypoint: list[str] = []   # the image's own
            self.env: list[str] = []
            return
        if not (IMAGE_DIR / ".done").exists():
            pytest.fail(f"no unpacked image in {IMAGE_DIR}: run `make image` on the host first", pytrace=False)
        config = json.loads((IMAGE_DIR / "config.json").read_text())["config"]
        self.ref = str(IMAGE_DIR.resolve())
        self.source = ["--rootfs", f"{IMAGE_DIR.resolve() / 'rootfs'}:O"]
        # --rootfs takes no image config: the image's entrypoint and environment, from its config, by hand.
        self.entrypoint = list(config["Entrypoint"])
        self.env = [arg for pair in config.get("Env", []) for arg in ("--env", pair)]


class Container:
    """rdax-server from the image, in the storage namespace, attached: its output goes to a log file."""

    def __init__(self, lab, image: Image, name: str, export: Path, pki, *, seccomp: bool = True,
                 extra: tuple[str, ...] = ()) -> None:
        self.name, self.export = name, export
        self.log_path = Path(f"/tmp/{name}.log")
        self.log = open(self.log_path, "w+")
        sh(*PODMAN, "rm", "-f", name, check=False)
        tls = Path(pki["dir"])
        argv = [*PODMAN, "run", "--name", name, "--log-driver", "passthrough",
                "--cap-drop=all", "--security-opt", "no-new-privileges",
                *(["--security-opt", f"seccomp={SECCOMP}"] if seccomp else []),
                "--read-only", "--network", "ns:/run/netns/storage",
                "--device", uverbs_of(lab["RDAX_STORAGE_DEV"]),
                "-v", f"{export}:/export",
                "-v", f"{tls / 'node.pem'}:/etc/rdax/tls/node.pem:ro",
                "-v", f"{tls / 'node.key'}:/etc/rdax/tls/node.key:ro",
                "-v", f"{tls / 'ca.pem'}:/etc/rdax/tls/ca.pem:ro",
                "-v", f"{tls / 'policy.toml'}:/etc/rdax/policy.toml:ro",
                *image.env, *image.source, *image.entrypoint,
                "--health-listen", f"0.0.0.0:{HEALTH_PORT}", *extra]
        self.argv = argv
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.ready_seconds = 0.0

    def text(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_listening(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "listening on" in self.text():
                self.ready_seconds = time.monotonic() - self.started
                return
            if self.proc.poll() is not None:
                pytest.fail(f"the container exited {self.proc.returncode}:\n{self.text()[-4000:]}", pytrace=False)
            time.sleep(0.2)
        pytest.fail(f"the container did not listen within {timeout} s:\n{self.text()[-4000:]}", pytrace=False)

    def pid(self) -> int:
        return int(sh(*PODMAN, "inspect", "--format", "{{.State.Pid}}", self.name).stdout.strip())

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM through podman (as an orchestrator stops it); the container's exit status."""
        if self.proc.poll() is None:
            sh(*PODMAN, "kill", "--signal", "TERM", self.name, check=False)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                sh(*PODMAN, "kill", self.name, check=False)
                self.proc.wait(30)
        return self.proc.returncode

    def remove(self) -> None:
        self.stop()
        sh(*PODMAN, "rm", "-f", self.name, check=False)
        self.log.close()


@pytest.fixture(scope="module")
def image(lab):
    prepare_guest()
    return Image()


@pytest.fixture(scope="module")
def refused(lab, pki, image):
    """The node under the runtime's default seccomp profile, started beside the main one (both start in parallel:
    under emulation a start costs ~20 s of CPU, and the lab has two)."""
    export = Path(lab["RDAX_DAX_MOUNT"]) / "export-default-seccomp"
    export.mkdir(exist_ok=True)
    container = Container(lab, image, "rdax-node-default-seccomp", export, pki, seccomp=False,
                          extra=("--listen", "0.0.0.0:7712", "--health-listen", "127.0.0.1:7713"))
    yield container
    container.remove()


@pytest.fixture(scope="module")
def node(lab, pki, image, refused):
    export = Path(lab["RDAX_DAX_MOUNT"]) / "export"
    (export / "container").mkdir(parents=True, exist_ok=True)   # the operator makes directories, rdax never does
    container = Container(lab, image, "rdax-node", export, pki)
    container.wait_listening()
    print(f"\ncontainer: listening {container.ready_seconds:.1f} s after `podman run`"
          + (f" (podman load took {image.load_seconds:.1f} s)" if image.load_seconds else ""))
    yield container
    container.remove()


def target(lab) -> str:
    return f"{lab['RDAX_STORAGE_IP']}:{PORT}"


def health(status_of: str = "", timeout: float = 10) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{HEALTH_PORT}") as channel:   # this process is in the storage namespace
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=status_of),
                                                         timeout=timeout).status


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}


def memlock_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max locked memory"):
            return line.split()[3]
    return "?"


def test_container_runs_with_no_capability_and_serves(lab, node) -> None:
    """The least privilege that works, measured on the running node: no capability in any set, a seccomp
    filter, no-new-privileges, the default memlock limit; its device chosen by its network namespace."""
    status = proc_status(node.pid())
    for capset in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[capset], 16) == 0, f"{capset} {status[capset]}"
    assert status["Seccomp"] == "2", status["Seccomp"]
    assert status["NoNewPrivs"] == "1"
    assert memlock_limit(node.pid()) in ("8388608", "65536"), memlock_limit(node.pid())
    text = node.text()
    assert f"RDMA device {lab['RDAX_STORAGE_DEV']}: the one with a netdev in this network namespace" in text, text
    assert "health (plaintext, grpc.health.v1 only)" in text
    assert health() == SERVING and health("rdax.v1.Rdax") == SERVING


def test_container_put_file_checked_on_the_storage_side(lab, pki, node, tmp_path) -> None:
    """`rdax put` from the client namespace into the container; the bytes are checked here, on the storage side,
    through the DAX filesystem. 24 MiB: bigger than the memlock limit, so the pinned attempt is refused with
    ENOMEM (not only EOPNOTSUPP) and the region is ODP."""
    size = 24 * MiB
    source = tmp_path / "source"
    source.write_bytes(os.urandom(size))
    put = subprocess.run(["ip", "netns", "exec", lab["RDAX_CLIENT_NS"], "rdax", "--target", target(lab), "put", "-q",
                          str(source), "container/blob"],
                         capture_output=True, text=True, timeout=300, env=client_env(pki, "lab"))
    assert put.returncode == 0, put.stderr + put.stdout + node.text()[-3000:]
    print(f"\ncontainer put: {put.stdout.strip()}")
    landed = node.export / "container" / "blob"
    with open(landed, "rb") as f:
        stored = hashlib.sha256(f.read(size)).hexdigest()
    assert stored == hashlib.sha256(source.read_bytes()).hexdigest(), "the bytes on the DAX file differ"
    text = node.text()
    assert "pinned registration refused" in text and "errno 12" in text, text[-3000:]
    assert text.count("pinned registration refused") == 1, "the pinned probe is made once per node"


@pytest.fixture(scope="module")
def client(lab, pki, node):
    """One client process for the module (each costs ~10 s to start under emulation); each test its own file."""
    c = Client(lab, target(lab), pki)
    yield c
    c.close()


@pytest.mark.parametrize("breaker", ["lease_break", "rename"])
def test_container_seal_break_revokes(lab, node, client, breaker) -> None:
    """A lease break (another process opens the file) and a rename (fanotify, through the seccomp profile's
    fanotify_init) revoke the grant of a client of the containerised node."""
    path = f"container/{breaker}"
    grant = client.call("open", name="f", path=path, length=4 * MiB)
    assert grant["ok"], grant
    assert client.call("write", name="f", offset=0, length=MiB, seed=5, flush=True)["ok"]
    victim = node.export / path
    if breaker == "lease_break":
        run = subprocess.run(["sh", "-c", f"cat {victim} > /dev/null"], timeout=60)
    else:
        run = subprocess.run(["mv", str(victim), f"{victim}.moved"], timeout=60)
    assert run.returncode == 0
    notice = client.call("revoked", name="f", timeout=20)
    assert notice["revoked"], f"{breaker}: no revocation\n{node.text()[-3000:]}"
    assert grant["rkey"] not in storage_mr_rkeys(lab), "the region outlived the revocation"
    after = client.call("write", name="f", offset=0, length=4096, seed=6)
    assert not after["ok"], after


def test_container_default_seccomp_refuses_fanotify_and_says_why_bad_flow(refused) -> None:
    """With the runtime's default seccomp profile and no capability, fanotify_init is refused: the node does not
    start (exit 2) and names the seccomp filter and the two ways out."""
    status = refused.proc.wait(timeout=180)
    text = refused.text()
    assert status == 2, f"exit {status}:\n{text[-3000:]}"
    assert "fanotify_init" in text and "seccomp" in text and "docker/seccomp.json" in text, text[-3000:]
    assert "--cap-add SYS_ADMIN" in text, text[-3000:]


def test_container_stops_cleanly_on_sigterm(lab, node, client) -> None:
    """Last: SIGTERM drains the node (health NOT_SERVING, every grant revoked and deregistered) and it exits 0."""
    grant = client.call("open", name="f", path="container/drained", length=MiB)
    assert grant["ok"], grant
    seen: list[int] = []

    def watch_health() -> None:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{HEALTH_PORT}") as channel:
                stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                                   timeout=120)
                for reply in stream:
                    seen.append(reply.status)
        except grpc.RpcError:
            pass   # the listener goes away last

    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    deadline = time.monotonic() + 30
    while not seen and time.monotonic() < deadline:
        time.sleep(0.1)
    assert seen == [SERVING], seen
    started = time.monotonic()
    status = node.stop()
    took = time.monotonic() - started
    watcher.join(30)
    print(f"\ncontainer: SIGTERM to exit {status} in {took:.1f} s")
    assert status == 0, f"exit {status}:\n{node.text()[-3000:]}"
    assert NOT_SERVING in seen, f"health never said NOT_SERVING: {seen}"
    notice = client.call("revoked", name="f", timeout=20)
    assert notice["revoked"], "the client's grant was not revoked by the shutdown"
    assert grant["rkey"] not in storage_mr_rkeys(lab)
    assert "stopped" in node.text()


def test_container_seccomp_profile_is_the_runtime_default_plus_fanotify_init(lab) -> None:
    """docker/seccomp.json is exactly containers-common's default profile in this Debian with fanotify_init allowed
    (docker/make-seccomp.py): nothing else added."""
    made = subprocess.run([sys.executable, str(REPO / "docker" / "make-seccomp.py"),
                           "/usr/share/containers/seccomp.json"], capture_output=True, text=True, check=True).stdout
    assert json.loads(made) == json.loads(SECCOMP.read_text()), \
        "docker/seccomp.json is stale: python3 docker/make-seccomp.py /usr/share/containers/seccomp.json"
    default = json.loads(Path("/usr/share/containers/seccomp.json").read_text())
    ours = json.loads(SECCOMP.read_text())

    def allowed(p):
        return {n for r in p["syscalls"] if r["action"] == "SCMP_ACT_ALLOW"
                and not (r.get("includes") or r.get("excludes") or r.get("args")) for n in r["names"]}

    assert allowed(ours) - allowed(default) == {"fanotify_init"}


def test_container_image_holds_the_native_fast_path_and_no_compiler(lab) -> None:
    """rdma/fastpath is built in the image's build stage: its module is in the venv and loads against the image's
    own pyverbs, and the compiler and headers it was built with stayed behind."""
    rootfs = IMAGE_DIR / "rootfs"
    built = list((rootfs / "opt" / "rdax" / "venv" / "lib").glob("python3*/site-packages/rdax_fastpath*.so"))
    assert built, "rdax_fastpath is not in the image's venv"
    for absent in ("usr/bin/gcc", "usr/bin/cython3", "usr/include/infiniband/verbs.h", "usr/include/python3.13"):
        assert not (rootfs / absent).exists(), f"{absent} is in the image"
    loaded = sh("chroot", str(rootfs), "/opt/rdax/venv/bin/python", "-B", "-c",   # -B: write nothing there
                "import rdax_fastpath, pyverbs.qp; print(rdax_fastpath.PENDING)")
    assert loaded.stdout.strip() == "-1", loaded
