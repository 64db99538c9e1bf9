#!/usr/bin/env bash
# Builds the dormouse guest root filesystem: a Debian bookworm minbase tree
# with python3, trimmed, plus our agent as /sbin/dormouse-agent (PID 1), in
# an ext4 image made without loop mounts (mkfs.ext4 -d).
#
# Usage: guest/rootfs/build.sh AGENT_BINARY OUT.ext4
#        guest/rootfs/build.sh --key      (prints the base tree's cache key)
#
# The debootstrap tree is cached as a tarball under
# ${DORMOUSE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dormouse}/rootfs-base/,
# keyed by a sha256 of the debootstrap arguments and this script, so making
# an image with a new agent takes seconds. Logs go to stderr (debootstrap's
# to rootfs-base/debootstrap-<key>.log). OUT is written under a temporary
# name and renamed into place.
#
# The Debian mirror is the one apt is configured with (deb822 "URIs:" of a
# stanza whose "Suites:" has bookworm in /etc/apt/sources.list.d/*.sources,
# else a "deb URI bookworm ..." line of /etc/apt/sources.list*), unless
# DORMOUSE_DEBIAN_MIRROR is set.
#
# Needs root (debootstrap, file ownership in the image); re-runs itself with
# `sudo -n` when not root. Needs debootstrap, e2fsprogs (>= 1.43), tar.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
self="$here/$(basename "$0")"
log() { echo "rootfs: $*" >&2; }

suite=bookworm
arch=amd64
debootstrap_args=(--variant=minbase --include=python3 --arch="$arch" "$suite")
hostname=dormouse
headroom_mib=512
min_size_mib=1024

base_key() {
    { echo "debootstrap ${debootstrap_args[*]}"; cat "$self"; } | sha256sum | cut -d' ' -f1
}

if [ "${1:-}" = "--key" ]; then
    base_key
    exit 0
fi

agent="${1:?usage: build.sh AGENT_BINARY OUT.ext4 | --key}"
out="${2:?usage: build.sh AGENT_BINARY OUT.ext4 | --key}"
[ -f "$agent" ] || { log "no agent binary at $agent"; exit 1; }
agent="$(cd "$(dirname "$agent")" && pwd)/$(basename "$agent")"
out_dir="$(mkdir -p "$(dirname "$out")" && cd "$(dirname "$out")" && pwd)"
out="$out_dir/$(basename "$out")"

if [ "$(id -u)" != 0 ]; then
    if command -v sudo > /dev/null && sudo -n true 2> /dev/null; then
        log "not root: re-running with sudo"
        cache="${DORMOUSE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dormouse}"
        sudo -n DORMOUSE_CACHE="$cache" DORMOUSE_DEBIAN_MIRROR="${DORMOUSE_DEBIAN_MIRROR:-}" \
            "$self" "$agent" "$out"
        sudo -n chown "$(id -u):$(id -g)" "$out"
        exit 0
    fi
    log "needs root (debootstrap, image file ownership) and sudo -n is not available"
    exit 1
fi

cache="${DORMOUSE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dormouse}"
mkdir -p "$cache/rootfs-base"
key=$(base_key)
base="$cache/rootfs-base/$key.tar"

# The mirror apt uses for $suite: deb822 sources first, then one-line ones.
find_mirror() {
    if [ -n "${DORMOUSE_DEBIAN_MIRROR:-}" ]; then
        echo "$DORMOUSE_DEBIAN_MIRROR"
        return
    fi
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        # Paragraphs separated by blank lines; fields are case-insensitive.
        uri=$(awk -v suite="$suite" '
            function flush() {
                if (types ~ /(^|[ \t])deb([ \t]|$)/ && (" " suites " ") ~ ("[ \t]" suite "[ \t]") \
                    && enabled !~ /^[ \t]*no/ && uris != "" && !found) {
                    split(uris, u, /[ \t]+/); print u[1]; found = 1
                }
                types = ""; suites = ""; uris = ""; enabled = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            {
                line = $0; name = tolower(line); sub(/:.*/, "", name)
                val = line; sub(/^[^:]*:[ \t]*/, "", val)
                if (name == "types") types = val
                else if (name == "suites") suites = val
                else if (name == "uris") { uris = val; sub(/^[ \t]+/, "", uris) }
                else if (name == "enabled") enabled = tolower(val)
            }
            END { flush() }' "$f")
        if [ -n "$uri" ]; then echo "$uri"; return; fi
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        # deb [options] URI SUITE COMPONENTS...
        uri=$(sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" |
            awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2; exit }')
        if [ -n "$uri" ]; then echo "$uri"; return; fi
    done
    return 1
}

# --- the base tree (cached) ---
if [ ! -f "$base" ]; then
    mirror=$(find_mirror) || {
        log "no apt source for '$suite' in /etc/apt/sources.list{,.d/*}; set DORMOUSE_DEBIAN_MIRROR"
        exit 1
    }
    work=$(mktemp -d "$cache/rootfs-base/.build-XXXXXX")
    trap 'rm -rf "$work"' EXIT
    dlog="$cache/rootfs-base/debootstrap-$key.log"
    log "debootstrap ${debootstrap_args[*]} from $mirror (~2 min); log: $dlog"
    start=$SECONDS
    if ! debootstrap "${debootstrap_args[@]}" "$work/root" "$mirror" > "$dlog" 2>&1; then
        log "debootstrap failed; last lines of $dlog:"
        tail -n 30 "$dlog" >&2
        tail -n 30 "$work/root/debootstrap/debootstrap.log" >&2 2> /dev/null || true
        exit 1
    fi
    r="$work/root"
    # Trim what a sandbox never uses. Keep the dpkg database, the C.UTF-8
    # locale (/usr/lib/locale) and Python's byte-compiled files.
    rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/* "$r"/var/cache/debconf/*-old \
        "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* \
        "$r"/usr/share/locale/* "$r"/usr/share/lintian "$r"/usr/share/bug \
        "$r"/var/log/* "$r"/debootstrap
    mkdir -p "$r/var/lib/apt/lists/partial" "$r/var/cache/apt/archives/partial"
    tar -C "$r" --numeric-owner --xattrs --xattrs-include='*' -cf "$work/base.tar" .
    mv "$work/base.tar" "$base"
    rm -rf "$work"
    trap - EXIT
    log "base tree cached in $((SECONDS - start)) s: $base ($(du -m "$base" | cut -f1) MiB)"
fi

# --- the image: base tree + our files ---
start=$SECONDS
work=$(mktemp -d "$out_dir/.rootfs-XXXXXX")
trap 'rm -rf "$work"' EXIT
r="$work/root"
mkdir "$r"
tar -C "$r" --numeric-owner --xattrs --xattrs-include='*' -xf "$base"

# A path inside the tree, following the tree's own relative symlinks
# (/sbin -> usr/sbin on merged-/usr) without ever leaving it.
in_tree() {
    local p="$1" first rest link
    first="${p%%/*}"; rest="${p#*/}"
    [ "$first" != "$p" ] || rest=""
    if [ -L "$r/$first" ]; then
        link=$(readlink "$r/$first")
        case "$link" in /*|*..*) log "unexpected symlink /$first -> $link"; exit 1 ;; esac
        first="$link"
    fi
    echo "$r/$first${rest:+/$rest}"
}

echo "$hostname" > "$r/etc/hostname"
cat > "$r/etc/hosts" << EOF
127.0.0.1	localhost
127.0.1.1	$hostname
::1	localhost ip6-localhost ip6-loopback
EOF
rm -f "$r/etc/resolv.conf"
: > "$r/etc/resolv.conf"
: > "$r/etc/fstab"
# An unprivileged user for commands run with `Command::user("user")` (the
# default user of E2B sandboxes has the same name and home).
grep -q '^user:' "$r/etc/passwd" || {
    echo 'user:x:1000:1000:dormouse user:/home/user:/bin/bash' >> "$r/etc/passwd"
    echo 'user:x:1000:' >> "$r/etc/group"
    echo 'user:*:20000:0:99999:7:::' >> "$r/etc/shadow"
}
install -d -m 0755 -o 1000 -g 1000 "$r/home/user"
# Login shells start no programs of their own: E2B's SDKs run every command
# through `bash -l -c`, and each process start is costly in a guest whose
# kernel runs emulated (PVM). /etc/profile asks `id -u` (bash knows its
# EUID), root's ~/.profile runs `mesg n` (meaningless without a terminal).
sed -i 's/"$(id -u)"/"${EUID:-$(id -u)}"/g' "$r/etc/profile"
grep -q 'EUID:-' "$r/etc/profile" || { log "/etc/profile: no id -u to replace"; exit 1; }
sed -i 's/^mesg n 2> \/dev\/null || true$/[ -t 0 ] \&\& mesg n 2> \/dev\/null || true/' "$r/root/.profile"
sbin=$(in_tree sbin)
install -m 0755 "$agent" "$sbin/dormouse-agent"
# The default init of the kernel finds the agent too (init= not required).
ln -sfn dormouse-agent "$sbin/init"

used_mib=$(du -s -m "$r" | cut -f1)
size_mib=$((used_mib + headroom_mib))
[ "$size_mib" -ge "$min_size_mib" ] || size_mib=$min_size_mib
tmp_img="$work/rootfs.ext4"
# No journal: pause/resume captures guest memory and disk together, so the
# journal would only add (emulated) guest I/O; inode tables are initialised
# here so the guest has no lazy-init thread zeroing them after boot.
mkfs.ext4 -q -F -L rootfs -O ^has_journal -E lazy_itable_init=0,root_owner=0:0 \
    -d "$r" "$tmp_img" "${size_mib}M" >&2
mv -f "$tmp_img" "$out"
log "image $out: ${used_mib} MiB used, ${size_mib} MiB size ($((SECONDS - start)) s)"
