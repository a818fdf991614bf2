#!/usr/bin/env bash
# Run one command in the lab guest and return its exit status:
#   lab/run.sh 'pytest tests/lab'
# The checkout is /src in the guest (read-write: results come back through it).
source "$(dirname "$0")/common.sh"
[[ $# -ge 1 ]] || die "usage: lab/run.sh COMMAND..."

kernel=$("$LAB_DIR/fetch-kernel.sh")
root=$("$LAB_DIR/build-root.sh")
initramfs=$("$LAB_DIR/build-initramfs.sh")
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is missing (make host-deps)"

run_id=$(date +%Y%m%d-%H%M%S)-$$
run_dir="$REPO_DIR/.lab/runs/$run_id"
mkdir -p "$run_dir"
printf '%s\n' "$*" > "$run_dir/cmd.sh"
# The NVDIMM's backing file: sparse, fresh for every run; or RDAX_PMEM_FILE, kept between runs (a second boot
# on the same NVDIMM: the guest then mounts the XFS already on it, with log recovery, instead of making one).
pmem_size=${RDAX_PMEM_SIZE:-2G}
if [[ -n ${RDAX_PMEM_FILE:-} ]]; then
    pmem=$RDAX_PMEM_FILE pmem_mode=keep
    [[ -e $pmem ]] || truncate -s "$pmem_size" "$pmem"
    [[ $(stat -c %s "$pmem") -eq $(numfmt --from=iec "$pmem_size") ]] \
        || die "RDAX_PMEM_FILE $pmem holds $(stat -c %s "$pmem") bytes, not RDAX_PMEM_SIZE=$pmem_size"
else
    pmem=$(mktemp "${TMPDIR:-/tmp}/rdax-pmem-XXXXXX") pmem_mode=fresh
    trap 'rm -f "$pmem"' EXIT
    truncate -s "$pmem_size" "$pmem"
fi

# Software emulation: the host's KVM does not boot a stock kernel (LAB-NOTES.md).
# -nic none: the guest has no outside network; its test hosts are namespaces.
# Multi-threaded TCG now and then oopses while the kernel patches its own text at boot (seen 2026-11-22:
# "Oops: int3" in sched_clock_idle_wakeup_event or sched_clock_cpu, 3 s in, before any command; about one
# boot in ten that day, twice in a row once): a boot that died before the command started is retried, up to
# four boots in all; a command that started is never run twice.
for attempt in 1 2 3 4; do
timeout --foreground -k 10 "${RDAX_LAB_TIMEOUT:-3600}" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -smp "${RDAX_LAB_CPUS:-2}" \
    -machine pc,nvdimm=on -m "${RDAX_LAB_MEM:-3G},slots=2,maxmem=8G" \
    -object "memory-backend-file,id=m1,share=on,mem-path=$pmem,size=$pmem_size" \
    -device nvdimm,id=nv1,memdev=m1 \
    -kernel "$kernel/vmlinuz" -initrd "$initramfs" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 rdax.run=/src/.lab/runs/$run_id rdax.pmem=$pmem_mode" \
    -virtfs "local,path=$root,mount_tag=rootfs,security_model=none,readonly=on" \
    -virtfs "local,path=$REPO_DIR,mount_tag=src,security_model=none" \
    -nic none -nodefaults -display none -serial stdio -no-reboot \
    ${RDAX_LAB_PIDFILE:+-pidfile "$RDAX_LAB_PIDFILE"} \
    < /dev/null || log "qemu exited with status $?"
[[ -f $run_dir/status || -f $run_dir/started ]] && break
log "the guest died before the command started (boot attempt $attempt)"
# A fresh NVDIMM starts again empty; a kept one (RDAX_PMEM_FILE) is left as it is: it holds the data under test.
[[ $pmem_mode == fresh ]] && { truncate -s 0 "$pmem"; truncate -s "$pmem_size" "$pmem"; }
done

[[ -f $run_dir/status ]] || die "the lab guest stopped without reporting a status (see output above)"
exit "$(cat "$run_dir/status")"
