#!/usr/bin/env bash
# Builds (or takes from the cache) everything a dormouse "python" template
# needs and assembles the template directory:
#
#   1. Debian build dependencies, installed with apt-get when missing;
#   2. the guest agent: cargo build -p dormouse-agent (static glibc);
#   3. the guest kernel (guest/kernel/build.sh): an ELF vmlinux;
#   4. the root filesystem (guest/rootfs/build.sh): Debian bookworm minbase +
#      python3 + the agent, as an ext4 image;
#   5. $CACHE/templates/python/ with vmlinux, rootfs.ext4 and template.json.
#
# Usage: guest/build.sh          (no arguments, no stdin; fine with CI=true)
# The last line of stdout is the template directory; all logs go to stderr.
#
# Cache: CACHE=${DORMOUSE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dormouse}
#   kernel/<key>/vmlinux         key: sha256(linux-source-6.1 version,
#                                  microvm.config, patches, kernel/build.sh)
#   kernel/build-<key>.log       the kernel build log
#   rootfs-base/<key>.tar        the trimmed debootstrap tree;
#                                  key: sha256(debootstrap args, rootfs/build.sh)
#   rootfs/<key>/rootfs.ext4     key: sha256(base key, agent binary sha256)
#   templates/python             symlink to templates/.python-<k>-<r>/ holding
#                                  hard links to the two artifacts + template.json
# Every artifact is built under a temporary name and renamed into place, so an
# interrupted build never leaves something that looks complete; the template
# symlink is swapped atomically. A warm rerun takes a few seconds.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
log() { echo "guest/build.sh: $*" >&2; }
exec < /dev/null
started=$SECONDS

cache="${DORMOUSE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dormouse}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
export DORMOUSE_CACHE="$cache"
template_name=python
mem_mib=512
vcpus=1
images_kept=3 # rootfs images kept in the cache (the current one included)

# One build at a time per cache (a second caller waits, then hits the cache).
exec 9> "$cache/.lock"
if ! flock -n 9; then
    log "waiting for another build using $cache"
    flock 9
fi
# Leftovers of interrupted builds (we hold the lock: nobody else is building).
rm -rf "$cache"/kernel/.build-* "$cache"/rootfs-base/.build-* "$cache"/rootfs/.build-* \
    "$cache"/templates/.tmp-*

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}

# --- 1. build dependencies ---
deps=(
    linux-source-6.1 gcc make libc6-dev bc flex bison libelf-dev libssl-dev patch xz-utils
    debootstrap debian-archive-keyring e2fsprogs tar util-linux binutils
)
missing=()
for p in "${deps[@]}"; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2> /dev/null)" = installed ] || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Refresh the package lists first only if apt does not know a package.
    for p in "${missing[@]}"; do
        if ! apt-cache show "$p" > /dev/null 2>&1; then
            as_root apt-get update -q >&2
            break
        fi
    done
    as_root apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# --- 2. the agent ---
target=x86_64-unknown-linux-gnu
log "building dormouse-agent"
(
    cd "$repo"
    RUSTFLAGS="-C target-feature=+crt-static -C strip=debuginfo" \
        cargo build -q -p dormouse-agent --release --target "$target" >&2
)
target_dir=$(cd "$repo" && cargo metadata --format-version 1 --no-deps |
    grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
agent="$target_dir/$target/release/dormouse-agent"
[ -x "$agent" ] || { log "cargo built no $agent"; exit 1; }
if readelf -lW "$agent" | grep -q 'program interpreter'; then
    log "$agent is dynamically linked; it must be static (crt-static)"
    exit 1
fi
agent_hash=$(sha256sum "$agent" | cut -d' ' -f1)

# --- 3. the kernel ---
vmlinux=$("$here/kernel/build.sh" "$cache" | tail -n 1)
kernel_dir=$(dirname "$vmlinux")
kernel_key=$(cat "$kernel_dir/key")
kernel_release=$(cat "$kernel_dir/release")

# --- 4. the root filesystem ---
base_key=$("$here/rootfs/build.sh" --key)
rootfs_key=$(printf 'base %s\nagent %s\n' "$base_key" "$agent_hash" | sha256sum | cut -d' ' -f1)
rootfs_dir="$cache/rootfs/$rootfs_key"
if [ -f "$rootfs_dir/rootfs.ext4" ]; then
    log "rootfs: cached: $rootfs_dir"
else
    mkdir -p "$cache/rootfs"
    work=$(mktemp -d "$cache/rootfs/.build-XXXXXX")
    "$here/rootfs/build.sh" "$agent" "$work/rootfs.ext4"
    echo "$rootfs_key" > "$work/key"
    chmod a-w "$work/rootfs.ext4"
    mv -T "$work" "$rootfs_dir"
fi
touch "$rootfs_dir" # most recently used: pruning keeps it
# Keep the newest few images (each agent change makes one).
ls -1td "$cache"/rootfs/*/ 2> /dev/null | tail -n +"$((images_kept + 1))" | while read -r old; do
    [ "${old%/}" = "$rootfs_dir" ] || { log "pruning old image ${old%/}"; rm -rf "$old"; }
done

# --- 5. the template directory ---
templates="$cache/templates"
link="$templates/$template_name"
version=".$template_name-${kernel_key:0:16}-${rootfs_key:0:16}"
manifest=$(printf '{"name":"%s","kernel":"vmlinux","rootfs":"rootfs.ext4","kernel_hash":"%s","rootfs_hash":"%s","mem_mib":%d,"vcpus":%d}' \
    "$template_name" "$kernel_key" "$rootfs_key" "$mem_mib" "$vcpus")
mkdir -p "$templates"
current=$(readlink "$link" 2> /dev/null || true)
if [ "$current" = "$version" ] && [ -f "$templates/$version/template.json" ] &&
    [ "$(cat "$templates/$version/template.json")" = "$manifest" ] &&
    [ "$templates/$version/vmlinux" -ef "$vmlinux" ] &&
    [ "$templates/$version/rootfs.ext4" -ef "$rootfs_dir/rootfs.ext4" ]; then
    log "template: up to date"
else
    tmp=$(mktemp -d "$templates/.tmp-XXXXXX")
    # Hard links (same file system); copies where linking is not possible.
    ln "$vmlinux" "$tmp/vmlinux" 2> /dev/null || cp "$vmlinux" "$tmp/vmlinux"
    ln "$rootfs_dir/rootfs.ext4" "$tmp/rootfs.ext4" 2> /dev/null ||
        cp --sparse=always "$rootfs_dir/rootfs.ext4" "$tmp/rootfs.ext4"
    echo "$manifest" > "$tmp/template.json"
    chmod 0755 "$tmp"
    rm -rf "${templates:?}/$version"
    mv -T "$tmp" "$templates/$version"
    # Swap the symlink atomically (rename over the old one). A real directory
    # in its place (older layout) is moved aside first.
    if [ -d "$link" ] && [ ! -L "$link" ]; then
        mv -T "$link" "$templates/.tmp-old-$$"
    fi
    ln -sfn "$version" "$templates/.tmp-link-$$"
    mv -T "$templates/.tmp-link-$$" "$link"
    # Older versions of this template: nothing points at them any more.
    for old in "$templates/.$template_name-"* "$templates"/.tmp-old-*; do
        [ -e "$old" ] || continue
        [ "$(basename "$old")" = "$version" ] || rm -rf "$old"
    done
    log "template: assembled $templates/$version"
fi

log "kernel $kernel_release ($kernel_key)"
log "rootfs $rootfs_dir/rootfs.ext4 (agent $agent_hash)"
log "done in $((SECONDS - started)) s"
echo "$link"
