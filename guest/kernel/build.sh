#!/usr/bin/env bash
# Builds the dormouse guest kernel (uncompressed ELF vmlinux) from Debian's
# linux-source-6.1: `make tinyconfig`, our fragment microvm.config merged on
# top (and verified), our patches/*.patch applied, `make vmlinux`.
#
# Usage: guest/kernel/build.sh CACHE_DIR
#   Prints the path of the cached vmlinux as the last line of stdout; logs go
#   to stderr, the full build log to CACHE_DIR/kernel/build-<key>.log.
#
# Cache: CACHE_DIR/kernel/<key>/{vmlinux,config,release,key}, where <key> is
# the sha256 of the source package version, microvm.config, the patches and
# this script. The directory is built under a temporary name and renamed into
# place, so a directory with that name is always complete.
#
# Needs (guest/build.sh installs them): linux-source-6.1, gcc, make, bc,
# flex, bison, libelf-dev, libssl-dev, patch, xz-utils.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${1:?usage: build.sh CACHE_DIR}"
tarball=/usr/src/linux-source-6.1.tar.xz
log() { echo "kernel: $*" >&2; }

[ -f "$tarball" ] || { log "missing $tarball (apt-get install linux-source-6.1)"; exit 1; }
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)

key=$( {
    echo "linux-source-6.1 $src_version"
    echo "== microvm.config"; cat "$here/microvm.config"
    for p in "$here"/patches/*.patch; do echo "== $(basename "$p")"; cat "$p"; done
    echo "== build.sh"; cat "$here/build.sh"
} | sha256sum | cut -d' ' -f1)

mkdir -p "$cache/kernel"
out="$cache/kernel/$key"
if [ -f "$out/vmlinux" ]; then
    log "cached: $out"
    echo "$out/vmlinux"
    exit 0
fi

work=$(mktemp -d "$cache/kernel/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
buildlog="$cache/kernel/build-$key.log"
: > "$buildlog"
fail() {
    log "$1; last lines of $buildlog:"
    tail -n "${2:-40}" "$buildlog" >&2
    exit 1
}
mk() { make ARCH=x86_64 "$@"; }

log "building $key (linux-source-6.1 $src_version, $(nproc) jobs; ~7 min on 2 cores); log: $buildlog"
start=$SECONDS

tar -C "$work" -xf "$tarball" >> "$buildlog" 2>&1 || fail "unpacking $tarball failed"
src="$work/linux-source-6.1"
[ -d "$src" ] || src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'linux*' | head -n 1)
cd "$src"

# --- configuration ---
{
    mk tinyconfig
    scripts/kconfig/merge_config.sh -m .config "$here/microvm.config"
    mk olddefconfig
} >> "$buildlog" 2>&1 || fail "configuration failed"

# Every line of the fragment must hold in the final .config: "=y" (or "=N")
# lines exactly, "is not set" lines as absent or "is not set".
bad=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*)
            grep -qxF -- "$line" .config || {
                log "config: wanted $line, got: $(grep -E "^(# )?${line%%=*}[= ]" .config || echo 'absent')"
                bad=1
            } ;;
        "# CONFIG_"*" is not set")
            opt=${line#\# }; opt=${opt%% *}
            if grep -q "^$opt=" .config; then log "config: wanted $opt off, got: $(grep "^$opt=" .config)"; bad=1; fi ;;
    esac
done < "$here/microvm.config"
[ "$bad" = 0 ] || { log "the config fragment did not stick (a dependency is missing?)"; exit 1; }

# --- our patches ---
for p in "$here"/patches/*.patch; do
    echo "applying $(basename "$p")" >> "$buildlog"
    patch -p1 --forward --batch < "$p" >> "$buildlog" 2>&1 || fail "patch $(basename "$p") does not apply"
done

# --- build ---
mk -j"$(nproc)" vmlinux >> "$buildlog" 2>&1 || fail "make vmlinux failed" 60
release=$(mk -s kernelrelease)

mkdir "$work/out"
cp vmlinux "$work/out/vmlinux"
cp .config "$work/out/config"
echo "$release" > "$work/out/release"
echo "$key" > "$work/out/key"
cd "$cache/kernel"
mv -T "$work/out" "$out" 2>/dev/null || [ -f "$out/vmlinux" ] || { log "cannot move the build to $out"; exit 1; }
log "built $release in $((SECONDS - start)) s: $out"
echo "$out/vmlinux"
