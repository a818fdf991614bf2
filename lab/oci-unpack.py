#!/usr/bin/env python3
"""Unpack an OCI image archive (one image) into DEST/rootfs and write its config to DEST/config.json.

    python3 lab/oci-unpack.py IMAGE.oci.tar DEST

Layers are applied in order with their whiteouts (`.wh.NAME` removes NAME, `.wh..wh..opq` empties the
directory of what lower layers put there); owners are kept by number. Standard library only (the host's Python).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile

WHITEOUT, OPAQUE = ".wh.", ".wh..wh..opq"


def blob(archive: tarfile.TarFile, digest: str):
    algorithm, value = digest.split(":", 1)
    return archive.extractfile(f"blobs/{algorithm}/{value}")


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def apply_layer(layer: tarfile.TarFile, rootfs: str) -> None:
    for member in layer:
        name = os.path.normpath(member.name.lstrip("/"))
        if name.startswith("..") or name == ".":
            continue
        folder, base = os.path.split(name)
        if base == OPAQUE:
            target = os.path.join(rootfs, folder)
            for entry in os.listdir(target) if os.path.isdir(target) else ():
                remove(os.path.join(target, entry))
            continue
        if base.startswith(WHITEOUT):
            remove(os.path.join(rootfs, folder, base[len(WHITEOUT):]))
            continue
        target = os.path.join(rootfs, name)
        if os.path.lexists(target) and not (member.isdir() and os.path.isdir(target)):
            remove(target)
        member.name = name
        if member.islnk():
            member.linkname = os.path.normpath(member.linkname.lstrip("/"))
        layer.extract(member, rootfs, set_attrs=True, numeric_owner=True)


def main() -> int:
    archive_path, dest = sys.argv[1], sys.argv[2]
    rootfs = os.path.join(dest, "rootfs")
    os.makedirs(rootfs, exist_ok=True)
    with tarfile.open(archive_path) as archive:
        index = json.load(archive.extractfile("index.json"))
        manifest = json.load(blob(archive, index["manifests"][0]["digest"]))
        config = json.load(blob(archive, manifest["config"]["digest"]))
        for descriptor in manifest["layers"]:
            # gzip, or plain tar: tarfile tells them apart.
            with tarfile.open(fileobj=blob(archive, descriptor["digest"]), mode="r|*") as layer:
                apply_layer(layer, rootfs)
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
