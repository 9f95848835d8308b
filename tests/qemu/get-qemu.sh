#!/bin/sh
# Make both QEMU generations the tests migrate from available, and print where they are.
#
#   QEMU 7.2:  Debian bookworm's qemu-system-x86, installed with apt-get when
#              qemu-system-x86_64 is not on PATH (on another release, whatever it ships).
#   QEMU 10.0: qemu-system-x86 and qemu-system-data 10.0.x with SeaBIOS 1.16.3 from
#              Debian's bookworm-backports, downloaded with `apt-get download` through a
#              private apt state (its own sources list naming the backports suite on the
#              mirror this machine's apt configuration already uses) and unpacked with
#              `dpkg-deb -x` into .qemu/10.0/ in this checkout. Nothing is installed and
#              nothing is added to the system's apt configuration.
#
# Quick when already done. Output, for `eval "$(tests/qemu/get-qemu.sh)"`:
#   QEMU_7_2=/usr/bin/qemu-system-x86_64
#   QEMU_10_0=<checkout>/.qemu/10.0/usr/bin/qemu-system-x86_64
# QEMU 10.0 needs its firmware named: -L <root>/usr/share/seabios -L <root>/usr/share/qemu
# (tests/qemu/harness.py does that). Progress and errors go to stderr.
#
# Environment: QEMU_DEBIAN_MIRROR (a Debian mirror URI, instead of the one in the apt
# configuration), QEMU_BACKPORTS_SUITE (default bookworm-backports), SKIP_QEMU_7_2=1,
# SKIP_QEMU_10_0=1.
set -eu

checkout=$(cd "$(dirname "$0")/../.." && pwd)
dest="$checkout/.qemu/10.0"
suite="${QEMU_BACKPORTS_SUITE:-bookworm-backports}"
say() { echo "get-qemu: $*" >&2; }
die() { say "$*"; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root (or sudo) to run: $*"
    fi
}

# --- QEMU 7.2: the distribution's package ----------------------------------------------

qemu72=""
if [ "${SKIP_QEMU_7_2:-0}" != 1 ]; then
    if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
        say "installing Debian's qemu-system-x86 (apt-get install)"
        if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y \
                --no-install-recommends qemu-system-x86 >&2; then
            as_root apt-get update >&2
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y \
                --no-install-recommends qemu-system-x86 >&2
        fi
    fi
    qemu72=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 is still not on PATH"
fi

# --- QEMU 10.0: unpacked from bookworm-backports ------------------------------------

# The first Debian mirror the apt configuration names for the release's main suite,
# from one-line (.list) and deb822 (.sources) files; prints "URI SIGNED-BY".
system_mirror() {
    codename=$( . /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}" )
    [ -n "$codename" ] || codename=bookworm
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$file" ] || continue
        awk -v want="$codename" '
            $1 == "deb" {
                signed = ""; i = 2
                if ($2 ~ /^\[/) {
                    while (i <= NF) {
                        if ($i ~ /signed-by=/) { s = $i; sub(/.*signed-by=/, "", s); sub(/\]$/, "", s); signed = s }
                        if ($i ~ /\]$/) { i++; break }
                        i++
                    }
                }
                if ($(i + 1) == want) { print $i, signed; exit }
            }' "$file"
    done
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        awk -v want="$codename" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " want " ") && uris != "" && enabled != "no") {
                    split(uris, u, " "); print u[1], signed; found = 1; exit
                }
                types = ""; suites = ""; uris = ""; signed = ""; enabled = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            { key = tolower($1); sub(/:$/, "", key); value = $0; sub(/^[^:]*:[ \t]*/, "", value) }
            key == "types" { types = value }
            key == "suites" { suites = value }
            key == "uris" { uris = value }
            key == "signed-by" { signed = value }
            key == "enabled" { enabled = tolower(value) }
            END { if (!found) flush() }' "$file"
    done
}

have_qemu10() {
    [ -x "$dest/usr/bin/qemu-system-x86_64" ] && [ -f "$dest/.complete" ] &&
        "$dest/usr/bin/qemu-system-x86_64" --version 2>/dev/null | grep -q "version 10\.0\."
}

fetch_qemu10() {
    work=$(mktemp -d "${TMPDIR:-/tmp}/get-qemu.XXXXXX")
    trap 'rm -rf "$work"' EXIT INT TERM
    if [ -n "${QEMU_DEBIAN_MIRROR:-}" ]; then
        mirror=$QEMU_DEBIAN_MIRROR; signed=""
    else
        line=$(system_mirror | head -n 1)
        [ -n "$line" ] || die "no Debian mirror found in /etc/apt/sources.list(.d); set QEMU_DEBIAN_MIRROR"
        mirror=${line%% *}; signed=${line#* }
        [ "$signed" != "$mirror" ] || signed=""
    fi
    [ -n "$signed" ] || signed=/usr/share/keyrings/debian-archive-keyring.gpg
    say "downloading QEMU 10.0 and SeaBIOS from $suite on $mirror"
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/parts" "$work/debs"
    : > "$work/status"
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
        "$mirror" "$suite" "$signed" > "$work/parts/backports.sources"
    : > "$work/sources.list"
    set -- -o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=$work/parts" \
        -o "Dir::State::Lists=$work/lists" -o "Dir::State::status=$work/status" \
        -o "Dir::Cache=$work/cache" -o "Debug::NoLocking=1"
    [ "$(id -u)" != 0 ] || set -- "$@" -o "APT::Sandbox::User=root"
    apt-get "$@" -q update >&2 || die "apt-get update of $suite on $mirror failed"
    (cd "$work/debs" && apt-get "$@" -q download \
        "qemu-system-x86/$suite" "qemu-system-data/$suite" "seabios/$suite" >&2) ||
        die "apt-get download from $suite failed"
    for deb in "$work"/debs/*.deb; do
        package=$(dpkg-deb -f "$deb" Package); version=$(dpkg-deb -f "$deb" Version)
        case "$package $version" in
            "qemu-system-x86 1:10.0."* | "qemu-system-data 1:10.0."* | "seabios 1.16.3"*) ;;
            *) die "$suite has $package $version; expected QEMU 10.0.x and SeaBIOS 1.16.3" ;;
        esac
        say "unpacking $package $version"
    done
    rm -rf "$dest.new"
    mkdir -p "$dest.new"
    for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$dest.new"; done
    missing=$(ldd "$dest.new/usr/bin/qemu-system-x86_64" | awk '/not found/ { print $1 }')
    [ -z "$missing" ] || die "QEMU 10.0 needs libraries this machine lacks: $missing"
    for deb in "$work"/debs/*.deb; do
        echo "$(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version)"
    done > "$dest.new/.complete"
    rm -rf "$dest"
    mv "$dest.new" "$dest"
    rm -rf "$work"
    trap - EXIT INT TERM
}

qemu10=""
if [ "${SKIP_QEMU_10_0:-0}" != 1 ]; then
    have_qemu10 || fetch_qemu10
    have_qemu10 || die "$dest/usr/bin/qemu-system-x86_64 does not run as QEMU 10.0"
    qemu10="$dest/usr/bin/qemu-system-x86_64"
fi

[ -z "$qemu72" ] || echo "QEMU_7_2=$qemu72"
[ -z "$qemu10" ] || echo "QEMU_10_0=$qemu10"
