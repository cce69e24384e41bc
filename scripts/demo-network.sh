#!/usr/bin/env bash
# The demo's network section (called by scripts/demo.sh; needs root, /dev/net/tun, `ip netns`):
# netecho, registered with a MAC and an IP on both hosts' stores, answers a client's ping
# on host A's tap while it migrates live over TLS to host B's tap; then a guest that answers
# for an IP it was not registered with is filtered and stopped by the Billboard.
#
# From the caller's environment: VMM, TMP (its scratch directory), BB and BBB (the
# "--billboard DIR" options of demo-host's and host-b's stores, the hosts enrolled as each
# other's peers), ADMIN_KEY and ADMIN_B_KEY (their administrators' keys), G (guest images).
#
# The network, all of it inside namespaces named vmmdemo-PID-* (nothing is added to the
# root namespace), test-only addresses 10.200.x.y, bridges with STP off:
#   LAN    bridge brLAN; the client (10.200.0.1/24) on port clientPort; ports to-hosta, to-hostb
#   hostA  bridge brHOST: tap-a and the uplink to the LAN's to-hosta; mig 10.200.255.1/30
#   hostB  bridge brHOST: tap-b and the uplink to the LAN's to-hostb; mig 10.200.255.2/30
# A tap is opened (TUNSETIFF) in the namespace of the process that opens it, so each VMM runs
# under `ip netns exec` in its host's namespace, as NetworkLab does in the tests; the two
# VMMs then reach each other over their own link (mig), not bridged to the LAN. The control
# sockets and the stores are files, so `vmm ctl` and `vmm billboard` work from here.
# Everything (processes, then namespaces with their taps and veths) goes at exit, on failure too.
set -uo pipefail
: "${VMM:?} ${TMP:?} ${BB:?} ${BBB:?}"
ADMIN_KEY=${ADMIN_KEY:-$TMP/admin.key}
ADMIN_B_KEY=${ADMIN_B_KEY:-$TMP/admin-b.key}
G=${G:-GuestImages/build}

NS=vmmdemo-$$
LAN=$NS-lan HOSTA=$NS-hosta HOSTB=$NS-hostb
MAC=52:54:00:c8:00:20 IP=10.200.0.20
SPOOF_MAC=52:54:00:c8:00:30 SPOOF_REGISTERED=10.200.0.30 SPOOF_USED=10.200.0.66
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  for ns in "$HOSTB" "$HOSTA" "$LAN"; do ip netns delete "$ns" 2>/dev/null; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$1"; }
run() { echo "\$ $*"; "$@"; }
net() { ip "$@" || { echo "network setup failed: ip $*"; exit 1; }; }
fdb_port() { bridge -n "$LAN" fdb show br brLAN | awk -v m="$1" 'tolower($1)==m && !/permanent/ {for (i=1;i<NF;i++) if ($i=="dev") print $(i+1)}'; }
wait_socket() { for _ in $(seq 100); do "$VMM" ctl info --api-socket "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "socket $1 did not come up"; return 1; }
wait_line() { for _ in $(seq 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "'$2' did not appear in $1:"; cat "$1"; return 1; }

# Namespaces left by an earlier run that was killed outright (its PID is in their names).
for ns in $(ip netns list | awk '$1 ~ /^vmmdemo-[0-9]+-/ {print $1}'); do
  pid=${ns#vmmdemo-}; pid=${pid%%-*}
  kill -0 "$pid" 2>/dev/null || ip netns delete "$ns"
done

say "the network: a LAN with a client, host A and host B each with a bridge, a tap and an uplink (namespaces $NS-*)"
for ns in "$LAN" "$HOSTA" "$HOSTB"; do net netns add "$ns"; net -n "$ns" link set lo up; done
net -n "$LAN" link add brLAN type bridge stp_state 0
net -n "$LAN" link set brLAN up
net -n "$LAN" link add client type veth peer name clientPort
net -n "$LAN" link set clientPort master brLAN up
net -n "$LAN" addr add 10.200.0.1/24 dev client
net -n "$LAN" link set client up
for h in a b; do
  ns=$NS-host$h
  net -n "$ns" link add brHOST type bridge stp_state 0
  net -n "$ns" link set brHOST up
  net -n "$ns" tuntap add dev tap-$h mode tap
  net -n "$ns" link set tap-$h master brHOST up
  net -n "$ns" link add uplink type veth peer name to-host$h netns "$LAN"
  net -n "$ns" link set uplink master brHOST up
  net -n "$LAN" link set to-host$h master brLAN up
done
net -n "$HOSTA" link add mig type veth peer name mig netns "$HOSTB"
net -n "$HOSTA" addr add 10.200.255.1/30 dev mig
net -n "$HOSTB" addr add 10.200.255.2/30 dev mig
net -n "$HOSTA" link set mig up
net -n "$HOSTB" link set mig up
for ns in "$LAN" "$HOSTA" "$HOSTB"; do
  echo "[$ns]"
  for br in brLAN brHOST; do
    ip -n "$ns" link show "$br" >/dev/null 2>&1 || continue
    echo "  bridge $br, $(ip -n "$ns" -d link show "$br" | grep -o 'stp_state [0-9]'): ports $(ip -n "$ns" -o link show master "$br" | awk -F': ' '{sub(/@.*/, "", $2); print $2}' | xargs)"
  done
  ip -n "$ns" -o -4 addr show | awk '$2 != "lo" {print "  " $2 " " $4}'
done
echo "(uplink in a host and to-hostX in the LAN are the two ends of a veth pair; mig is the hosts' own link"
echo " for migrations, not on the LAN; stp_state 0: STP off, so ports forward at once)"

say "netecho registered on both hosts with its MAC and IP; it may run on demo-host and host-b"
for store in "$BB --signed-by $ADMIN_KEY" "$BBB --signed-by $ADMIN_B_KEY"; do
  # shellcheck disable=SC2086
  "$VMM" billboard register $store --name netecho --image "$G/netecho.elf" --cmdline "ip=$IP/24" \
    --mac $MAC --ip $IP --allowed-host demo-host --allowed-host host-b >/dev/null || echo "registering netecho failed"
done
echo "\$ vmm billboard list | grep netecho"; "$VMM" billboard list $BB | grep netecho
echo "\$ ip netns exec hostA vmm run netecho.elf --cmdline 'ip=$IP/24' --net tap=tap-a --name netecho --api-socket na.sock"
ip netns exec "$HOSTA" "$VMM" run "$G/netecho.elf" --cmdline "ip=$IP/24" --net tap=tap-a --name netecho \
  --api-socket "$TMP/na.sock" $BB --report-dir "$TMP/reports" > "$TMP/na.out" 2>&1 &
PIDS+=($!); SOURCE=$!
wait_socket "$TMP/na.sock" && wait_line "$TMP/na.out" "netecho mac=" || exit 1
echo "the guest says: $(grep 'netecho mac=' "$TMP/na.out")"

# The client's probe: an ICMP echo every 10 ms from a raw socket (no ping binary needed),
# counting replies; SIGUSR1 marks the start of the migration, SIGTERM ends it (with a last
# 300 ms for replies in flight) and prints what came back before and after the mark.
cat > "$TMP/pinger.py" <<'EOF'
import os, select, signal, socket, struct, sys, time
def csum(b):
    if len(b) % 2: b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
ip, ident = sys.argv[1], os.getpid() & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
mark, stop = [None], [None]
signal.signal(signal.SIGUSR1, lambda *_: mark.__setitem__(0, seq))
signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, time.monotonic() + 0.3))
sent, got, seq, nxt = {}, {}, 0, time.monotonic()
while stop[0] is None or time.monotonic() < stop[0]:
    now = time.monotonic()
    if stop[0] is None and now >= nxt:
        h = struct.pack('!BBHHH', 8, 0, 0, ident, seq)
        try:
            s.sendto(struct.pack('!BBHHH', 8, 0, csum(h + b'vmm-demo'), ident, seq) + b'vmm-demo', (ip, 0))
            sent[seq] = now
        except OSError: pass
        seq += 1; nxt += 0.01
    try: r, _, _ = select.select([s], [], [], max(0, min(nxt - time.monotonic(), 0.01)))
    except InterruptedError: continue
    if r:
        d, a = s.recvfrom(4096)
        t, _, _, i, q = struct.unpack('!BBHHH', d[(d[0] & 15) * 4:][:8])
        if a[0] == ip and t == 0 and i == ident:
            if q in sent and q not in got: got[q] = time.monotonic()
m = mark[0] if mark[0] is not None else seq
before = sum(1 for k in got if k < m); after = len(got) - before
lost = sorted(k for k in sent if k not in got)
gap, run, prev = 0, 0, None
for k in lost:
    run = run + 1 if prev == k - 1 else 1; prev = k; gap = max(gap, run)
print('sent %d echo requests, 10 ms apart (%d before the migration started, %d after)' % (len(sent), sum(1 for k in sent if k < m), sum(1 for k in sent if k >= m)))
print('replies before the migration: %d' % before)
print('replies after it started:     %d' % after)
print('lost:                         %d (the longest gap: %d in a row, about %d ms without an answer)' % (len(lost), gap, gap * 10))
EOF

say "the client pings netecho every 10 ms while it migrates live from host A to host B over TLS"
echo "\$ ip netns exec hostB vmm receive --listen 10.200.255.2:7790 --net tap=tap-b --billboard host-b --api-socket nb.sock"
ip netns exec "$HOSTB" "$VMM" receive --listen 10.200.255.2:7790 --net tap=tap-b --api-socket "$TMP/nb.sock" $BBB \
  --listen-timeout 60 --report-dir "$TMP/reports-b" > "$TMP/nb.out" 2>&1 &
PIDS+=($!)
wait_line "$TMP/nb.out" "listening on" >/dev/null || exit 1
ip netns exec "$LAN" python3 "$TMP/pinger.py" $IP > "$TMP/pinger.out" 2>&1 &
PIDS+=($!); PINGER=$!
sleep 1.5
echo "the LAN bridge learned the guest's MAC on port: $(fdb_port $MAC)   (to-hosta: host A's uplink)"
kill -USR1 $PINGER
echo "\$ vmm ctl migrate 10.200.255.2:7790 --peer host-b --api-socket na.sock   (host A's VMM connects over the hosts' own link)"
"$VMM" ctl migrate 10.200.255.2:7790 --peer host-b --api-socket "$TMP/na.sock" --quiet > "$TMP/migrate.json"
python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("  " + ", ".join("%s=%s" % (k, round(r[k], 1) if isinstance(r[k], float) else r[k]) for k in ("outcome","total_ms","downtime_ms","rounds") if k in r))' "$TMP/migrate.json" \
  || cat "$TMP/migrate.json"
wait_socket "$TMP/nb.sock" >/dev/null
sleep 1.5
kill -TERM $PINGER; wait $PINGER 2>/dev/null
echo "what the client saw:"; sed 's/^/  /' "$TMP/pinger.out"
wait_line "$TMP/nb.out" "announced" >/dev/null
echo "host B's VMM: $(grep -o 'network: announced.*' "$TMP/nb.out")"
echo "  (each round a RARP from $MAC and a gratuitous ARP for $IP, sent through tap-b)"
echo "\$ vmm ctl migration --api-socket nb.sock   (host B: the arrival, and its announcement)"
"$VMM" ctl migration --api-socket "$TMP/nb.sock" | python3 -c 'import json,sys
a = json.load(sys.stdin).get("incoming", {}).get("announce") or {}
print("  announce: state=%s planned_ms=%s sent_ms=%s frames_sent=%s errors=%s" % (a.get("state"), a.get("planned_ms"),
      [round(x, 1) for x in a.get("sent_ms", [])], a.get("frames_sent"), a.get("errors")))' || true
echo "the LAN bridge now has the guest's MAC on port: $(fdb_port $MAC)   (to-hostb: host B's uplink)"
echo "\$ bridge -n lan fdb show br brLAN | grep $MAC"; bridge -n "$LAN" fdb show br brLAN | grep -i $MAC
for _ in $(seq 50); do kill -0 $SOURCE 2>/dev/null || break; sleep 0.1; done
echo "host A's VMM ended after the handover: $(kill -0 $SOURCE 2>/dev/null && echo 'no, still running!' || echo yes)"

say "a guest that lies about its address: registered with $SPOOF_REGISTERED, it answers for $SPOOF_USED"
"$VMM" billboard register $BB --signed-by "$ADMIN_KEY" --name spoofer --image "$G/netecho.elf" --cmdline "ip=$SPOOF_USED/24 note=spoof" \
  --mac $SPOOF_MAC --ip $SPOOF_REGISTERED >/dev/null || echo "registering spoofer failed"
echo "\$ vmm billboard list | grep spoofer"; "$VMM" billboard list $BB | grep spoofer
echo "\$ ip netns exec hostA vmm run netecho.elf --cmdline 'ip=$SPOOF_USED/24 note=spoof' --net tap=tap-a --name spoofer --spoof-threshold 5"
ip netns exec "$HOSTA" "$VMM" run "$G/netecho.elf" --cmdline "ip=$SPOOF_USED/24 note=spoof" --net tap=tap-a --name spoofer \
  $BB --spoof-threshold 5 > "$TMP/spoof.out" 2>&1 &
PIDS+=($!); SPOOFER=$!
wait_line "$TMP/spoof.out" "netecho mac=" || exit 1
echo "the guest says: $(grep 'netecho mac=' "$TMP/spoof.out")"
# The client knows where .66 is without asking: the guest's ARP replies for it would be refused too.
ip -n "$LAN" neigh replace $SPOOF_USED lladdr $SPOOF_MAC dev client nud permanent
echo "the client pings $SPOOF_USED 10 times:"
ip netns exec "$LAN" python3 - $SPOOF_USED <<'EOF'
import os, socket, struct, sys, time
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
ip, ok = sys.argv[1], 0
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(0.3)
for seq in range(10):
    h = struct.pack('!BBHHH', 8, 0, 0, 0x4e47, seq)
    s.sendto(struct.pack('!BBHHH', 8, 0, csum(h + b'spoofed?'), 0x4e47, seq) + b'spoofed?', (ip, 0))
    try:
        while True:
            d, a = s.recvfrom(4096)
            if a[0] == ip and d[(d[0] & 15) * 4] == 0: ok += 1; break
    except socket.timeout: pass
print('  %d of 10 answered' % ok)
EOF
for _ in $(seq 100); do kill -0 $SPOOFER 2>/dev/null || break; sleep 0.1; done
wait $SPOOFER; status=$?
echo "the spoofer's VMM ended with status $status (3: stopped by the billboard); its last words:"
grep "stopped by the billboard" "$TMP/spoof.out" | sed "s/ head=[0-9a-f]*//" | fold -s -w 110 | sed 's/^/  /'
echo "\$ vmm billboard audit | grep -E 'network.spoof|scan.stopped'   (event, guest, details abridged)"
"$VMM" billboard audit $BB --last 30 | grep -E "network\.spoof|scan\.stopped" | grep spoofer | cut -f 4-6 | python3 -c '
import json, re, sys
for line in sys.stdin:
    event, guest, details = line.rstrip("\n").split("\t", 2)
    try: d = json.loads(details)
    except ValueError: d = {}
    evidence = re.sub(r" head=[0-9a-f]+", "", d.get("evidence", details))
    extra = "dropped=%s " % d["dropped"] if "dropped" in d else ""
    print("  %-14s %-8s %s%s" % (event, guest, extra, evidence[:150]))'

"$VMM" ctl shutdown --api-socket "$TMP/nb.sock" >/dev/null
exit 0
