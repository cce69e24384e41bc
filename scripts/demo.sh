#!/usr/bin/env bash
# The demo: boot our guests in every mode and a foreign Multiboot kernel; pause,
# snapshot and restore the counter through the control API; migrate it live
# between two VMM processes and print the migration report.
set -uo pipefail
VMM=${1:-.build/release/vmm}
G=GuestImages/build
TMP=$(mktemp -d /tmp/vmm-demo.XXXXXX)
cleanup() { pkill -P $$ 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$1"; }
step() { say "$1"; shift; echo "\$ $*"; "$@"; echo "(exit status $?)"; }
wait_socket() { for _ in $(seq 100); do "$VMM" ctl info --api-socket "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "socket $1 did not come up"; return 1; }

step "real mode: a flat binary at 0x10000, CS:IP = 1000:0000" "$VMM" run $G/hello-real.bin --mode real
step "protected mode: flat 32-bit segments, paging off" "$VMM" run $G/hello-protected.bin --mode protected
step "long mode: 64-bit, identity-mapped, parameter block in RSI" "$VMM" run $G/hello-long.bin --mode long --memory 128M --cmdline "greeting=hi"
step "Multiboot: detected by its header; magic, memory map and command line" "$VMM" run $G/hello-multiboot.elf --memory 256M --cmdline "console=ttyS0 demo=1"
say "a Multiboot kernel nobody here wrote: Intel's tboot from Debian (first and last lines)"
echo "\$ $VMM run $G/third-party/tboot.elf --memory 128M --cmdline logging=serial"
"$VMM" run $G/third-party/tboot.elf --memory 128M --cmdline logging=serial | sed -n '3,6p;$p'
step "the exit port: status 42 comes back as the process status" "$VMM" run $G/status42.bin --mode protected
step "bad input: a flat binary without --mode" "$VMM" run $G/hello-real.bin
step "bad input: a memory size that makes no sense" "$VMM" run $G/hello-real.bin --memory 12Q

say "pause, snapshot and restore the counter through the control API"
"$VMM" run $G/counter.elf --cmdline "count=0 ticks=200000000" --api-socket "$TMP/a.sock" > "$TMP/a.out" 2>&1 &
wait_socket "$TMP/a.sock"
sleep 1
echo "\$ vmm ctl pause";    "$VMM" ctl pause --api-socket "$TMP/a.sock"
echo "\$ vmm ctl snapshot"; "$VMM" ctl snapshot "$TMP/counter.snap" --api-socket "$TMP/a.sock"
echo "\$ vmm ctl shutdown"; "$VMM" ctl shutdown --api-socket "$TMP/a.sock"
sleep 0.5
echo "the counter printed, before the snapshot:"; tail -n 3 "$TMP/a.out" | tr '\n' ' '; echo
echo "\$ vmm restore counter.snap   (runs 1 s, then stopped)"
timeout -s INT 1 "$VMM" restore "$TMP/counter.snap" | head -n 3

say "live migration of the running counter between two VMM processes"
"$VMM" run $G/counter.elf --cmdline "count=0 ticks=200000000" --api-socket "$TMP/src.sock" > "$TMP/src.out" 2>&1 &
"$VMM" receive --listen 127.0.0.1:7777 --api-socket "$TMP/dst.sock" > "$TMP/dst.out" 2>&1 &
wait_socket "$TMP/src.sock"
sleep 1
echo "\$ vmm ctl migrate 127.0.0.1:7777 --api-socket src.sock"
"$VMM" ctl migrate 127.0.0.1:7777 --api-socket "$TMP/src.sock" --quiet | python3 -m json.tool
sleep 1
echo "last lines on the source:      $(grep -E '^[0-9]+$' "$TMP/src.out" | tail -n 2 | tr '\n' ' ')"
echo "first lines on the destination: $(grep -E '^[0-9]*$' "$TMP/dst.out" | head -n 3 | tr '\n' ' ')"
"$VMM" ctl shutdown --api-socket "$TMP/dst.sock" >/dev/null
exit 0
