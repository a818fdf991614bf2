#!/bin/bash
# Stage 2 of the lab guest (PID 1): bring up the fsdax filesystem, the two
# network namespaces joined by a veth pair with one rxe device on each end,
# run the requested command, record its exit status, power off.
# Anything that fails here is written to /run/rdax-lab.env as RDAX_LAB_ERRORS,
# so that lab tests fail with the reason instead of skipping.
export PATH=/opt/rdax/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devpts devpts /dev/pts 2>/dev/null || { mkdir -p /dev/pts && mount -t devpts devpts /dev/pts; }
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/netns
echo 1 > /proc/sys/kernel/sysrq

run_dir=$(sed -n 's/.*rdax.run=\([^ ]*\).*/\1/p' /proc/cmdline)
pmem_mode=$(sed -n 's/.*rdax.pmem=\([^ ]*\).*/\1/p' /proc/cmdline)   # fresh, or keep (lab/run.sh: RDAX_PMEM_FILE)
errors=()
step() {  # step DESCRIPTION CMD...: run CMD, remember DESCRIPTION if it fails
    local what=$1; shift
    local out; if ! out=$("$@" 2>&1); then errors+=("$what: $(echo "$out" | tail -2 | tr '\n' ' ')"); return 1; fi
}

# Persistent memory: the emulated NVDIMM as an fsdax namespace, XFS with dax=always.
DAX_MOUNT=/mnt/pmem
mkdir -p $DAX_MOUNT
# A kept NVDIMM (rdax.pmem=keep) that already holds an fsdax namespace with XFS on it is mounted as it is:
# the kernel finds the namespace's info block by itself, and the mount replays XFS's log (a second boot
# after a power cut, tests/power). Anything else gets a new namespace and a new filesystem.
pmem_reused=0
if step "modprobe nfit nd_pmem" modprobe -a nfit nd_pmem libnvdimm; then
    for _ in $(seq 50); do [[ -e /sys/bus/nd/devices/namespace0.0 ]] && break; sleep 0.1; done
    if [[ $pmem_mode == keep ]]; then
        for _ in $(seq 30); do [[ -e /dev/pmem0 ]] && break; sleep 0.1; done
        # sysfs says "memory" for what ndctl calls fsdax (a namespace claimed by a pfn device).
        [[ $(cat /sys/bus/nd/devices/namespace0.0/mode 2>/dev/null) == @(memory|fsdax) \
           && $(blkid -p -s TYPE -o value /dev/pmem0 2>/dev/null) == xfs ]] && pmem_reused=1
    fi
    if (( pmem_reused )); then
        step "mount -o dax=always /dev/pmem0 (the XFS already on the kept NVDIMM)" mount -o dax=always /dev/pmem0 $DAX_MOUNT
    else
        step "ndctl create-namespace fsdax" ndctl create-namespace -f -e namespace0.0 -m fsdax \
        && step "mkfs.xfs (reflink=1: the reflink/clone/dedupe breakers need it) /dev/pmem0" mkfs.xfs -q -f -m reflink=1 /dev/pmem0 \
        && step "mount -o dax=always /dev/pmem0" mount -o dax=always /dev/pmem0 $DAX_MOUNT
    fi
fi

# Two hosts: namespaces 'storage' and 'client', a veth pair with MTU 9000 so
# that the rxe path MTU is 4096 (rxe ODP loses data below it: LAB-NOTES.md).
STORAGE_IP=10.77.0.1 CLIENT_IP=10.77.0.2
step "modprobe rdma modules" modprobe -a rdma_rxe ib_uverbs rdma_ucm veth
ip link set lo up
if step "netns" ip netns add storage && step "netns" ip netns add client; then
    step "veth pair" ip link add veth-storage netns storage type veth peer name veth-client netns client
    for ns in storage client; do
        ip -n $ns link set lo up
        ip -n $ns link set veth-$ns mtu 9000 up
    done
    ip -n storage addr add $STORAGE_IP/24 dev veth-storage
    ip -n client addr add $CLIENT_IP/24 dev veth-client
    step "rxe on veth-storage" ip netns exec storage rdma link add rxe_storage type rxe netdev veth-storage
    step "rxe on veth-client" ip netns exec client rdma link add rxe_client type rxe netdev veth-client
fi

{
    echo "RDAX_LAB=1"
    echo "RDAX_DAX_MOUNT=$DAX_MOUNT RDAX_PMEM_REUSED=$pmem_reused"
    echo "RDAX_STORAGE_NS=storage RDAX_STORAGE_IP=$STORAGE_IP RDAX_STORAGE_DEV=rxe_storage"
    echo "RDAX_CLIENT_NS=client RDAX_CLIENT_IP=$CLIENT_IP RDAX_CLIENT_DEV=rxe_client"
    printf 'RDAX_LAB_ERRORS=%q\n' "$(IFS=';'; echo "${errors[*]}")"
} > /run/rdax-lab.env
set -a; source /run/rdax-lab.env; set +a
[[ -n $RDAX_LAB_ERRORS ]] && echo "lab: setup problems: $RDAX_LAB_ERRORS" > /dev/console

status=127
if [[ -n $run_dir && -f $run_dir/cmd.sh ]]; then
    cd /src
    echo "lab: ready in $(cut -d' ' -f1 /proc/uptime) s" > /dev/console
    : > "$run_dir/started"   # the host retries a boot that died before this (lab/run.sh)
    bash "$run_dir/cmd.sh" < /dev/null 2>&1 | tee "$run_dir/output.log" > /dev/console
    status=${PIPESTATUS[0]}
else
    echo "lab: no command (rdax.run=$run_dir)" > /dev/console
fi
echo "$status" > "$run_dir/status.tmp" && mv "$run_dir/status.tmp" "$run_dir/status"
sync
echo o > /proc/sysrq-trigger
sleep 10
