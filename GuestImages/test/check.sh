#!/bin/sh
# Boots each guest image under QEMU and checks its serial output and exit
# status. Flat images go through build/flatboot.elf (a test-only shim that
# recreates the VMM's entry state). QEMU exits with (status << 1) | 1 via
# isa-debug-exit, 0 after a triple fault (-no-reboot), 124 = timeout.
# Usage: sh test/check.sh BUILD_DIR
B=${1:-build}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
pass=0 fail=0

# The guests are told the TSC rate; take the host's (KVM passes it through).
KHZ=$(dmesg 2>/dev/null | sed -n 's/.*tsc: Refined TSC clocksource calibration: \([0-9]*\)\.\([0-9]\{3\}\).*/\1\2/p' | tail -1)
[ -n "$KHZ" ] || KHZ=$(dmesg 2>/dev/null | sed -n 's/.*tsc: Detected \([0-9]*\)\.\([0-9]\{3\}\) MHz.*/\1\2/p' | tail -1)
[ -n "$KHZ" ] || KHZ=$(sed -n 's/^cpu MHz[^0-9]*\([0-9]*\)\.\([0-9]\{3\}\).*/\1\2/p' /proc/cpuinfo | head -1)

# boot SECONDS ARGS...: run QEMU; sets $rc and leaves output in $T/out.
boot() {
    secs=$1; shift
    timeout "$secs" qemu-system-x86_64 $ACCEL -m 64 -display none -nodefaults \
        -no-reboot -serial file:"$T/out" \
        -device isa-debug-exit,iobase=0xf4,iosize=1 "$@" </dev/null 2>"$T/err"
    rc=$?
}
# flat SECONDS MODE IMAGE [ARGS...]: boot a flat image through flatboot.elf.
flat() { secs=$1 mode=$2 img=$3; shift 3; boot "$secs" -kernel "$B/flatboot.elf" -initrd "$B/$img" -append "mode=$mode $*"; }

ok() { pass=$((pass + 1)); echo "ok   $1"; }
bad() { fail=$((fail + 1)); echo "FAIL $1 (rc=$rc)"; sed 's/^/     | /' "$T/out" | head -20; }
# expect NAME RC TEXT: exit code and exact output (TEXT is printf-formatted).
expect() {
    printf "$3" >"$T/exp"
    if [ "$rc" = "$2" ] && cmp -s "$T/exp" "$T/out"; then ok "$1"; else bad "$1"; fi
}
# expect_re NAME RC REGEX...: exit code and a grep -E match for each regex.
expect_re() {
    name=$1 want=$2; shift 2
    good=1
    [ "$rc" = "$want" ] || good=0
    for re in "$@"; do grep -Eq -- "$re" "$T/out" || good=0; done
    if [ $good = 1 ]; then ok "$name"; else bad "$name"; fi
}

# QEMU_ACCEL=tcg forces TCG; otherwise use KVM if a trial boot works.
if [ -n "$QEMU_ACCEL" ]; then
    ACCEL="-accel $QEMU_ACCEL"
else
    ACCEL="-accel kvm"
    boot 10 -kernel "$B/hello-multiboot.elf"
    [ "$rc" = 1 ] || { ACCEL="-accel tcg"; echo "KVM unusable, falling back to TCG"; }
fi
echo "accel: $ACCEL"
echo "tsc_khz=$KHZ"

boot 10 -kernel "$B/hello-multiboot.elf" -append "hello world"
expect_re hello-multiboot 1 '^Hello from multiboot$' '^mem_lower=[0-9]+ mem_upper=[0-9]+$' \
    '^cmdline=.*hello world$' '^mmap 0x0 0x[0-9a-f]+ 1$' '^mmap 0x100000 0x[0-9a-f]+ 1$'

boot 10 -kernel "$B/counter.elf" -append "count=5 ticks=1000000"
expect counter 1 'counter start\n1\n2\n3\n4\n5\n'
boot 10 -kernel "$B/counter.elf" -append "count=x5"
expect counter-bad-value 5 'counter: bad value count=x5\n'

boot 30 -kernel "$B/dirtier.elf" -append "pages=256 rate=0 passes=3 tsc_khz=$KHZ"
expect_re dirtier-fast 1 '^dirtier pages=256 rate=0 pattern=seq mark_us=1000$' '^dirtier done passes=3$'
start=$(date +%s%N)
boot 30 -kernel "$B/dirtier.elf" -append "pages=256 rate=1024 passes=2 pattern=random mark_us=10000 tsc_khz=$KHZ"
ms=$(( ($(date +%s%N) - start) / 1000000 ))
dots=$(tr -cd . <"$T/out" | wc -c)
echo "     paced run: 512 pages at 1024/s took ${ms} ms of wall time (incl. QEMU start), $dots marks (expect ~50)"
expect_re dirtier-paced 1 '^dirtier pages=256 rate=1024 pattern=random mark_us=10000$' '^dirtier done passes=2$'
[ "$dots" -ge 40 ] && [ "$dots" -le 55 ] && ok dirtier-paced-marks || bad dirtier-paced-marks
boot 10 -kernel "$B/dirtier.elf" -append "pages=16 passes=1"
expect_re dirtier-no-khz 5 '^dirtier: tsc_khz= is required'
boot 10 -kernel "$B/dirtier.elf" -append "pages=16 foo=1 tsc_khz=1"
expect dirtier-unknown 5 'dirtier: unknown parameter foo=1\n'
boot 10 -kernel "$B/dirtier.elf" -append "pages=16000 mark_us=0"
expect dirtier-too-big 5 'dirtier: working set does not fit\n'

flat 10 real hello-real.bin
expect hello-real 124 'Hello from real mode\n'
flat 10 protected hello-protected.bin
expect hello-protected 1 'Hello from protected mode\n'
flat 10 long hello-long.bin -- a b c
expect hello-long 1 'Hello from long mode\ncmdline: a b c\nmemory: 64 MiB\n'
flat 10 long hello-long.bin
expect hello-long-nocmd 1 'Hello from long mode\nmemory: 64 MiB\n'
flat 10 long hello-long.bin badmagic=1
expect hello-long-badmagic 7 'Hello from long mode\nbad parameter block\n'
flat 10 protected status42.bin
expect status42 85 ''
flat 10 protected hang.bin
expect hang 124 'hang\n'
flat 10 protected triplefault.bin
expect triplefault 0 ''

echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
