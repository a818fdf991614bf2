#!/usr/bin/env bash
# Build the storage-node root filesystem (Debian 13 + docker/packages.txt +
# a venv holding rdax and its Python dependencies) into the cache, keyed by
# its recipe. Prints the root directory.
source "$(dirname "$0")/common.sh"

kernel=$("$LAB_DIR/fetch-kernel.sh")
kver=$(cat "$kernel/KVER")
key=$(recipe_key "$LAB_DIR/build-root.sh" "$LAB_DIR/common.sh" "$REPO_DIR/docker/packages.txt" "$LAB_DIR/packages.txt" \
      "$REPO_DIR/pyproject.toml" "$kernel/KVER" "$REPO_DIR"/rdma/fastpath/setup.py "$REPO_DIR"/rdma/fastpath/*.pyx \
      "$REPO_DIR"/rdma/fastpath/pyproject.toml "$REPO_DIR"/rdma/fastpath/pxd/pyverbs/*.pxd)
out="$CACHE_DIR/root-$key"
if [[ -f $out/.done ]]; then echo "$out"; exit 0; fi

command -v debootstrap >/dev/null || die "debootstrap is missing (make host-deps)"
work=$(mktemp -d "$CACHE_DIR/.root-XXXXXX")
cleanup() {
    umount -R "$work/root/src" 2>/dev/null || true
    umount -R "$work/root/proc" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
root="$work/root"

log "debootstrap $ROOT_SUITE with $(package_list | tr ',' ' ')"
debootstrap --variant=minbase --include="$(package_list)" \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    "$ROOT_SUITE" "$root" "$DEBIAN_MIRROR" > "$work/debootstrap.log" 2>&1 \
    || { tail -30 "$work/debootstrap.log" >&2; die "debootstrap $ROOT_SUITE failed (log above)"; }

# pip inside the root: the host's CA bundle and resolver, the checkout at /src.
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/host-ca.crt"
cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
mkdir -p "$root/src" "$root/proc"
mount --bind "$REPO_DIR" "$root/src"
mount -t proc proc "$root/proc"
log "venv /opt/rdax/venv with rdax (editable, from /src), its dependencies and its native fast path"
# rdma/fastpath is built from a copy: pip builds a local folder in place, and /src is the host's checkout.
chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    PIP_CERT=/etc/ssl/certs/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    sh -euc 'python3 -m venv --system-site-packages /opt/rdax/venv
             /opt/rdax/venv/bin/pip install -q -e "/src[test]"
             rm -rf /tmp/fastpath && cp -r /src/rdma/fastpath /tmp/fastpath
             /opt/rdax/venv/bin/pip install -q --no-build-isolation /tmp/fastpath
             rm -rf /tmp/fastpath
             /opt/rdax/venv/bin/python -c "import grpc, pyverbs, pytest, rdax_fastpath; print(\"venv ok\")"' >&2 \
    || die "building the venv inside the root failed"
umount "$root/src" "$root/proc"
rm -f "$root/etc/ssl/certs/host-ca.crt"
# No network in the guest; the kernel's modules live in the root.
echo "127.0.0.1 localhost rdax-lab" > "$root/etc/hosts"
echo rdax-lab > "$root/etc/hostname"
mkdir -p "$root/usr/lib/modules"
cp -a "$kernel/lib/modules/$kver" "$root/usr/lib/modules/$kver"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

rm -rf "$out"; mv "$root" "$out"; touch "$out/.done"
log "root filesystem cached in $out ($(du -sh "$out" | cut -f1))"
echo "$out"
