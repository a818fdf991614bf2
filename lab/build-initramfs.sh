#!/usr/bin/env bash
# Build the lab's initramfs: busybox plus the 9p and overlay modules, just
# enough to mount the root filesystem over 9p with a tmpfs overlay on top and
# hand over to lab/guest/init.sh from the checkout. Prints the image path.
source "$(dirname "$0")/common.sh"

kernel=$("$LAB_DIR/fetch-kernel.sh")
kver=$(cat "$kernel/KVER")
key=$(recipe_key "$LAB_DIR/build-initramfs.sh" "$LAB_DIR/guest/initramfs-init" "$kernel/KVER")
out="$CACHE_DIR/initramfs-$key.cpio.gz"
if [[ -f $out ]]; then echo "$out"; exit 0; fi

busybox=/bin/busybox
dpkg -s busybox-static >/dev/null 2>&1 && [[ -x $busybox ]] || die "busybox-static is missing (make host-deps)"
work=$(mktemp -d "$CACHE_DIR/.initramfs-XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{bin,dev,proc,sys,lower,rw,newroot,lib/mod}
cp "$busybox" "$work/bin/busybox"
cp "$LAB_DIR/guest/initramfs-init" "$work/init"; chmod +x "$work/init"
# Modules in load order, decompressed so busybox insmod can take them.
: > "$work/modules.list"
for path in $(modprobe -d "$kernel" -S "$kver" --show-depends -a 9p 9pnet_virtio overlay \
              | awk '$1 == "insmod" {print $2}' | awk '!seen[$0]++'); do
    name=$(basename "$path"); name=${name%.xz}; name=${name%.zst}
    case $path in
        *.xz) xz -dc "$path" > "$work/lib/mod/$name" ;;
        *.zst) zstd -qdc "$path" > "$work/lib/mod/$name" ;;
        *) cp "$path" "$work/lib/mod/$name" ;;
    esac
    echo "$name" >> "$work/modules.list"
done
[[ -s $work/modules.list ]] || die "no 9p/overlay modules found for $kver"
(cd "$work" && find . | cpio -o -H newc --quiet | gzip -1) > "$out.tmp"
mv "$out.tmp" "$out"
log "initramfs with $(paste -sd' ' "$work/modules.list") in $out"
echo "$out"
