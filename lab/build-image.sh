#!/usr/bin/env bash
# Build the storage-node image (docker/Dockerfile) into an OCI archive in the cache, keyed by the files that
# define it, with Debian 12's buildah and no registry: the debian:trixie base is made here from debootstrap.
# Then unpack it for the lab (.lab/image/: the image's root filesystem and its config), where the container
# tests run it with podman --rootfs (cheaper than `podman load` under emulation; README: "Run it as a container").
# Prints the archive's path.
source "$(dirname "$0")/common.sh"

command -v buildah >/dev/null || die "buildah is missing (make image-deps)"
command -v debootstrap >/dev/null || die "debootstrap is missing (make host-deps)"
# A store of our own: the base, the layer cache and the image never mix with the machine's containers.
STORE=$CACHE_DIR/buildah
bh() { buildah --root "$STORE/storage" --runroot "$STORE/run" --storage-driver overlay "$@"; }

# The image is what these files say: the recipe, the package list and the code it installs.
if git -C "$REPO_DIR" rev-parse --git-dir >/dev/null 2>&1; then
    sources=$(cd "$REPO_DIR" && git ls-files -co --exclude-standard -- pyproject.toml service rdma client proto)
else   # not a git checkout (a tarball): every file there
    sources=$(cd "$REPO_DIR" && find pyproject.toml service rdma client proto -type f)
fi
sources=$(grep -vE '(_pb2(_grpc)?\.pyi?$|__pycache__|\.pyc$)' <<< "$sources" | sort)
key=$(cd "$REPO_DIR" && recipe_key "$LAB_DIR/build-image.sh" "$LAB_DIR/common.sh" docker/Dockerfile \
      docker/packages.txt .dockerignore $sources)
base_key=$(recipe_key "$LAB_DIR/common.sh" <(echo "debootstrap minbase $ROOT_SUITE $DEBIAN_MIRROR"))
out=$CACHE_DIR/image-$key
archive=$out/rdax-node.oci.tar

if [[ ! -f $out/.done ]]; then
    started=$(date +%s)
    base=localhost/rdax-base:$ROOT_SUITE-$base_key
    if ! bh inspect --type image "$base" >/dev/null 2>&1; then
        work=$(mktemp -d "$CACHE_DIR/.base-XXXXXX")
        trap 'rm -rf "$work"' EXIT
        log "debootstrap --variant=minbase $ROOT_SUITE (the image's base)"
        debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
            "$ROOT_SUITE" "$work/root" "$DEBIAN_MIRROR" > "$work/debootstrap.log" 2>&1 \
            || { tail -30 "$work/debootstrap.log" >&2; die "debootstrap $ROOT_SUITE failed (log above)"; }
        rm -rf "$work"/root/var/cache/apt/archives/*.deb "$work"/root/var/lib/apt/lists/* "$work"/root/var/log/*
        tar -C "$work/root" --numeric-owner -cf "$work/base.tar" .
        # Debian 12's buildah (1.28) has no `import`: an empty container, the tarball added, committed.
        ctr=$(bh from --name "rdax-base-$$" scratch)
        bh add "$ctr" "$work/base.tar" / >/dev/null
        bh config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
        bh commit -q --rm "$ctr" "$base" >/dev/null
        rm -rf "$work"; trap - EXIT
    fi
    # The Dockerfile says FROM debian:trixie: that name, in our store only, is the base just made.
    bh tag "$base" "localhost/debian:$ROOT_SUITE" "docker.io/library/debian:$ROOT_SUITE"
    log "buildah bud docker/Dockerfile (key $key)"
    # pip in the build stage trusts the host's CA bundle (HTTPS may be intercepted by a proxy).
    (cd "$REPO_DIR" && bh bud --isolation chroot --pull=never --layers -f docker/Dockerfile \
        --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt \
        -t localhost/rdax-node:latest -t "localhost/rdax-node:$key" . >&2) || die "buildah bud failed"
    mkdir -p "$out.tmp"
    rm -f "$out.tmp/rdax-node.oci.tar"
    bh push -q localhost/rdax-node:latest "oci-archive:$out.tmp/rdax-node.oci.tar:localhost/rdax-node:latest" >&2 \
        || die "buildah push to an OCI archive failed"
    rm -rf "$out"; mv "$out.tmp" "$out"; touch "$out/.done"
    # Old images' layers stay for the layer cache; dangling ones go.
    bh rmi --prune >/dev/null 2>&1 || true
    log "image $(du -h "$archive" | cut -f1) in $archive ($(( $(date +%s) - started )) s)"
fi

# The lab's copy: the root filesystem and config of exactly this archive, beneath the checkout (/src in the guest).
lab_image=$REPO_DIR/.lab/image
if [[ ! -f $lab_image/$key/.done ]]; then
    mkdir -p "$lab_image"; rm -rf "$lab_image/$key.tmp" "$lab_image/$key"
    python3 "$LAB_DIR/oci-unpack.py" "$archive" "$lab_image/$key.tmp" || die "unpacking $archive failed"
    mv "$lab_image/$key.tmp" "$lab_image/$key"; touch "$lab_image/$key/.done"
    log "unpacked for the lab in $lab_image/$key"
fi
if [[ $(readlink "$lab_image/current" 2>/dev/null) != "$key" ]]; then
    # Switched atomically; the one it replaces stays (a lab run may be using it), older ones go.
    previous=$(readlink "$lab_image/current" 2>/dev/null || true)
    ln -sfn "$key" "$lab_image/current.new" && mv -T "$lab_image/current.new" "$lab_image/current"
    for dir in "$lab_image"/*/; do
        name=$(basename "$dir")
        [[ $name == "$key" || $name == "$previous" || $name == current ]] || rm -rf "$dir"
    done
fi
echo "$archive"
