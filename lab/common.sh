# Shared settings of the lab scripts (sourced, not run).
set -euo pipefail

LAB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$LAB_DIR/.." && pwd)
CACHE_DIR=${RDAX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rdax}
# Kernel >= 6.16: rxe ODP with FLUSH and ATOMIC_WRITE (LAB-NOTES.md).
KERNEL_MIN=6.16
KERNEL_SUITE=${RDAX_KERNEL_SUITE:-trixie-backports}
ROOT_SUITE=trixie
DEBIAN_MIRROR=${RDAX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$CACHE_DIR"

log() { printf '[lab] %s\n' "$*" >&2; }
die() { printf '[lab] ERROR: %s\n' "$*" >&2; exit 1; }

# recipe_key FILE...: a short hash of the files that define a cached artefact,
# so that a change to the recipe rebuilds it and nothing else does.
recipe_key() { cat "$@" | sha256sum | cut -c1-16; }

# Packages from docker/packages.txt (the node's) and lab/packages.txt (the lab's own), comma separated
# (for debootstrap).
package_list() { grep -hvE '^\s*(#|$)' "$REPO_DIR/docker/packages.txt" "$LAB_DIR/packages.txt" | paste -sd, -; }
