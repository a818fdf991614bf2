#!/usr/bin/env bash
# Fetch a Debian kernel >= KERNEL_MIN (vmlinuz + module tree) into the cache,
# without touching the system's apt configuration. Prints the kernel directory.
source "$(dirname "$0")/common.sh"

key=$(recipe_key "$LAB_DIR/fetch-kernel.sh" "$LAB_DIR/common.sh")
out="$CACHE_DIR/kernel-$key"
if [[ -f $out/.done ]]; then echo "$out"; exit 0; fi

work=$(mktemp -d "$CACHE_DIR/.kernel-XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{lists/partial,cache/archives/partial,debs,tree}
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $DEBIAN_MIRROR $KERNEL_SUITE main" \
    > "$work/sources.list"
# A private source list and state: the system's apt setup stays as it is.
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
          -o Dir::State::status=/dev/null -o Debug::NoLocking=1
          -o APT::Sandbox::User=root)
log "looking for a kernel >= $KERNEL_MIN in $KERNEL_SUITE"
apt-get "${apt_opts[@]}" -qq update || die "apt-get update of $KERNEL_SUITE failed (no network to the Debian archive?)"

# linux-modules-amd64 depends on linux-modules-<abi>; its linux-binary-<abi> twin holds vmlinuz.
abi=$(apt-cache "${apt_opts[@]}" show linux-modules-amd64 2>/dev/null \
      | sed -n 's/^Depends:.*linux-modules-\([0-9][^ ,]*-amd64\).*/\1/p' | head -1)
[[ -n $abi ]] || die "no linux-modules-amd64 in $KERNEL_SUITE: cannot find a kernel >= $KERNEL_MIN (set RDAX_KERNEL_SUITE)"
upstream=${abi%%+*}; upstream=${upstream%%-*}
if ! printf '%s\n%s\n' "$KERNEL_MIN" "$upstream" | sort -V -C; then
    die "newest kernel in $KERNEL_SUITE is $upstream, but rxe ODP with FLUSH/ATOMIC_WRITE needs >= $KERNEL_MIN"
fi
log "kernel $abi"
(cd "$work/debs" && apt-get "${apt_opts[@]}" -qq download "linux-binary-$abi" "linux-modules-$abi") \
    || die "could not download linux-binary-$abi / linux-modules-$abi"
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/tree"; done

# Newer packaging puts vmlinuz beside the modules (usr/lib/modules/<kver>/vmlinuz).
vmlinuz=$(find "$work/tree" -name 'vmlinuz*' -type f | head -1)
[[ -n $vmlinuz ]] || die "linux-binary-$abi holds no vmlinuz"
moddir=$(find "$work/tree" -path '*lib/modules/*' -maxdepth 5 -type d -name kernel -printf '%h\n' | head -1)
[[ -n $moddir ]] || die "linux-modules-$abi holds no lib/modules/<version>/kernel"
kver=${moddir##*/}
mkdir -p "$work/out/lib/modules"
mv "$vmlinuz" "$work/out/vmlinuz"
mv "$moddir" "$work/out/lib/modules/$kver"
# The package ships no modules.order/builtin; empty ones keep depmod quiet.
touch "$work/out/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo}
depmod -b "$work/out" "$kver" || die "depmod on the unpacked module tree failed"
echo "$kver" > "$work/out/KVER"
rm -rf "$out"; mv "$work/out" "$out"; touch "$out/.done"
log "kernel $kver cached in $out"
echo "$out"
