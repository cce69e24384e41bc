#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build the guests and run the
# tests: binutils/gcc/make for GuestImages, linux-libc-dev for <linux/kvm.h>,
# and QEMU, against which the benchmark guest is checked.
set -euo pipefail

need=()
command -v gcc >/dev/null || need+=(gcc)
command -v as >/dev/null || need+=(binutils)
command -v make >/dev/null || need+=(make)
[ -f /usr/include/linux/kvm.h ] || need+=(linux-libc-dev)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
for extra in "$@"; do
    command -v "$extra" >/dev/null || need+=("$extra")
done

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
echo "installing: ${need[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then SUDO=sudo; else
        echo "error: missing packages (${need[*]}) and not root; install them with apt-get" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
