"""One lab boot of the power-loss test (tests/power/test_power_loss.py drives the boots from the host):

  --recover DIR  the boot before was cut while writing round DIR: copy the round's files, as this boot's
                 mount (XFS log recovery) finds them, to DIR/files for the host's check (check.py), and
                 what the boot saw (log recovery, the control files) to DIR/guest.json
  --write DIR    start rdax-server (mutual TLS) in the storage namespace and writer.py in the client
                 namespace, writing round DIR's files until the host cuts the power

    lab/run.sh 'python tests/power/guest.py --recover /src/.lab/power/X/r0 --write /src/.lab/power/X/r1 --seed 5'
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "lab"))
from pki import client_env, make_pki, server_args  # noqa: E402 - tests/lab's helper, importable once on sys.path

ROOT = Path(os.environ.get("RDAX_DAX_MOUNT", "/mnt/pmem")) / "power"   # the export root on the DAX mount
CONTROL_BYTES = b"c" * 65536


def recover(run: Path) -> int:
    started = time.monotonic()
    src, dst = ROOT / run.name, run / "files" / run.name
    shutil.rmtree(run / "files", ignore_errors=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    dmesg = subprocess.run(["dmesg"], check=False, capture_output=True, text=True).stdout
    # The control files: created one after another while the writer ran, through write(2) without fsync.
    created = [int(x) for x in (run / "control.log").read_text().split()] if (run / "control.log").exists() else []
    intact = [i for i in created if (ROOT / f"control-{run.name}" / f"c{i}").exists()
              and (ROOT / f"control-{run.name}" / f"c{i}").read_bytes() == CONTROL_BYTES]
    facts = {"pmem_reused": os.environ.get("RDAX_PMEM_REUSED") == "1",
             "xfs_log_recovery": [line.split("] ", 1)[-1] for line in dmesg.splitlines()
                                  if "XFS" in line and "recovery" in line.lower()],
             "control": {"created": len(created), "intact": len(intact),
                         "found": sum((ROOT / f"control-{run.name}" / f"c{i}").exists() for i in created),
                         "lost": [i for i in created if i not in intact]},
             "copy_seconds": round(time.monotonic() - started, 1)}
    (run / "guest.json").write_text(json.dumps(facts, indent=1))
    print(f"guest: round {run.name} copied out in {facts['copy_seconds']} s: {facts}", flush=True)
    return 0


def write(run: Path, seed: int) -> int:
    env = os.environ
    if env.get("RDAX_LAB_ERRORS"):
        print(f"guest: the lab has problems: {env['RDAX_LAB_ERRORS']}", flush=True)
        return 1
    (ROOT / run.name).mkdir(parents=True, exist_ok=True)   # Seal never creates directories
    pki = make_pki(Path("/run/rdax-power-pki"), [env["RDAX_STORAGE_IP"]])
    target = f"{env['RDAX_STORAGE_IP']}:7710"
    with open(run / "server.log", "w") as server_log:
        server = subprocess.Popen(
            ["ip", "netns", "exec", env["RDAX_STORAGE_NS"], sys.executable, "-m", "rdax.service.cli",
             "--root", str(ROOT), "--listen", target, "--device", env["RDAX_STORAGE_DEV"],
             *server_args(pki, "/tmp/rdax-power-audit.jsonl")],
            stdout=server_log, stderr=subprocess.STDOUT)
    log, go = run / "log.jsonl", Path("/run/rdax-power-go")
    go.unlink(missing_ok=True)
    with open(run / "writer.log", "w") as writer_log:   # started now: its imports overlap the node's start-up
        writer = subprocess.Popen(
            ["ip", "netns", "exec", env["RDAX_CLIENT_NS"], sys.executable, str(HERE / "writer.py"),
             "--target", target, "--log", str(log), "--prefix", run.name, "--seed", str(seed), "--go", str(go)],
            env=client_env(pki, "lab"), stdout=writer_log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while "listening on" not in (run / "server.log").read_text():
        if server.poll() is not None or time.monotonic() > deadline:
            print(f"guest: rdax-server did not start:\n{(run / 'server.log').read_text()}", flush=True)
            writer.kill()
            return 1
        time.sleep(0.2)
    go.touch()
    print(f"guest: rdax-server up at {uptime()} s", flush=True)
    # The control: once the files are sealed, small files written through plain write(2), never fsynced, one
    # every 0.3 s, each noted on the host once written. Their data go straight to the NVDIMM (DAX), their
    # metadata only into XFS's in-memory log until something forces it: the next boot reports how many of
    # them it finds (not an assertion: it shows what the cut takes away).
    while not (log.exists() and '"start"' in log.read_text()) and writer.poll() is None:
        time.sleep(0.1)
    print(f"guest: writing from {uptime()} s; the host cuts the power", flush=True)
    control = ROOT / f"control-{run.name}"
    control.mkdir(exist_ok=True)
    noted = os.open(run / "control.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    i = 0
    while writer.poll() is None:
        (control / f"c{i}").write_bytes(CONTROL_BYTES)
        os.write(noted, f"{i}\n".encode())
        os.fsync(noted)
        i += 1
        time.sleep(0.3)
    print(f"guest: the writer exited {writer.returncode} before the power was cut:\n{(run / 'writer.log').read_text()}",
          flush=True)
    server.terminate()
    return 1


def uptime() -> str:
    return Path("/proc/uptime").read_text().split()[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recover", type=Path)
    ap.add_argument("--write", type=Path)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    status = 0
    if args.recover:
        status |= recover(args.recover)
    if args.write:
        args.write.mkdir(parents=True, exist_ok=True)
        status |= write(args.write, args.seed)
    sys.exit(status)


if __name__ == "__main__":
    main()
