#!/usr/bin/env python3
"""docker/seccomp.json from a container runtime's default seccomp profile: the same profile, plus fanotify_init
for every process (the default allows it only with CAP_SYS_ADMIN). Nothing else changes.

    python3 docker/make-seccomp.py /usr/share/containers/seccomp.json > docker/seccomp.json

The source is containers-common's default (Debian 13: golang-github-containers-common 0.62, the one podman 5 in
the lab uses). rdax-server needs fanotify_init(FAN_CLASS_NOTIF | FAN_REPORT_FID), which Linux >= 5.13 allows
without any capability; with this profile the node runs with --cap-drop=all.
"""
from __future__ import annotations

import json
import sys

ADDED = "fanotify_init"


def with_fanotify(profile: dict) -> dict:
    """`profile` with ADDED allowed unconditionally: dropped from the rules that allow or refuse it by capability,
    added to the first unconditional SCMP_ACT_ALLOW rule."""
    out = json.loads(json.dumps(profile))
    rules = []
    for rule in out["syscalls"]:
        conditional = bool(rule.get("includes") or rule.get("excludes") or rule.get("args"))
        if ADDED in rule["names"] and conditional:
            rule["names"] = [n for n in rule["names"] if n != ADDED]
            if not rule["names"]:
                continue
        rules.append(rule)
    plain = next(r for r in rules if r["action"] == "SCMP_ACT_ALLOW"
                 and not (r.get("includes") or r.get("excludes") or r.get("args")))
    if ADDED not in plain["names"]:
        plain["names"] = sorted(plain["names"] + [ADDED])
    out["syscalls"] = rules
    return out


def main() -> int:
    with open(sys.argv[1]) as f:
        profile = json.load(f)
    json.dump(with_fanotify(profile), sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
