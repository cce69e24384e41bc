#!/usr/bin/env bash
# The demo: boot our guests in every mode, pass a command line, count, and show
# that bad input is refused with a clear message.
set -uo pipefail
VMM=${1:-.build/release/vmm}
G=GuestImages/build

step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; echo "(exit status $?)"; }

step "real mode: a flat binary at 0x10000, CS:IP = 1000:0000" "$VMM" run $G/hello-real.bin --mode real
step "protected mode: flat 32-bit segments, paging off" "$VMM" run $G/hello-protected.bin --mode protected
step "long mode: 64-bit, identity-mapped, parameter block in RSI" "$VMM" run $G/hello-long.bin --mode long --memory 128M --cmdline "greeting=hi"
step "Multiboot: detected by its header; magic, memory map and command line" "$VMM" run $G/hello-multiboot.elf --memory 256M --cmdline "console=ttyS0 demo=1"
step "the counter guest, paced by the TSC, 10 steps" "$VMM" run $G/counter.elf --cmdline "count=10 ticks=20000000"
step "the exit port: status 42 comes back as the process status" "$VMM" run $G/status42.bin --mode protected
step "a guest that halts with interrupts on is reported as hung" "$VMM" run $G/hang.bin --mode protected
step "bad input: a flat binary without --mode" "$VMM" run $G/hello-real.bin
step "bad input: a memory size that makes no sense" "$VMM" run $G/hello-real.bin --memory 12Q
exit 0
