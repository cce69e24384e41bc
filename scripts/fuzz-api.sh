#!/usr/bin/env bash
# make fuzz-api: schemathesis (PyPI) against the control API of a live `vmm run` whose counter
# guest runs on /dev/kvm, through a socat TCP bridge to its Unix socket, driven by docs/api.yaml.
# The snapshot directory is planted with a subdirectory, a symlink out of it, a FIFO and (as
# root) an immutable file, and the spec copy the run uses offers those names as examples.
# Then raw probes schemathesis does not make (huge and chunked bodies, bad JSON, unknown paths
# and methods). PUT /vm/shutdown is left out (it ends the VMM: the Swift tests cover it);
# PUT /vm/migrate is fuzzed against a second VMM inside a network namespace of its own, where
# only loopback exists and nothing of the guest can leave the machine.
# Fails on any 5xx, schema violation, accepted invalid input, dead VMM or stopped guest.
#   FUZZ_API_EXAMPLES  test cases per operation and phase (default 100)
set -euo pipefail
VMM=$(realpath "${1:-.build/debug/vmm}")
EXAMPLES=${FUZZ_API_EXAMPLES:-100}
ROOT=$(pwd)
G=$ROOT/GuestImages/build
VENV=$ROOT/.build/fuzz-venv

# socat from Debian; schemathesis from PyPI into a venv (Debian's python3 refuses pip installs
# into the system, PEP 668, and the venv keeps it apart from everything else).
bash scripts/install-deps.sh socat
if [ ! -x "$VENV/bin/schemathesis" ]; then
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
        $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv
    fi
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q schemathesis
fi
echo "schemathesis $("$VENV/bin/schemathesis" --version | awk '{print $NF}'), socat $(socat -V | awk '/socat version/ {print $3}')"

TMP=$(mktemp -d /tmp/vmm-fuzz-api.XXXXXX)
# Full schemathesis logs and JUnit reports stay here after the run.
REPORTS=$ROOT/.build/fuzz-api-report
rm -rf "$REPORTS"; mkdir -p "$REPORTS"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -f "$TMP/snaps/frozen.snap" ] && chattr -i "$TMP/snaps/frozen.snap" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT

BB="--billboard $TMP/billboard"
CMDLINE="count=0 ticks=100000000"
"$VMM" billboard init $BB --host fuzz-host --admin-key "$TMP/admin.key" >/dev/null
"$VMM" billboard register $BB --signed-by "$TMP/admin.key" --name fuzzed --image "$G/counter.elf" --cmdline "$CMDLINE" >/dev/null
"$VMM" billboard register $BB --signed-by "$TMP/admin.key" --name migrated --image "$G/counter.elf" --cmdline "$CMDLINE" --memory 32M >/dev/null

# The snapshot directory, with every kind of name a snapshot must not be written through.
S=$TMP/snaps
mkdir -p "$S/dir" "$TMP/outside"
ln -s "$TMP/outside/through-link.snap" "$S/link"
ln -s "$S" "$TMP/outside/link-to-snaps"
mkfifo "$S/fifo"
echo old > "$S/frozen.snap"
[ "$(id -u)" -eq 0 ] && chattr +i "$S/frozen.snap" 2>/dev/null || chmod 0400 "$S/frozen.snap"

# The spec as published, plus those names as examples for the snapshot path.
"$VENV/bin/python" - "$ROOT/docs/api.yaml" "$TMP/api.yaml" "$S" "$TMP/outside" <<'EOF'
import sys, yaml
spec = yaml.safe_load(open(sys.argv[1]))
snaps, outside = sys.argv[3], sys.argv[4]
names = ["fuzz.snap", snaps + "/fuzz-absolute.snap", "dir", snaps + "/dir", "link", "fifo", "frozen.snap",
         "../escape.snap", snaps + "/../escape.snap", outside + "/elsewhere.snap", outside + "/link-to-snaps/x.snap",
         "/etc/vmm-fuzz.snap", "/", snaps + "/", "", ".", "..", "a/b", "x" * 300, "bad\u0000name", "line\nbreak"]
path = spec["components"]["schemas"]["SnapshotRequest"]["properties"]["path"]
path["examples"] = names
path["example"] = names[0]
yaml.safe_dump(spec, open(sys.argv[2], "w"), sort_keys=False)
EOF

wait_socket() {
    for _ in $(seq 100); do "$VMM" ctl info --api-socket "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "the VMM's socket $1 did not come up:"; cat "$TMP"/*.err; exit 1
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Checks that a VMM is alive, answers, and its guest still counts.
guest_alive() {
    local sock=$1 log=$2 state before
    state=$("$VMM" ctl info --api-socket "$sock" | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
    [ "$state" = paused ] && "$VMM" ctl resume --api-socket "$sock" >/dev/null
    before=$(wc -c < "$log"); sleep 1.5
    if [ "$(wc -c < "$log")" -le "$before" ]; then echo "FAIL: the guest behind $sock stopped printing"; return 1; fi
    echo "the VMM on $sock answers and its guest still counts ($(grep -cE '^[0-9]+$' "$log") lines)"
}

SUMMARY=$TMP/summary.txt
run_schemathesis() {
    local label=$1 port=$2; shift 2
    echo; echo "== schemathesis: $label"
    set +e
    "$VENV/bin/schemathesis" run "$TMP/api.yaml" --url "http://127.0.0.1:$port" --checks all \
        --exclude-checks positive_data_acceptance,ignored_auth,object_level_authorization,use_after_free,ensure_resource_availability \
        --max-examples "$EXAMPLES" --request-timeout 30 --workers 1 --seed 1 --no-color \
        --report junit --report-junit-path "$REPORTS/$label.xml" "$@" 2>&1 | tee "$REPORTS/$label.log" | tail -n 40
    local status=${PIPESTATUS[0]}
    set -e
    python3 - "$REPORTS/$label.xml" "$label" >> "$SUMMARY" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
tests = sum(int(s.get("tests", 0)) for s in suites)
failures = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
print(f"{sys.argv[2]}: {tests} operations and phases tested, {failures} failed")
EOF
    grep -A1 "Test cases:" "$REPORTS/$label.log" | tail -n 1 | sed "s/^ */$label: test cases: /" >> "$SUMMARY" || true
    return "$status"
}

FAILED=0
# The namespace below runs a new bash: it needs these.
export VMM VENV TMP EXAMPLES SUMMARY REPORTS
export -f run_schemathesis guest_alive

# 1. Everything but shutdown and migrate, against one VMM whose guest runs throughout.
SOCK=$TMP/fuzz.sock
"$VMM" run "$G/counter.elf" --cmdline "$CMDLINE" --name fuzzed $BB --api-socket "$SOCK" --snapshot-dir "$S" \
    > "$TMP/fuzz.out" 2> "$TMP/fuzz.err" &
VMM_PID=$!; PIDS+=($VMM_PID)
wait_socket "$SOCK"
PORT=$(free_port)
socat TCP-LISTEN:$PORT,bind=127.0.0.1,fork,reuseaddr UNIX-CONNECT:"$SOCK" & PIDS+=($!)
sleep 0.3
run_schemathesis api "$PORT" --exclude-path /vm/shutdown --exclude-path /vm/migrate || FAILED=1
# Snapshots and digests again with the guest paused, so that accepted names are really written.
"$VMM" ctl pause --api-socket "$SOCK" >/dev/null
run_schemathesis paused "$PORT" --include-path /vm/snapshot --include-path /vm/digest || FAILED=1
"$VMM" ctl resume --api-socket "$SOCK" >/dev/null

echo; echo "== raw probes: huge, chunked, malformed and misrouted requests"
"$VENV/bin/python" - "$SOCK" <<'EOF' || FAILED=1
import json, socket, sys, time
sock_path = sys.argv[1]
def exchange(raw, timeout=20):
    s = socket.socket(socket.AF_UNIX); s.settimeout(timeout); s.connect(sock_path)
    t0 = time.time()
    try: s.sendall(raw)
    except (BrokenPipeError, ConnectionResetError): pass  # refused before the body was read
    except socket.timeout: return b"", time.time() - t0  # the server stopped reading and never answered
    data = b""
    try:
        while chunk := s.recv(65536): data += chunk
    except (socket.timeout, ConnectionResetError): pass
    return data, time.time() - t0
def request(method, path, body=b"", headers=""):
    head = f"{method} {path} HTTP/1.1\r\nHost: l\r\nConnection: close\r\n{headers}"
    if "Transfer-Encoding" not in headers: head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body
chunked = b"".join(b"4000\r\n" + b" " * 0x4000 + b"\r\n" for _ in range(256)) + b"0\r\n\r\n"
probes = [
    ("1 MiB JSON body", request("PUT", "/vm/resume", b'{"force": "' + b"x" * (1 << 20) + b'"}'), 413),
    ("1 GB announced, 1 byte sent", b"PUT /vm/snapshot HTTP/1.1\r\nHost: l\r\nContent-Length: 1000000000\r\n\r\n{", 413),
    ("4 MiB chunked", request("PUT", "/vm/resume", chunked, "Transfer-Encoding: chunked\r\n"), 413),
    ("huge body on a GET", request("GET", "/vm", b"x" * (1 << 20)), 413),
    ("bad JSON", request("PUT", "/vm/snapshot", b"{\"path\": "), 400),
    ("JSON that is not an object", request("PUT", "/vm/resume", b"[true]"), 400),
    ("nested 100000 deep", request("PUT", "/vm/resume", b"[" * 100000), 413),
    ("nested 50000 deep", request("PUT", "/vm/resume", b"[" * 50000), 400),
    ("invalid UTF-8", request("PUT", "/vm/snapshot", b'{"path": "\xff\xfe"}'), 400),
    ("number too large", request("PUT", "/vm/migrate", b'{"destination": "127.0.0.1:1", "transport": "plaintext", "max_bandwidth": 1e400}'), 400),
    ("unknown path", request("GET", "/vm/../etc/passwd"), 404),
    ("unknown path", request("PUT", "/api/v1/vm"), 404),
    ("unknown method", request("DELETE", "/vm"), 405),
    ("unknown method", request("POST", "/vm/snapshot", b"{}"), 405),
]
failed = 0
for label, raw, expected in probes:
    data, took = exchange(raw)
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    body = data.split(b"\r\n\r\n", 1)[-1]
    try: error = json.loads(body).get("error")
    except Exception: error = None
    ok = status == expected and error and took < 5
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {label}: {status} in {took:.2f} s: {error}")
sys.exit(1 if failed else 0)
EOF
guest_alive "$SOCK" "$TMP/fuzz.out" || FAILED=1
kill -0 $VMM_PID || { echo "FAIL: the VMM died"; FAILED=1; }

# 2. PUT /vm/migrate against a fresh VMM in a network namespace with only loopback: whatever
#    destination schemathesis makes up, nothing leaves this machine.
echo
if unshare --net true 2>/dev/null; then
    PORT2=$(free_port)
    set +e
    unshare --net bash -c '
        set -e
        ip link set lo up
        "$0" run "$1/counter.elf" --cmdline "$2" --memory 32M --name migrated --billboard "$3/billboard" \
            --api-socket "$3/migrate.sock" --snapshot-dir "$3/snaps" > "$3/migrate.out" 2> "$3/migrate.err" &
        VMM_PID=$!
        for _ in $(seq 100); do "$0" ctl info --api-socket "$3/migrate.sock" >/dev/null 2>&1 && break; sleep 0.1; done
        socat TCP-LISTEN:$4,bind=127.0.0.1,fork,reuseaddr UNIX-CONNECT:"$3/migrate.sock" & SOCAT=$!
        sleep 0.3
        status=0
        run_schemathesis migrate "$4" --include-path /vm/migrate --include-path /vm/migration || status=1
        sleep 2  # let the last migration to nowhere fail and the guest resume
        guest_alive "$3/migrate.sock" "$3/migrate.out" || status=1
        kill -0 $VMM_PID || { echo "FAIL: the migrating VMM died"; status=1; }
        kill $SOCAT $VMM_PID
        exit $status
    ' "$VMM" "$G" "$CMDLINE" "$TMP" "$PORT2"
    [ $? -eq 0 ] || FAILED=1
    set -e
else
    echo "== PUT /vm/migrate not fuzzed: a network namespace of its own needs root (unshare --net)"
fi

echo; echo "== summary"
cat "$SUMMARY"
echo "(full logs and JUnit reports in $REPORTS)"
ls "$S" | tr '\n' ' '; echo "(the snapshot directory at the end)"
if [ -n "$(ls -A "$TMP/outside" | grep -v link-to-snaps)" ] || [ -e /etc/vmm-fuzz.snap ] || [ -e "$TMP/escape.snap" ]; then
    echo "FAIL: a snapshot was written outside the snapshot directory"; FAILED=1
fi
[ "$(cat "$S/frozen.snap")" = old ] || { echo "FAIL: the unwritable file was replaced"; FAILED=1; }
[ -z "$(ls -A "$S/dir")" ] || { echo "FAIL: something was written into a subdirectory"; FAILED=1; }
if [ $FAILED -eq 0 ]; then echo "fuzz-api: no failures"; else echo "fuzz-api: FAILED (logs above)"; fi
exit $FAILED
