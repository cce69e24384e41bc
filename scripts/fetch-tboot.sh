#!/usr/bin/env bash
# Fetches a Multiboot kernel that nobody here wrote: Intel's tboot, from Debian's
# package (downloaded, not installed, so the host's boot loader is untouched).
# It prints to COM1 with `logging=serial` and halts. Used by the tests and the demo.
set -euo pipefail
out=GuestImages/build/third-party
[ -f "$out/tboot.elf" ] && exit 0
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
( cd "$tmp" && (apt-get download tboot >/dev/null 2>&1 || { apt-get update -qq && apt-get download tboot; }) )
dpkg-deb -x "$tmp"/tboot_*.deb "$tmp/root"
zcat "$tmp/root/boot/tboot.gz" > "$out/tboot.elf"
echo "fetched $out/tboot.elf (from Debian's tboot package)"
