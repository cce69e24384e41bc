#!/usr/bin/env bash
# The demo: create this host's billboard and register every guest; add and remove a
# peer host by its exported identity file; boot our guests
# in every mode and a foreign Multiboot kernel; show the billboard refusing an
# unregistered image; pause, snapshot and restore the counter through the control
# API; migrate it live to a second host's store over mutually authenticated TLS and
# back, refusing a peer whose enrolment was removed, and print the migration report;
# plant a ghost beside the running guest and watch the scan stop it.
set -uo pipefail
VMM=${1:-.build/release/vmm}
G=GuestImages/build
TMP=$(mktemp -d /tmp/vmm-demo.XXXXXX)
cleanup() { pkill -P $$ 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$1"; }
step() { say "$1"; shift; echo "\$ $*"; "$@"; echo "(exit status $?)"; }
BB="--billboard $TMP/billboard"
reg() { "$VMM" billboard register $BB --signed-by "$TMP/admin.key" "$@" >/dev/null || echo "registering $* failed"; }
wait_socket() { for _ in $(seq 100); do "$VMM" ctl info --api-socket "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "socket $1 did not come up"; return 1; }

say "the billboard: this host's signed registry; no guest runs unless an administrator registered it"
step "create the store, the host keys and the first administrator key" "$VMM" billboard init $BB --host demo-host --admin-key "$TMP/admin.key"
step "register a guest: image digest, configuration, network identity, signed by the administrator" \
  "$VMM" billboard register $BB --signed-by "$TMP/admin.key" --name hello-real --image $G/hello-real.bin --mode real \
  --memory 64M --mac 52:54:00:00:00:01 --ip 10.0.0.1 --os "tiny real-mode guest" --beacons none
reg --name hello-protected --image $G/hello-protected.bin --mode protected --beacons none
reg --name hello-long --image $G/hello-long.bin --mode long --memory 128M --cmdline "greeting=hi" --beacons none
reg --name hello-multiboot --image $G/hello-multiboot.elf --memory 256M --cmdline "console=ttyS0 demo=1" --beacons none
[ -f $G/third-party/tboot.elf ] && reg --name tboot --image $G/third-party/tboot.elf --memory 128M --cmdline logging=serial --beacons none
reg --name status42 --image $G/status42.bin --mode protected --beacons none
reg --name counter --image $G/counter.elf --cmdline "count=0 ticks=200000000 secret=hunter2-demo"
reg --name mover --image $G/counter.elf --cmdline "count=0 ticks=100000000" --allowed-host demo-host --allowed-host host-b
reg --name liar --image $G/counter.elf --cmdline "count=0 ticks=200000000 beacon_token=12345"
reg --name busy --image $G/dirtier.elf --memory 128M --cmdline "pages=8192 passes=0 mark_us=0 pattern=random" --allowed-host demo-host --allowed-host host-b
echo "\$ vmm billboard list"; "$VMM" billboard list $BB

say "peer hosts: a host's identity (its public keys and TLS certificate) travels as a file an administrator adds"
"$VMM" billboard init --billboard "$TMP/peer" --host peer-host >/dev/null
step "on the peer: export its identity" "$VMM" billboard host export --billboard "$TMP/peer" --output "$TMP/peer-host.json"
step "here: add it, signed by the administrator (the file is checked: format, keys, self-signed certificate)" \
  "$VMM" billboard host add $BB --signed-by "$TMP/admin.key" "$TMP/peer-host.json"
step "remove it: its certificate and the states it signed are refused from now on" \
  "$VMM" billboard host remove peer-host $BB --signed-by "$TMP/admin.key"
echo "\$ vmm billboard host list"; "$VMM" billboard host list $BB | cut -f 1-3

step "real mode: a flat binary at 0x10000, CS:IP = 1000:0000" "$VMM" run $G/hello-real.bin --mode real $BB
step "protected mode: flat 32-bit segments, paging off" "$VMM" run $G/hello-protected.bin --mode protected $BB
step "long mode: 64-bit, identity-mapped, parameter block in RSI" "$VMM" run $G/hello-long.bin --mode long --memory 128M --cmdline "greeting=hi" $BB
step "Multiboot: detected by its header; magic, memory map and command line" "$VMM" run $G/hello-multiboot.elf --memory 256M --cmdline "console=ttyS0 demo=1" $BB
say "a Multiboot kernel nobody here wrote: Intel's tboot from Debian (first and last lines)"
echo "\$ $VMM run $G/third-party/tboot.elf --memory 128M --cmdline logging=serial"
"$VMM" run $G/third-party/tboot.elf --memory 128M --cmdline logging=serial $BB | sed -n '3,6p;$p'
step "the exit port: status 42 comes back as the process status" "$VMM" run $G/status42.bin --mode protected $BB
step "bad input: a flat binary without --mode" "$VMM" run $G/hello-real.bin $BB
step "bad input: a memory size that makes no sense" "$VMM" run $G/hello-real.bin --memory 12Q $BB
cp $G/hello-protected.bin "$TMP/tampered.bin"; printf '\x01' | dd of="$TMP/tampered.bin" bs=1 seek=40 conv=notrunc 2>/dev/null
step "refused: an image nobody registered (hello-protected with one byte changed)" "$VMM" run "$TMP/tampered.bin" --mode protected $BB
step "refused: a registered guest with a configuration it was not registered with" "$VMM" run $G/hello-protected.bin --mode protected --memory 128M --name hello-protected $BB

say "pause, snapshot and restore the counter through the control API"
mkdir -p "$TMP/snapshots"
"$VMM" run $G/counter.elf --cmdline "count=0 ticks=200000000 secret=hunter2-demo" --api-socket "$TMP/a.sock" --snapshot-dir "$TMP/snapshots" --name counter $BB > "$TMP/a.out" 2>&1 &
wait_socket "$TMP/a.sock"
sleep 1
echo "\$ vmm ctl pause";    "$VMM" ctl pause --api-socket "$TMP/a.sock"
echo "\$ vmm ctl snapshot counter.snap   (written inside the VMM's --snapshot-dir)"; "$VMM" ctl snapshot counter.snap --api-socket "$TMP/a.sock"
echo "\$ vmm ctl snapshot /etc/counter.snap   (refused: API snapshots go only into --snapshot-dir)"; "$VMM" ctl snapshot /etc/counter.snap --api-socket "$TMP/a.sock"
echo "\$ vmm ctl snapshot counter-clear.snap --unsealed   (for debugging only: the guest in clear)"; "$VMM" ctl snapshot counter-clear.snap --unsealed --api-socket "$TMP/a.sock" | python3 -c 'import json,sys; print(json.load(sys.stdin)["warnings"][0])'
echo "snapshots are sealed by default (AES-256-GCM, the key wrapped for the hosts that may restore the guest):"
echo "  lines holding the guest's secret 'secret=hunter2-demo' in counter.snap (sealed):         $(grep -a -c 'secret=hunter2-demo' "$TMP/snapshots/counter.snap")"
echo "  lines holding the guest's secret 'secret=hunter2-demo' in counter-clear.snap (unsealed): $(grep -a -c 'secret=hunter2-demo' "$TMP/snapshots/counter-clear.snap")"
echo "\$ vmm ctl shutdown"; "$VMM" ctl shutdown --api-socket "$TMP/a.sock"
sleep 0.5
echo "the counter printed, before the snapshot:"; tail -n 3 "$TMP/a.out" | tr '\n' ' '; echo
echo "\$ vmm restore counter.snap   (runs 1 s, then stopped)"
timeout -s INT 1 "$VMM" restore "$TMP/snapshots/counter.snap" $BB | head -n 3
step "refused: the same snapshot again (its epoch is older than the guest's; a rollback needs an administrator)" "$VMM" restore "$TMP/snapshots/counter.snap" $BB
cp "$TMP/snapshots/counter.snap" "$TMP/copied-elsewhere.snap"
step "refused: a copy of the sealed snapshot on peer-host, which it is not sealed for (it cannot unwrap the key)" \
  "$VMM" restore "$TMP/copied-elsewhere.snap" --billboard "$TMP/peer"

say "a second host, host-b: its own store and administrator; each host enrolls the other from its exported identity"
BBB="--billboard $TMP/host-b"
"$VMM" billboard init $BBB --host host-b --admin-key "$TMP/admin-b.key" >/dev/null
"$VMM" billboard register $BBB --signed-by "$TMP/admin-b.key" --name mover --image $G/counter.elf \
  --cmdline "count=0 ticks=100000000" --allowed-host demo-host --allowed-host host-b >/dev/null
"$VMM" billboard host export $BB --output "$TMP/demo-host.json" && "$VMM" billboard host export $BBB --output "$TMP/host-b.json"
step "here: add host-b" "$VMM" billboard host add $BB --signed-by "$TMP/admin.key" "$TMP/host-b.json"
step "on host-b: add this host" "$VMM" billboard host add $BBB --signed-by "$TMP/admin-b.key" "$TMP/demo-host.json"

say "live migration of the running counter to host-b over mutually authenticated TLS 1.3, and back"
"$VMM" run $G/counter.elf --cmdline "count=0 ticks=100000000" --api-socket "$TMP/src.sock" --name mover $BB --scan-interval 1 > "$TMP/src.out" 2>&1 &
"$VMM" receive --listen 127.0.0.1:7776 --billboard "$TMP/peer" > "$TMP/rogue.out" 2>&1 &
"$VMM" receive --listen 127.0.0.1:7777 --api-socket "$TMP/b.sock" $BBB --scan-interval 1 > "$TMP/b.out" 2>&1 &
wait_socket "$TMP/src.sock"
sleep 1
step "refused: peer-host, whose enrolment was removed, cannot take the guest (the TLS handshake fails; nothing of the guest leaves)" \
  "$VMM" ctl migrate 127.0.0.1:7776 --peer peer-host --api-socket "$TMP/src.sock" --quiet
echo "the source still counts: $(grep -E '^[0-9]+$' "$TMP/src.out" | tail -n 2 | tr '\n' ' ')"
echo "\$ vmm ctl migrate 127.0.0.1:7777 --peer host-b --api-socket src.sock"
"$VMM" ctl migrate 127.0.0.1:7777 --peer host-b --api-socket "$TMP/src.sock" --quiet | python3 -m json.tool
sleep 1
echo "last lines on this host: $(grep -E '^[0-9]+$' "$TMP/src.out" | tail -n 2 | tr '\n' ' ')"
echo "first lines on host-b:   $(grep -E '^[0-9]*$' "$TMP/b.out" | head -n 3 | tr '\n' ' ')"
echo "\$ vmm billboard instances --billboard host-b   (the lease moved with GO: host-b holds the next epoch)"
"$VMM" billboard instances $BBB | grep -v ended
"$VMM" receive --listen 127.0.0.1:7778 --api-socket "$TMP/dst.sock" --snapshot-dir "$TMP/snapshots" $BB --scan-interval 1 > "$TMP/dst.out" 2>&1 &
sleep 1
echo "\$ vmm ctl migrate 127.0.0.1:7778 --peer demo-host --api-socket b.sock   (back home)"
"$VMM" ctl migrate 127.0.0.1:7778 --peer demo-host --api-socket "$TMP/b.sock" --quiet | python3 -c 'import json,sys; r=json.load(sys.stdin); print({k: r[k] for k in ("outcome","total_ms","downtime_ms","rounds")})'
wait_socket "$TMP/dst.sock"
echo "\$ vmm billboard instances   (back here at the epoch after host-b's)"
"$VMM" billboard instances $BB | grep -v ended

say "post-copy: a busy guest (rewriting 32 MiB at random) moves to host-b after one pre-copy round; its pages follow on demand"
"$VMM" billboard register $BBB --signed-by "$TMP/admin-b.key" --name busy --image $G/dirtier.elf --memory 128M \
  --cmdline "pages=8192 passes=0 mark_us=0 pattern=random" --allowed-host demo-host --allowed-host host-b >/dev/null
"$VMM" run $G/dirtier.elf --memory 128M --cmdline "pages=8192 passes=0 mark_us=0 pattern=random" --api-socket "$TMP/busy.sock" --name busy $BB > "$TMP/busy.out" 2>&1 &
"$VMM" receive --listen 127.0.0.1:7779 --api-socket "$TMP/busy-b.sock" $BBB > "$TMP/busy-b.out" 2>&1 &
wait_socket "$TMP/busy.sock"
sleep 1
echo "\$ vmm ctl migrate 127.0.0.1:7779 --peer host-b --postcopy --postcopy-after-rounds 1 --api-socket busy.sock"
"$VMM" ctl migrate 127.0.0.1:7779 --peer host-b --postcopy --postcopy-after-rounds 1 --api-socket "$TMP/busy.sock" --quiet | python3 -c '
import json, sys
r = json.load(sys.stdin)
p = r.get("postcopy") or {}
print("outcome %s, total %.0f ms, downtime %.1f ms, %d pre-copy round(s)" % (r["outcome"], r["total_ms"], r["downtime_ms"], p.get("switched_after_rounds", 0)))
print("at the switch host-b lacked %d pages: %d pushed in the background, %d asked for by %d faults" % (p.get("pages_missing_at_switch", 0), p.get("pages_pushed", 0), p.get("pages_requested", 0), p.get("faults", 0)))
print("fault latency median %.2f ms, p99 %.2f ms; vCPUs blocked %.1f ms in all; last page %.0f ms after the resume" % (p.get("median_fault_ms", 0), p.get("p99_fault_ms", 0), p.get("vcpu_blocked_ms", 0), p.get("last_page_after_ms", 0)))'
wait_socket "$TMP/busy-b.sock"
echo "the busy guest runs on host-b: $("$VMM" ctl info --api-socket "$TMP/busy-b.sock" | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')"
"$VMM" ctl shutdown --api-socket "$TMP/busy-b.sock" >/dev/null

say "ghosts: a second copy of the running guest, and a guest that lies about who it is"
"$VMM" ctl pause --api-socket "$TMP/dst.sock" >/dev/null
"$VMM" ctl snapshot mover.snap --api-socket "$TMP/dst.sock" >/dev/null
"$VMM" ctl resume --api-socket "$TMP/dst.sock" >/dev/null
cp "$TMP/snapshots/mover.snap" "$TMP/stolen.snap"
step "refused: a copied snapshot restored beside the running original" "$VMM" restore "$TMP/stolen.snap" $BB
cp -a "$TMP/billboard" "$TMP/stolen-billboard"
step "refused: a VMM started against a copy of the store" "$VMM" restore "$TMP/stolen.snap" --billboard "$TMP/stolen-billboard"
echo "\$ vmm run counter.elf --cmdline '... beacon_token=12345' --name liar   (admitted, but its beacons carry a forged token)"
( "$VMM" run $G/counter.elf --cmdline "count=0 ticks=200000000 beacon_token=12345" --name liar $BB --scan-interval 3600 >/dev/null 2>&1
  echo $? > "$TMP/liar.status" ) 2>/dev/null &
for _ in $(seq 50); do [ -s "$TMP/liar.status" ] && break; sleep 0.1; done
echo "the false VM ended with status $(cat "$TMP/liar.status" 2>/dev/null || echo '(still running!)') (137: SIGKILL from another VMM's scan, within its 1 s interval)"
if command -v qemu-system-x86_64 >/dev/null; then
  echo "\$ qemu-system-x86_64 -enable-kvm -S -drive file=billboard.sqlite,...   (a VM that opened the store but was never admitted)"
  ( qemu-system-x86_64 -enable-kvm -m 16 -nodefaults -display none -S \
    -drive "file=$TMP/billboard/billboard.sqlite,format=raw,if=none,id=d0,readonly=on,file.locking=off" >/dev/null 2>&1; true ) 2>/dev/null &
  GHOST=$!
  for _ in $(seq 50); do kill -0 $GHOST 2>/dev/null || break; sleep 0.1; done
  if kill -0 $GHOST 2>/dev/null; then echo "the ghost is still running!"; kill -9 $GHOST; else echo "the ghost VM was stopped by the scan"; fi
  wait $GHOST 2>/dev/null
fi
echo "the original still counts: $(grep -E '^[0-9]+$' "$TMP/dst.out" | tail -n 2 | tr '\n' ' ')"
echo "\$ vmm billboard audit   (the last decisions, with their evidence)"
"$VMM" billboard audit $BB --last 40 | grep -E "scan.stopped|refused|handover" | cut -f 4-6 | cut -c 1-190 | tail -n 8
step "the audit log is a signed hash chain" "$VMM" billboard audit --verify $BB
# Audit export: anyone checks the chain with the host's public identity, no host.key, no store.
"$VMM" billboard audit $BB --export "$TMP/audit.json" >/dev/null
step "an auditor verifies the exported chain with only this host's identity file" \
  "$VMM" billboard audit --verify-export "$TMP/audit.json" --host-identity "$TMP/demo-host.json"
sed 's/"event":"guest.register"/"event":"guest.rename"/' "$TMP/audit.json" > "$TMP/audit-edited.json"
step "refused: the same export with one entry edited" \
  "$VMM" billboard audit --verify-export "$TMP/audit-edited.json" --host-identity "$TMP/demo-host.json"
"$VMM" ctl shutdown --api-socket "$TMP/dst.sock" >/dev/null
# The network section (scripts/demo-network.sh) builds namespaces, bridges and taps: root only.
if [ "$(id -u)" != 0 ]; then say "the network section is skipped: it needs root (network namespaces and taps)"
elif [ ! -c /dev/net/tun ]; then say "the network section is skipped: /dev/net/tun is missing"
elif ! ip netns list >/dev/null 2>&1; then say "the network section is skipped: \`ip netns\` is not available"
else VMM="$VMM" TMP="$TMP" G="$G" BB="$BB" BBB="$BBB" bash "$(dirname "$0")/demo-network.sh"; fi
exit 0
