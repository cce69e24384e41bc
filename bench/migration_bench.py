#!/usr/bin/env python3
"""Live-migration benchmark: our VMM against QEMU, each in plaintext and over TLS, and
our two dirty trackers; post-copy beside QEMU's; a networked guest pinged while it moves.

Four systems migrate the same guest with the same settings: ours over mutually
authenticated TLS (the default), ours with --insecure-plaintext, QEMU over plain TCP
and QEMU with tls-creds-x509 (mutual, certificates made with openssl for the run).
Every run boots the dirtier workload (GuestImages/build/dirtier.elf) on a source,
lets it reach steady state, migrates it over loopback TCP to a destination on the
same host, and measures the migration from the inside (each system's own report)
and from the outside (gaps between the guest's serial progress marks). A system this
build cannot run (ours over TLS before TLS is wired) is skipped with the reason.

Two cases differ: `postcopy` runs the 256 MiB unpaced dirtier and switches to post-copy
after two copy passes (ours and QEMU's, plain); `net` boots netecho on a tap in one host
namespace, migrates it over the hosts' own link to a tap in another, and measures what a
client on the LAN bridge sees (ICMP and UDP echo every 10 ms). It needs root, /dev/net/tun
and `ip netns`, and is skipped with the reason otherwise.

Only one system runs at a time. Python 3 standard library, plus matplotlib for
the plot. See bench/README.md.
"""

import argparse
import atexit
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_cost  # noqa: E402  (bench/cpu_cost.py, beside this file)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEMORY_MIB = 512
VCPUS = 1
MARK_US = 1000
PATTERN = "seq"
# The dirtier prints the page writes per second it achieved every REPORT_MS (`rate=N`); the
# harness keeps those that arrive while a migration runs.
REPORT_MS = 100
# A fill writes every page of the working set once before the writes begin (about 0.6 ms a page
# on this host, 30 s for 64 MiB when it is loaded); the harness waits this long for it at most.
FILL_TIMEOUT_S = 300
# QEMU's max-bandwidth defaults to 128 MiB/s; "unlimited" is spelled as 1 TiB/s.
QEMU_UNLIMITED_BANDWIDTH = 1 << 40
# QEMU's auto-converge throttle, given explicitly (its defaults are 20/10/99 too). Ours sizes its
# throttle from the dirty/link ratio once the rounds stall (docs/migration.md).
THROTTLE_INITIAL, THROTTLE_INCREMENT, THROTTLE_MAX = 20, 10, 99

# name -> (label, dirtier pages, dirtier rate in pages/s, x label for the plot)
CASES = {
    "idle": ("idle (1 page at 1 page/s)", 1, 1, "idle"),
    "ws64-5k": ("64 MiB at 5,000 pages/s", 16384, 5000, "64M\n5k/s"),
    "ws64-20k": ("64 MiB at 20,000 pages/s", 16384, 20000, "64M\n20k/s"),
    "ws64-50k": ("64 MiB at 50,000 pages/s", 16384, 50000, "64M\n50k/s"),
    "ws256-max": ("256 MiB unpaced", 65536, 0, "256M\nunpaced"),
    # Honest workloads (issue #14): working sets of incompressible or text-like bytes, filled once
    # at start; each write then changes a few bytes of a page. Neither system compresses, so these
    # show what the zero-filled cases would hide if one did.
    "ws64-5k-random": ("64 MiB of random bytes at 5,000 pages/s", 16384, 5000, "64M random\n5k/s"),
    "ws64-5k-text": ("64 MiB of text at 5,000 pages/s", 16384, 5000, "64M text\n5k/s"),
    "ws64-max-random": ("64 MiB of random bytes, unpaced", 16384, 0, "64M random\nunpaced"),
    # The hot sweep: one byte at the start of every page, in order, in the tightest loop the guest
    # has; no marks, no reports (they would slow it).
    "hot256": ("256 MiB hot sweep (one byte per page, unpaced, no marks)", 65536, 0, "256M\nhot sweep"),
    # The same workload as ws256-max, switched to post-copy (issue #15): ours after two rounds,
    # QEMU asked after its second dirty sync.
    "postcopy": ("256 MiB unpaced, post-copy", 65536, 0, "256M\npost-copy"),
    # netecho on a tap, pinged and UDP-echoed from a client on the LAN while it migrates between two
    # host namespaces (issue #16); no dirtier, so no pages or rate.
    "net": ("netecho on a bridged tap, pinged every 10 ms", None, None, "network"),
}
# The dirtier's options beyond pages and rate, where a case differs from the defaults of
# dirtier_options (pattern=seq mark_us=1000 report_ms=100 fill=zero store=word).
DIRTIER_OPTIONS = {
    "ws64-5k-random": {"fill": "random"},
    "ws64-5k-text": {"fill": "text"},
    "ws64-max-random": {"fill": "random"},
    "hot256": {"store": "byte", "mark_us": 0, "report_ms": 0},
}
# `--quick` and `make bench-migration QUICK=1`: the everyday subset, one run each at 300 ms,
# ours against QEMU (no ring tracker).
QUICK_CASES = ["idle", "ws64-20k", "hot256"]
POSTCOPY_CASE, NET_CASE = "postcopy", "net"
# These cases run at the 300 ms limit without auto-converge only; the others with every setting.
# The filled ones because each run first spends 10 to 30 s filling the working set.
SINGLE_SETTING_CASES = {POSTCOPY_CASE: [(300, False)], NET_CASE: [(300, False)],
                        "ws64-5k-random": [(300, False)], "ws64-5k-text": [(300, False)],
                        "ws64-max-random": [(300, False)]}
# Ours switches after this many pre-copy rounds (round 0 sends every page, round 1 what was
# dirtied during it).
POSTCOPY_AFTER_ROUNDS = 2
# QEMU is asked to switch (migrate-start-postcopy) once its dirty-sync-count reaches this, as
# issue #15 says: after its second sync (the one at setup, then the one ending the first pass).
# QEMU switches at the start of its next iteration (each sends for at most 50 ms), so early in
# its second pass. Asked at 3 (the end of its second pass, ours' point), it had usually sent the
# little its third pass held before it looked, and then completed in pre-copy (2 of 3 runs
# here): --qemu-postcopy-sync 3 tries that.
QEMU_POSTCOPY_SYNCS = 2
# Ours switches by rounds whatever is left. QEMU, asked to switch, still finishes in pre-copy
# when what is left fits its downtime limit at its measured bandwidth (seen here: 140 MB left at
# about 1.4 GB/s against 300 ms, so a 143 ms stop-and-copy and no post-copy at all). In its
# post-copy runs the limit decides only that, so it gets 1 ms (not 0: it syncs only when what is
# left is under the limit's worth, so with 0 it would never sync again).
QEMU_POSTCOPY_DOWNTIME_MS = 1

# The four systems, in table order. Ours uses the bitmap tracker; "ours-tls-ring" is the
# default transport again with the ring tracker, for the tracker comparison.
SYSTEMS = ["ours-tls", "ours-plain", "qemu", "qemu-tls"]
RING = "ours-tls-ring"
SYSTEM_LABEL = {"ours-tls": "ours TLS", "ours-plain": "ours plain", "qemu": "QEMU plain",
                "qemu-tls": "QEMU TLS", RING: "ours TLS, ring"}
# Ratio columns of the main table: left / right, and the column's heading.
COMPARISONS = [("ours-tls", "qemu-tls", "TLS: ours/QEMU"),
               ("ours-tls", "qemu", "ours TLS/QEMU plain"),
               ("ours-plain", "qemu", "plain: ours/QEMU"),
               ("ours-tls", "ours-plain", "ours: TLS/plain")]

# A run that fails with one of these messages shows that this build cannot run the system at
# all (not that the migration failed): the system is skipped for the rest of the benchmark.
UNAVAILABLE_MESSAGES = ["TLS migration is not wired"]


def systems_for(case, systems):
    """The systems a case runs: the ring tracker only in the pre-copy matrix; QEMU's post-copy
    in plaintext only (as issue #15 asks)."""
    if case == POSTCOPY_CASE:
        return [s for s in systems if s not in (RING, "qemu-tls")]
    if case == NET_CASE:
        return [s for s in systems if s != RING]
    return list(systems)


class Unavailable(Exception):
    """This build cannot run a system; the message says why."""


def unavailable_reason(text):
    """The line of `text` that says the system cannot run here, or None."""
    for line in (text or "").splitlines():
        if any(m in line for m in UNAVAILABLE_MESSAGES):
            return line.strip()
    return None


def log(msg):
    print(msg, flush=True)


def warn(msg):
    print("warning: " + msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- children

class Children:
    """Every process we start; each leads its own session so it can be killed
    with its descendants, and nothing else is ever touched."""

    def __init__(self):
        self.lock = threading.Lock()
        self.procs = []

    def spawn(self, cmd, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(cmd, start_new_session=True, **kw)
        with self.lock:
            self.procs.append(p)
        return p

    @staticmethod
    def kill(p, sig=signal.SIGKILL):
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, p, grace=3.0):
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if p.poll() is None:
            self.kill(p, signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill(p)
                try:
                    p.wait(3)
                except subprocess.TimeoutExpired:
                    pass
        self.forget(p)

    def forget(self, p):
        with self.lock:
            if p in self.procs and p.poll() is not None:
                self.procs.remove(p)

    def kill_all(self):
        with self.lock:
            procs = list(self.procs)
        for p in procs:
            self.kill(p)
        for p in procs:
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                pass


CHILDREN = Children()


class Billboard:
    """A billboard for this run: every guest our VMM boots is registered first, as the VMM
    requires (there is no way to skip admission). Its cost is part of what is measured."""

    def __init__(self, vmm, workdir):
        self.vmm = vmm
        self.dir = os.path.join(workdir, "billboard")
        self.admin = os.path.join(workdir, "admin.key")
        self.names = {}
        # Both VMMs use this store, so they are the same host; with TLS the source names it as
        # the peer it expects at the destination (a host always trusts itself).
        self.host = "bench"
        subprocess.run([vmm, "billboard", "init", "--billboard", self.dir, "--host", self.host,
                        "--admin-key", self.admin], check=True, stdout=subprocess.DEVNULL)

    def args(self):
        return ["--billboard", self.dir]

    def guest(self, image, memory, cmdline, network=False):
        """Arguments naming the registration of exactly this image, memory and command line;
        with `network`, the MAC and IP its network card gets (NET_GUEST_MAC, NET_GUEST_IP)."""
        key = (image, memory, cmdline, network)
        if key not in self.names:
            name = "bench%d" % (len(self.names) + 1)
            subprocess.run([self.vmm, "billboard", "register", "--billboard", self.dir, "--signed-by", self.admin,
                            "--name", name, "--image", image, "--memory", memory, "--cmdline", cmdline]
                           + (["--mac", NET_GUEST_MAC, "--ip", NET_GUEST_IP] if network else []),
                           check=True, stdout=subprocess.DEVNULL)
            self.names[key] = name
        return self.args() + ["--name", self.names[key]]


BILLBOARD = None


def clean_up():
    """Every child first (some run inside the namespaces), then the network case's namespaces."""
    CHILDREN.kill_all()
    NetTopology.close_all()


atexit.register(clean_up)


def _on_signal(signum, _frame):
    clean_up()
    sys.exit(128 + signum)


signal.signal(signal.SIGTERM, _on_signal)
# Ctrl-C stops the run even where the shell started us with SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, _on_signal)


def run_quiet(cmd, timeout, **kw):
    """Runs a short command to completion, killing it on timeout."""
    p = CHILDREN.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        CHILDREN.kill(p)
        out, err = p.communicate()
        CHILDREN.forget(p)
        return None, out.decode(errors="replace"), err.decode(errors="replace")
    CHILDREN.forget(p)
    return p.returncode, out.decode(errors="replace"), err.decode(errors="replace")


# ---------------------------------------------------------------- serial marks

class SerialMarks:
    """Reads a child's serial output on a thread and timestamps every '.', and every line of
    the rest (the dirtier's `rate=N` reports and its fill line among them)."""

    def __init__(self, stream):
        self.fd = stream.fileno()
        self.stream = stream
        self.marks = []
        self.text = bytearray()      # everything that is not a mark (bounded)
        self.lines = []              # (arrival time, line) of the text that is not marks (bounded)
        self.rates = []              # (arrival time, page writes/s) of the dirtier's rate= reports
        self._partial = bytearray()
        self.first = threading.Event()
        self.eof = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _take_lines(self, text, now):
        self._partial += text
        while b"\n" in self._partial:
            raw, _, rest = bytes(self._partial).partition(b"\n")
            self._partial = bytearray(rest)
            line = raw.decode(errors="replace").strip()
            if not line or len(self.lines) >= 100000:
                continue
            self.lines.append((now, line))
            m = re.match(r"^rate=(\d+)$", line)
            if m:
                self.rates.append((now, int(m.group(1))))
        if len(self._partial) > 4096:
            self._partial = bytearray()

    def line(self, prefix):
        """The first (arrival time, line) starting with `prefix`, or None."""
        for t, line in list(self.lines):
            if line.startswith(prefix):
                return t, line
        return None

    def _run(self):
        try:
            while True:
                chunk = os.read(self.fd, 65536)
                now = time.monotonic()
                if not chunk:
                    break
                n = chunk.count(b".")
                if n:
                    self.marks.extend([now] * n)
                    self.first.set()
                if n != len(chunk):
                    text = chunk.replace(b".", b"")
                    if len(self.text) < 8192:
                        self.text += text
                    self._take_lines(text, now)
        except OSError:
            pass
        finally:
            self.eof.set()
            self.first.set()

    def header(self):
        return self.text.decode(errors="replace").strip()


def read_tail(path, limit=1500):
    try:
        with open(path, "rb") as f:
            data = f.read()
        return data[-limit:].decode(errors="replace").strip()
    except OSError:
        return ""


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_steady(src, proc, steady_s, boot_timeout):
    """Waits for the first mark, then `steady_s` more seconds. Returns an error or None."""
    if not src.first.wait(boot_timeout) or not src.marks:
        return "no progress mark within %.0f s (exit status %s); serial: %r" % (
            boot_timeout, proc.poll(), src.header()[:200])
    deadline = src.marks[0] + steady_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "the source ended before the migration (status %s); serial: %r" % (
                proc.returncode, src.header()[:200])
        time.sleep(0.05)
    return None


def wait_line(serial, proc, prefix, timeout):
    """Waits for a line of serial output starting with `prefix`. Returns (time, line) or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = serial.line(prefix)
        if found:
            return found
        if proc.poll() is not None or serial.eof.is_set():
            return serial.line(prefix)
        time.sleep(0.05)
    return None


def wait_ready(src, proc, case, steady_s, boot_timeout):
    """wait_steady for the dirtier of `case`: a filled working set first (the fill takes seconds;
    the marks begin after it), and, in a case without marks, `steady_s` from the start line.
    Returns (an error or None, what to record)."""
    opts = dirtier_options(case)
    info = {}
    if opts["fill"] != "zero":
        t_wait = time.monotonic()
        found = wait_line(src, proc, "dirtier filled", FILL_TIMEOUT_S)
        if not found:
            return ("the dirtier did not finish its fill=%s within %d s (exit status %s); serial: %r" % (
                opts["fill"], FILL_TIMEOUT_S, proc.poll(), src.header()[:200])), info
        m = re.search(r"in (\d+) ms", found[1])
        info["fill_ms"] = int(m.group(1)) if m else None
        info["fill_waited_s"] = round(found[0] - t_wait, 2)
    if opts["mark_us"]:
        return wait_steady(src, proc, steady_s, boot_timeout), info
    found = wait_line(src, proc, "dirtier pages=", boot_timeout)
    if not found:
        return "no start line within %.0f s (exit status %s); serial: %r" % (
            boot_timeout, proc.poll(), src.header()[:200]), info
    while time.monotonic() < found[0] + steady_s:
        if proc.poll() is not None:
            return "the source ended before the migration (status %s); serial: %r" % (
                proc.returncode, src.header()[:200]), info
        time.sleep(0.05)
    return None, info


def write_rates(src, dst, t_start, t_end):
    """The page writes per second the dirtier achieved, from its rate= reports (each covers the
    REPORT_MS before it): in the 2 s before the migration, and during it (the source's reports
    that arrived between its start and end; a migration shorter than a report period gets the
    first report after its start, from either side, which overlaps it)."""
    s = list(src.rates)
    before = [r for t, r in s if t_start - 2 <= t < t_start]
    during = [r for t, r in s if t_start <= t <= t_end]
    how = "the source's reports that arrived during the migration"
    if not during:
        later = sorted([(t, r) for t, r in s if t >= t_start]
                       + [(t, r) for t, r in (list(dst.rates) if dst is not None else []) if t >= t_start])
        if later:
            during = [later[0][1]]
            how = "the first report after the start (the migration was shorter than a report period)"
        else:
            how = None
    return {"write_rate_before": statistics.mean(before) if before else None,
            "write_rate_during": statistics.mean(during) if during else None,
            "write_rate_reports_during": len(during), "write_rate_how": how}


def cpu_fields(cpu, memory_mib):
    """The record's CPU fields from a cpu_cost.Window: seconds of the source and the destination
    outside their vCPU threads, and the same per GiB of guest memory."""
    gib = memory_mib / 1024
    src, dst = cpu.get("source"), cpu.get("destination")
    both = src + dst if src is not None and dst is not None else None
    return {"cpu_source_s": src, "cpu_destination_s": dst, "cpu_s": both,
            "cpu_source_s_per_gib": src / gib if src is not None else None,
            "cpu_destination_s_per_gib": dst / gib if dst is not None else None,
            "cpu_s_per_gib": both / gib if both is not None else None,
            "cpu_window": cpu}


def wire_fields(bytes_sent, memory_bytes):
    return {"memory_bytes": memory_bytes,
            "wire_per_memory": bytes_sent / memory_bytes if bytes_sent and memory_bytes else None}


def mark_gaps(src, dst, t_start, t_end, settle_s, completed):
    """Observed downtime from the serial marks.

    baseline_max_gap_ms: longest gap on the source in the 2.5 s before the migration
        (the noise floor of this measure on this host).
    handover_gap_ms: the source's last mark to the destination's first.
    max_gap_ms: longest gap between consecutive marks from the last mark before the
        migration started to `settle_s` after it ended, across both processes.
    """
    s = list(src.marks)
    d = list(dst.marks) if dst is not None else []
    before = [t for t in s if t < t_start]
    base = [t for t in before if t >= t_start - 2.5]
    res = {"baseline_max_gap_ms": None, "handover_gap_ms": None, "max_gap_ms": None,
           "src_marks_during": sum(1 for t in s if t >= t_start),
           "dst_marks_in_settle": sum(1 for t in d if t <= t_end + settle_s),
           "dst_mark_rate_per_s": None}
    if len(base) >= 2:
        res["baseline_max_gap_ms"] = 1000 * max(b - a for a, b in zip(base, base[1:]))
    window = ([before[-1]] if before else []) + [t for t in s if t >= t_start]
    if completed:
        window += [t for t in d if t <= t_end + settle_s]
        if d and s:
            last_src = max(t for t in s if t <= d[0]) if any(t <= d[0] for t in s) else None
            if last_src is not None:
                res["handover_gap_ms"] = 1000 * (d[0] - last_src)
        dd = [t for t in d if t <= t_end + settle_s]
        if len(dd) >= 2 and dd[-1] > dd[0]:
            res["dst_mark_rate_per_s"] = (len(dd) - 1) / (dd[-1] - dd[0])
    else:
        window = [t for t in window if t <= t_end]
    window.sort()
    if len(window) >= 2:
        res["max_gap_ms"] = 1000 * max(b - a for a, b in zip(window, window[1:]))
    if not completed and res["max_gap_ms"] is not None and s and s[-1] < t_end:
        # The source stopped marking before the migration gave up; count that silence too.
        res["max_gap_ms"] = max(res["max_gap_ms"], 1000 * (t_end - s[-1]))
    return res


# ---------------------------------------------------------------- our VMM

class OurVMM:
    def __init__(self, args, tsc_khz, workdir):
        self.vmm = args.vmm
        self.guest = args.guest
        # (handover_bench.py shares this class and has no network case)
        self.netecho = getattr(args, "netecho", os.path.join(REPO, "GuestImages/build/netecho.elf"))
        self.tsc_khz = tsc_khz
        self.workdir = workdir
        self.timeout = args.timeout
        self.steady = args.steady
        self.settle = args.settle
        self.channels = args.channels
        # Bytes per second, 0 = unlimited (--max-bandwidth: a capped link for both systems).
        self.max_bandwidth = getattr(args, "max_bandwidth", 0)
        # None: each setting's policy (adaptive; throttle in the auto-converge setting).
        self.convergence = getattr(args, "ours_convergence", None)

    def ctl(self, sub, sock, *extra, timeout=15):
        return run_quiet([self.vmm, "ctl", sub, *extra, "--api-socket", sock], timeout)

    def start_destination(self, tag, tracker, tls, netns=None, host="127.0.0.1", extra=(), wait_s=0):
        """`vmm receive` listening on `host`, inside `netns` when given; `wait_s` more seconds of
        listening for a source that first fills its working set. Returns the process, its serial
        reader, the port, the API socket and the stderr path."""
        sock = os.path.join(self.workdir, tag + "-dst.sock")
        errpath = os.path.join(self.workdir, tag + "-dst.err")
        # `vmm receive` keeps listening after a failed connection until a migration completes or
        # this passes (exit 4); the harness stops it after every run anyway, this is a backstop.
        listen_timeout = int(self.steady + self.timeout + 120 + wait_s)
        prefix = ["ip", "netns", "exec", netns] if netns else []
        for _attempt in range(5):
            port = free_port()
            with open(errpath, "wb") as err:
                p = CHILDREN.spawn(prefix + [self.vmm, "receive", "--listen", "%s:%d" % (host, port),
                                             "--listen-timeout", str(listen_timeout),
                                             "--api-socket", sock, "--dirty-tracker", tracker,
                                             "--report-dir", os.path.join(self.workdir, "reports", tag)]
                                   + list(extra) + ([] if tls else ["--insecure-plaintext"]) + BILLBOARD.args(),
                                   stdout=subprocess.PIPE, stderr=err)
            marks = SerialMarks(p.stdout)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if "listening on" in read_tail(errpath):
                    return p, marks, port, sock, errpath
                if p.poll() is not None:
                    break
                time.sleep(0.02)
            CHILDREN.stop(p)
            reason = unavailable_reason(read_tail(errpath))
            if reason:
                raise Unavailable("vmm receive: " + reason)
        raise RuntimeError("vmm receive did not listen: " + read_tail(errpath))

    def migrate(self, rec, ssock, destination, tls, downtime_ms, auto_converge, postcopy=False):
        """`vmm ctl migrate` to `destination`; records its report in `rec`. Returns the report (or
        None) and when the command started and returned."""
        cmd = [self.vmm, "ctl", "migrate", destination, "--api-socket", ssock]
        cmd += ["--peer", BILLBOARD.host] if tls else ["--insecure-plaintext"]
        cmd += ["--max-downtime-ms", str(downtime_ms), "--max-bandwidth", str(self.max_bandwidth),
                "--timeout", str(self.timeout), "--quiet"]
        # Each system with its own convergence defaults (issue #14): ours `adaptive`, QEMU none;
        # in the auto-converge setting ours throttles (`throttle`) and QEMU auto-converges.
        convergence = self.convergence or ("throttle" if auto_converge else "adaptive")
        cmd += ["--convergence", convergence]
        rec["convergence"] = convergence
        if postcopy:
            cmd += ["--postcopy", "--postcopy-after-rounds", str(POSTCOPY_AFTER_ROUNDS)]
        elif self.channels != 1:
            # Data channels do not combine with post-copy: that case keeps one.
            cmd += ["--channels", str(self.channels)]
        rec["channels"] = 1 if postcopy else self.channels
        rec["command"] = " ".join(cmd)
        t_start = time.monotonic()
        rc, out, err = run_quiet(cmd, self.timeout + 90)
        t_end = time.monotonic()
        report = None
        try:
            report = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
        except (ValueError, IndexError):
            pass
        rec["raw"] = report
        rec["wall_ms"] = 1000 * (t_end - t_start)
        reason = unavailable_reason("%s\n%s\n%s" % ((report or {}).get("error"), out, err))
        if reason:
            raise Unavailable("vmm ctl migrate: " + reason)
        if rc is None:
            rec.update(outcome="error", converged=False, error="vmm ctl migrate did not return in time")
        elif report is None or "outcome" not in report:
            rec.update(outcome="error", converged=False,
                       error="vmm ctl migrate exited %s: %s %s" % (rc, out.strip()[:300], err.strip()[:300]))
        else:
            completed = report["outcome"] == "completed"
            if rc != 0 and completed:
                warn("outcome completed but ctl migrate exited %s" % rc)
            if not completed and not report.get("converged"):
                outcome = "not-converged" if "converge" in (report.get("error") or "") else report["outcome"]
            else:
                outcome = report["outcome"]
            bytes_sent = report.get("bytes_sent")
            total_ms = report.get("total_ms")
            rec.update(
                outcome=outcome, converged=completed,
                total_ms=total_ms, setup_ms=report.get("setup_ms"),
                reported_downtime_ms=report.get("downtime_ms"),
                bytes_sent=bytes_sent, rounds=report.get("rounds"),
                pages_sent=report.get("pages_sent"), zero_pages=report.get("zero_pages"),
                throughput_Bps=(bytes_sent / (total_ms / 1000)) if bytes_sent and total_ms else None,
                reported_throughput_Bps=report.get("throughput_bytes_per_s"),
                pause_to_resume_ms=report.get("downtime_ms"),
                error=report.get("error"))
            rec.update(wire_fields(bytes_sent, report.get("memory_bytes")))
            if postcopy:
                rec.update(our_postcopy_figures(report))
        return report, t_start, t_end

    def shutdown(self, rec, procs):
        """Graceful shutdown through the API where it is up (the guest runs there), then signals:
        a destination still listening, after a failed migration, gets SIGTERM. `procs`:
        (process, API socket), the destination first."""
        for p, sock in procs:
            if p is not None and p.poll() is None and os.path.exists(sock):
                self.ctl("shutdown", sock, timeout=5)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            if p is not None:
                CHILDREN.stop(p)
        dst = procs[0][0]
        if dst is not None:
            rec["destination_exit_status"] = dst.returncode

    def check_ended(self, rec, tag, src, dst, derrpath):
        try:
            src.wait(5)
        except subprocess.TimeoutExpired:
            rec["note"] = "the source VMM was still running 5 s after a completed migration"
            warn("%s: %s" % (tag, rec["note"]))
        if dst.poll() is not None:
            rec["note"] = "the destination exited (status %s): %s" % (dst.returncode, read_tail(derrpath))
            warn("%s: %s" % (tag, rec["note"]))

    def run(self, tag, case, downtime_ms, auto_converge, tracker, tls):
        _, pages, rate, _ = CASES[case]
        rec = {}
        dst = src = None
        ssock = os.path.join(self.workdir, tag + "-src.sock")
        dsock = os.path.join(self.workdir, tag + "-dst.sock")
        serrpath = os.path.join(self.workdir, tag + "-src.err")
        try:
            filled = dirtier_options(case)["fill"] != "zero"
            dst, dmarks, port, dsock, derrpath = self.start_destination(tag, tracker, tls,
                                                                        wait_s=FILL_TIMEOUT_S if filled else 0)
            cmdline = dirtier_cmdline(pages, rate, self.tsc_khz, case)
            with open(serrpath, "wb") as err:
                src = CHILDREN.spawn([self.vmm, "run", self.guest, "--memory", "%dM" % MEMORY_MIB,
                                      "--cmdline", cmdline, "--api-socket", ssock,
                                      "--dirty-tracker", tracker,
                                      "--report-dir", os.path.join(self.workdir, "reports", tag)]
                                     + BILLBOARD.guest(self.guest, "%dM" % MEMORY_MIB, cmdline),
                                     stdout=subprocess.PIPE, stderr=err)
            smarks = SerialMarks(src.stdout)
            problem, ready = wait_ready(smarks, src, case, self.steady, 30)
            rec.update(ready)
            if problem:
                rec.update(outcome="error", converged=False, error=problem + " " + read_tail(serrpath))
                return rec
            # Our destination starts its vCPU thread when the guest resumes there.
            window = cpu_cost.Window({"source": src.pid, "destination": dst.pid}).open(expect={"source": VCPUS})
            _, t_start, t_end = self.migrate(rec, ssock, "127.0.0.1:%d" % port, tls, downtime_ms, auto_converge,
                                             postcopy=case == POSTCOPY_CASE)
            completed = rec.get("converged", False)
            # At once: our source exits about 300 ms after a completed migration.
            rec.update(cpu_fields(window.close(expect={"destination": VCPUS if completed else 0}), MEMORY_MIB))
            if completed:
                time.sleep(self.settle)
            rec.update(mark_gaps(smarks, dmarks, t_start, t_end, self.settle, completed))
            rec.update(write_rates(smarks, dmarks if completed else None, t_start, t_end))
            if completed:
                self.check_ended(rec, tag, src, dst, derrpath)
            return rec
        except Unavailable:
            raise
        except Exception as e:  # a broken run is recorded, not fatal
            rec.update(outcome="error", converged=False, error="%s: %s" % (type(e).__name__, e))
            return rec
        finally:
            self.shutdown(rec, ((dst, dsock), (src, ssock)))

    def run_net(self, tag, tls):
        """The network case: netecho on host A's tap, migrated over the hosts' own link to host
        B's tap while the client pings it (see NetTopology and Probe)."""
        rec = {}
        dst = src = probe = topo = None
        ssock = os.path.join(self.workdir, tag + "-src.sock")
        dsock = os.path.join(self.workdir, tag + "-dst.sock")
        serrpath = os.path.join(self.workdir, tag + "-src.err")
        derrpath = None
        try:
            topo = NetTopology()
            dst, _, port, dsock, derrpath = self.start_destination(
                tag, "bitmap", tls, netns=topo.host_b, host=NET_MIGRATION_IPS[1], extra=["--net", "tap=tap-b"])
            memory, cmdline = "%dM" % NET_MEMORY_MIB, netecho_cmdline()
            with open(serrpath, "wb") as err:
                src = CHILDREN.spawn(["ip", "netns", "exec", topo.host_a, self.vmm, "run", self.netecho,
                                      "--memory", memory, "--cmdline", cmdline, "--net", "tap=tap-a",
                                      "--api-socket", ssock,
                                      "--report-dir", os.path.join(self.workdir, "reports", tag)]
                                     + BILLBOARD.guest(self.netecho, memory, cmdline, network=True),
                                     stdout=subprocess.PIPE, stderr=err)
            serial = SerialMarks(src.stdout)
            problem = wait_netecho(serial, src, serrpath)
            if not problem:
                probe = Probe(topo.lan, os.path.join(self.workdir, tag + "-probe.err"))
                problem = probe.wait_steady(30)
            if problem:
                rec.update(outcome="error", converged=False, error=problem)
                return rec
            window = cpu_cost.Window({"source": src.pid, "destination": dst.pid}).open(expect={"source": 1})
            report, t_start, t_end = self.migrate(rec, ssock, "%s:%d" % (NET_MIGRATION_IPS[1], port), tls,
                                                  NET_DOWNTIME_MS, False)
            completed = rec.get("converged", False)
            rec.update(cpu_fields(window.close(expect={"destination": 1 if completed else 0}), NET_MEMORY_MIB))
            t_resume = None
            if completed:
                t_resume, rec["resume_uncertainty_ms"] = our_resume_time(dsock)
                rec["resume_how"] = "GET /vm on the destination: its monotonic clock minus uptime_s"
            time.sleep(NET_AFTER_S)
            t_stop = probe.stop()
            rec.update(net_figures(probe, t_start, t_stop, t_resume))
            # The announcement's schedule and times, where this build reports them (issue #16's
            # `announce` field): in the migration report, the destination's API or its reports.
            rec["announce"] = (report or {}).get("announce") or (destination_announce(dsock) if completed else None) \
                or destination_report_field(os.path.join(self.workdir, "reports", tag), "announce")
            sent = announced_at(read_tail(derrpath, 4000))
            if sent is None:
                # The announcement is logged when its last round has gone; give it a moment.
                time.sleep(1.5)
                sent = announced_at(read_tail(derrpath, 4000))
            rec["announce_sent_ms"] = sent
            rec["announce_first_ms"] = sent[0] if sent else None
            if completed:
                self.check_ended(rec, tag, src, dst, derrpath)
            return rec
        except Unavailable:
            raise
        except Exception as e:
            rec.update(outcome="error", converged=False, error="%s: %s" % (type(e).__name__, e))
            return rec
        finally:
            if probe is not None:
                probe.stop()
            self.shutdown(rec, ((dst, dsock), (src, ssock)))
            if topo is not None:
                topo.close()


def our_postcopy_figures(report):
    """The report's `postcopy` figures (absent when the guest never switched)."""
    pc = report.get("postcopy")
    if not pc:
        return {"pc_switched": False}
    return {"pc_switched": True, "pc_passes_before_switch": pc.get("switched_after_rounds"),
            "pc_pages_missing": pc.get("pages_missing_at_switch"),
            "pc_pages_pushed": pc.get("pages_pushed"), "pc_pages_requested": pc.get("pages_requested"),
            "pc_faults": pc.get("faults"), "pc_fault_median_ms": pc.get("median_fault_ms"),
            "pc_fault_p99_ms": pc.get("p99_fault_ms"), "pc_blocked_ms": pc.get("vcpu_blocked_ms"),
            "pc_last_page_ms": pc.get("last_page_after_ms")}


def dirtier_options(case):
    """The dirtier's options for `case` besides pages and rate (DIRTIER_OPTIONS over the defaults)."""
    opts = {"pattern": PATTERN, "mark_us": MARK_US, "report_ms": REPORT_MS, "fill": "zero", "store": "word"}
    opts.update(DIRTIER_OPTIONS.get(case, {}))
    return opts


def dirtier_cmdline(pages, rate, tsc_khz, case=None):
    """The dirtier's command line; without a case, the bare one (no reports, no fill)."""
    opts = dirtier_options(case) if case else {"pattern": PATTERN, "mark_us": MARK_US, "report_ms": 0,
                                              "fill": "zero", "store": "word"}
    line = "pages=%d rate=%d tsc_khz=%d pattern=%s mark_us=%d" % (pages, rate, tsc_khz, opts["pattern"], opts["mark_us"])
    if opts["report_ms"]:
        line += " report_ms=%d" % opts["report_ms"]
    if opts["fill"] != "zero":
        line += " fill=%s" % opts["fill"]
    if opts["store"] != "word":
        line += " store=%s" % opts["store"]
    return line


# ---------------------------------------------------------------- QEMU

class QMPError(Exception):
    pass


class QMP:
    def __init__(self, path, timeout=15):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(10)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QMPError("cannot connect to QMP at " + path)
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        self.events = []                 # every event read so far, in order
        self._read()                     # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise QMPError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, **arguments):
        msg = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.file.write((json.dumps(msg) + "\n").encode())
        self.file.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise QMPError("%s: %s" % (name, reply["error"].get("desc", reply["error"])))
            if "event" in reply:
                self.events.append(reply)

    def event(self, name, timeout):
        """The first `name` event, read so far or within `timeout` seconds, or None. Events carry
        QEMU's own timestamp (wall clock), so reading one late loses nothing."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e.get("event") == name:
                    return e
            if time.monotonic() > deadline:
                return None
            # A command reads the events queued before its reply (a read with a timeout would
            # leave the socket's file unusable).
            self.cmd("query-status")
            time.sleep(0.02)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def make_qemu_tls_creds(workdir):
    """A CA, a server certificate (IP SANs 127.0.0.1 and 10.200.255.2, the hosts of the migrate
    URIs, which the client checks) and a client certificate, made with openssl for this run. Returns two
    directories laid out as QEMU's tls-creds-x509 (gnutls) wants them: the server's holds
    ca-cert.pem, server-cert.pem, server-key.pem; the client's ca-cert.pem, client-cert.pem,
    client-key.pem. Keys are ECDSA P-256."""
    base = os.path.join(workdir, "qemu-tls")
    pki = os.path.join(base, "pki")
    server_dir, client_dir = os.path.join(base, "server"), os.path.join(base, "client")
    for d in (pki, server_dir, client_dir):
        os.makedirs(d, mode=0o700)

    def openssl(*argv):
        rc, out, err = run_quiet(["openssl", *argv], 60)
        if rc != 0:
            raise RuntimeError("openssl %s failed: %s" % (argv[0], (err or out).strip()[-300:]))

    def key(path):
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)

    def leaf(name, subject, extensions):
        key(os.path.join(pki, name + "-key.pem"))
        ext = os.path.join(pki, name + ".ext")
        with open(ext, "w") as f:
            f.write(extensions)
        openssl("req", "-new", "-key", os.path.join(pki, name + "-key.pem"), "-subj", subject,
                "-out", os.path.join(pki, name + ".csr"))
        openssl("x509", "-req", "-in", os.path.join(pki, name + ".csr"), "-days", "2",
                "-CA", os.path.join(pki, "ca-cert.pem"), "-CAkey", os.path.join(pki, "ca-key.pem"),
                "-CAcreateserial", "-extfile", ext, "-out", os.path.join(pki, name + "-cert.pem"))

    key(os.path.join(pki, "ca-key.pem"))
    openssl("req", "-x509", "-new", "-key", os.path.join(pki, "ca-key.pem"), "-days", "2",
            "-subj", "/CN=migration-bench CA", "-out", os.path.join(pki, "ca-cert.pem"),
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    # 10.200.255.2: the destination host's end of the hosts' link in the network case.
    leaf("server", "/CN=127.0.0.1",
         "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
         "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:%s,DNS:localhost\n" % NET_MIGRATION_IPS[1])
    leaf("client", "/CN=migration-bench client",
         "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
         "extendedKeyUsage=clientAuth\n")
    for d, name in ((server_dir, "server"), (client_dir, "client")):
        shutil.copy(os.path.join(pki, "ca-cert.pem"), os.path.join(d, "ca-cert.pem"))
        shutil.copy(os.path.join(pki, name + "-cert.pem"), os.path.join(d, name + "-cert.pem"))
        shutil.copy(os.path.join(pki, name + "-key.pem"), os.path.join(d, name + "-key.pem"))
    return server_dir, client_dir


class QEMU:
    def __init__(self, args, tsc_khz, workdir, cpu, tls_dirs=None):
        self.qemu = args.qemu
        self.guest = args.guest
        self.netecho = args.netecho
        self.tsc_khz = tsc_khz
        self.workdir = workdir
        self.timeout = args.timeout
        self.steady = args.steady
        self.settle = args.settle
        self.cpu = cpu
        self.postcopy_sync = args.qemu_postcopy_sync
        self.max_bandwidth = getattr(args, "max_bandwidth", 0)
        # (server directory, client directory) from make_qemu_tls_creds, for the TLS runs.
        self.tls_dirs = tls_dirs

    def tls_object(self, endpoint):
        """Mutual TLS: each side verifies the other's certificate against the run's CA."""
        d = self.tls_dirs[0] if endpoint == "server" else self.tls_dirs[1]
        return ["-object", "tls-creds-x509,id=tls0,dir=%s,endpoint=%s,verify-peer=on" % (d, endpoint)]

    def base(self, cmdline, qmp_path, name):
        # debug-threads=on names the threads (vCPUs `CPU n/KVM`), which the CPU measure needs.
        return [self.qemu, "-name", "%s,debug-threads=on" % name,
                "-enable-kvm", "-cpu", self.cpu, "-m", str(MEMORY_MIB), "-smp", str(VCPUS),
                "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
                "-kernel", self.guest, "-append", cmdline,
                "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
                "-qmp", "unix:%s,server=on,wait=off" % qmp_path]

    def net_base(self, netns, qmp_path, tap, name):
        """netecho on a legacy virtio-net card on `tap`, inside `netns`; the MAC is the one our
        VMM gets from the registration."""
        return ["ip", "netns", "exec", netns,
                self.qemu, "-name", "%s,debug-threads=on" % name, "-enable-kvm", "-cpu", self.cpu, "-m", str(NET_MEMORY_MIB), "-smp", "1",
                "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
                "-kernel", self.netecho, "-append", netecho_cmdline(),
                "-netdev", "tap,id=n0,ifname=%s,script=no,downscript=no" % tap,
                "-device", "virtio-net-pci,disable-modern=on,netdev=n0,mac=%s" % NET_GUEST_MAC,
                "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
                "-qmp", "unix:%s,server=on,wait=off" % qmp_path]

    def run_net(self, tag, tls):
        """The network case under QEMU: as OurVMM.run_net, with QEMU's own self-announce."""
        rec = {}
        src = dst = qs = qd = probe = topo = None
        try:
            topo = NetTopology()
            dsockp = os.path.join(self.workdir, tag + "-qdst.qmp")
            derr = os.path.join(self.workdir, tag + "-qdst.err")
            with open(derr, "wb") as err:
                dst = CHILDREN.spawn(self.net_base(topo.host_b, dsockp, "tap-b", "bench-dst") + ["-incoming", "defer"]
                                     + (self.tls_object("server") if tls else []),
                                     stdout=subprocess.PIPE, stderr=err)
            SerialMarks(dst.stdout)
            qd = QMP(dsockp)
            if tls:
                qd.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
                rec["destination_tls_creds"] = qd.cmd("query-migrate-parameters").get("tls-creds")
            uri = None
            for _attempt in range(5):
                try:
                    candidate = "tcp:%s:%d" % (NET_MIGRATION_IPS[1], free_port())
                    qd.cmd("migrate-incoming", uri=candidate)
                    uri = candidate
                    break
                except QMPError as e:
                    last = str(e)
            if uri is None:
                raise RuntimeError("migrate-incoming failed: " + last)

            ssockp = os.path.join(self.workdir, tag + "-qsrc.qmp")
            serr = os.path.join(self.workdir, tag + "-qsrc.err")
            with open(serr, "wb") as err:
                src = CHILDREN.spawn(self.net_base(topo.host_a, ssockp, "tap-a", "bench-src")
                                     + (self.tls_object("client") if tls else []),
                                     stdout=subprocess.PIPE, stderr=err)
            serial = SerialMarks(src.stdout)
            qs = QMP(ssockp)
            problem = wait_netecho(serial, src, serr)
            if not problem:
                probe = Probe(topo.lan, os.path.join(self.workdir, tag + "-probe.err"))
                problem = probe.wait_steady(30)
            if problem:
                rec.update(outcome="error", converged=False, error=problem)
                return rec
            caps = {"auto-converge": False, "xbzrle": False, "compress": False,
                    "multifd": False, "postcopy-ram": False, "release-ram": False}
            qs.cmd("migrate-set-capabilities",
                   capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
            params = {"downtime-limit": NET_DOWNTIME_MS, "max-bandwidth": QEMU_UNLIMITED_BANDWIDTH}
            if tls:
                params["tls-creds"] = "tls0"
            qs.cmd("migrate-set-parameters", **params)
            rec["qemu_capabilities"] = caps
            # Includes announce-initial/-max/-rounds/-step: the self-announce schedule.
            rec["qemu_parameters"] = qs.cmd("query-migrate-parameters")
            window = cpu_cost.Window({"source": src.pid, "destination": dst.pid}).open(
                expect={"source": 1, "destination": 1})
            t_start = time.monotonic()
            qs.cmd("migrate", uri=uri)
            info, status, cancelled, t_end, watched = watch_qemu_migration(qs, src, t_start, self.timeout)
            rec.update(cpu_fields(window.close(), NET_MEMORY_MIB))
            rec.update(watched)
            rec.update(qemu_fields(info, status, cancelled, t_start, t_end))
            t_resume = None
            if rec["converged"]:
                rec.update(qemu_pause_to_resume(qs, qd))
                t_resume = rec.pop("t_resume", None)
                rec["resume_how"] = "the destination's RESUME event (QEMU's wall clock, converted)"
            else:
                rec["destination_stderr"] = read_tail(derr, 500)
            time.sleep(NET_AFTER_S)
            t_stop = probe.stop()
            rec.update(net_figures(probe, t_start, t_stop, t_resume))
            return rec
        except Exception as e:
            rec.update(outcome="error", converged=False, error="%s: %s" % (type(e).__name__, e))
            return rec
        finally:
            if probe is not None:
                probe.stop()
            self.quit(src, qs)
            self.quit(dst, qd)
            if topo is not None:
                topo.close()

    @staticmethod
    def quit(proc, qmp):
        if proc is None:
            return
        if qmp is not None and proc.poll() is None:
            try:
                qmp.cmd("quit")
            except (QMPError, OSError, ValueError):
                pass
            qmp.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        CHILDREN.stop(proc)

    def run(self, tag, case, downtime_ms, auto_converge, tls):
        _, pages, rate, _ = CASES[case]
        cmdline = dirtier_cmdline(pages, rate, self.tsc_khz, case)
        postcopy = case == POSTCOPY_CASE
        rec = {}
        src = dst = qs = qd = None
        try:
            dsockp = os.path.join(self.workdir, tag + "-qdst.qmp")
            derr = os.path.join(self.workdir, tag + "-qdst.err")
            with open(derr, "wb") as err:
                dst = CHILDREN.spawn(self.base(cmdline, dsockp, "bench-dst") + ["-incoming", "defer"]
                                     + (self.tls_object("server") if tls else []),
                                     stdout=subprocess.PIPE, stderr=err)
            dmarks = SerialMarks(dst.stdout)
            qd = QMP(dsockp)
            if tls:
                qd.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
                rec["destination_tls_creds"] = qd.cmd("query-migrate-parameters").get("tls-creds")
            if postcopy:
                # Both sides need postcopy-ram; postcopy-blocktime makes the destination measure
                # how long its vCPUs waited for pages.
                qd.cmd("migrate-set-capabilities",
                       capabilities=[{"capability": "postcopy-ram", "state": True},
                                     {"capability": "postcopy-blocktime", "state": True}])
            port = None
            for _attempt in range(5):
                port = free_port()
                try:
                    qd.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
                    break
                except QMPError as e:
                    port = None
                    last = str(e)
            if port is None:
                raise RuntimeError("migrate-incoming failed: " + last)

            ssockp = os.path.join(self.workdir, tag + "-qsrc.qmp")
            serr = os.path.join(self.workdir, tag + "-qsrc.err")
            with open(serr, "wb") as err:
                src = CHILDREN.spawn(self.base(cmdline, ssockp, "bench-src") + (self.tls_object("client") if tls else []),
                                     stdout=subprocess.PIPE, stderr=err)
            smarks = SerialMarks(src.stdout)
            qs = QMP(ssockp)
            problem, ready = wait_ready(smarks, src, case, self.steady, 60)
            rec.update(ready)
            if problem:
                rec.update(outcome="error", converged=False, error=problem + " " + read_tail(serr))
                return rec

            caps = {"auto-converge": auto_converge, "xbzrle": False, "compress": False,
                    "multifd": False, "postcopy-ram": postcopy, "release-ram": False}
            qs.cmd("migrate-set-capabilities",
                   capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
            params = {"downtime-limit": QEMU_POSTCOPY_DOWNTIME_MS if postcopy else int(downtime_ms),
                      "max-bandwidth": self.max_bandwidth or QEMU_UNLIMITED_BANDWIDTH,
                      "cpu-throttle-initial": THROTTLE_INITIAL,
                      "cpu-throttle-increment": THROTTLE_INCREMENT,
                      "max-cpu-throttle": THROTTLE_MAX}
            if tls:
                # The client checks the server's certificate against the URI's host, 127.0.0.1.
                params["tls-creds"] = "tls0"
            qs.cmd("migrate-set-parameters", **params)
            rec["qemu_capabilities"] = caps
            rec["qemu_parameters"] = qs.cmd("query-migrate-parameters")

            # QEMU's destination has its (paused) vCPU threads from the start.
            window = cpu_cost.Window({"source": src.pid, "destination": dst.pid}).open(
                expect={"source": VCPUS, "destination": VCPUS})
            t_start = time.monotonic()
            qs.cmd("migrate", uri="tcp:127.0.0.1:%d" % port)
            info, status, cancelled, t_end, watched = watch_qemu_migration(
                qs, src, t_start, self.timeout, self.postcopy_sync if postcopy else None)
            rec.update(cpu_fields(window.close(), MEMORY_MIB))
            rec.update(watched)
            rec.update(qemu_fields(info, status, cancelled, t_start, t_end))
            completed = rec["converged"]
            if completed:
                rec.update(qemu_pause_to_resume(qs, qd))
                rec.pop("t_resume", None)
            if not completed:
                # Where a TLS handshake fails, the destination says why on stderr.
                rec["destination_stderr"] = read_tail(derr, 500)
            if postcopy:
                rec.update(qemu_postcopy_figures(qd, rec, completed, t_end))
            if completed:
                time.sleep(self.settle)
            rec.update(mark_gaps(smarks, dmarks, t_start, t_end, self.settle, completed))
            rec.update(write_rates(smarks, dmarks if completed else None, t_start, t_end))
            if completed:
                try:
                    st = qd.cmd("query-status")
                    rec["destination_status"] = st.get("status")
                except (QMPError, OSError) as e:
                    rec["destination_status"] = "unreachable: %s" % e
            return rec
        except Exception as e:
            rec.update(outcome="error", converged=False, error="%s: %s" % (type(e).__name__, e))
            return rec
        finally:
            self.quit(src, qs)
            self.quit(dst, qd)


def qemu_fields(info, status, cancelled, t_start, t_end):
    """The record's fields from the source's last query-migrate."""
    ram = info.get("ram", {})
    completed = status == "completed"
    total_ms = info.get("total-time")
    if total_ms is None:
        total_ms = 1000 * (t_end - t_start)
    bytes_sent = ram.get("transferred")
    mbps = ram.get("mbps")
    downtime = info.get("downtime")
    odd = {}
    if downtime is not None and total_ms and downtime > total_ms:
        # Seen after a post-copy run (23,040,893 ms here, about the host's uptime): not the length
        # of anything in this migration, so no figure; the value stays in the JSON.
        odd["qemu_downtime_not_a_duration"] = downtime
        downtime = None
    return dict(odd,
        raw=info, wall_ms=1000 * (t_end - t_start),
        outcome="completed" if completed else ("not-converged" if cancelled else status),
        converged=completed,
        total_ms=total_ms, setup_ms=info.get("setup-time"),
        reported_downtime_ms=downtime,
        bytes_sent=bytes_sent, rounds=ram.get("dirty-sync-count"),
        pages_sent=ram.get("normal"), zero_pages=ram.get("duplicate"),
        throughput_Bps=(bytes_sent / (total_ms / 1000)) if bytes_sent and total_ms else None,
        reported_throughput_Bps=(mbps * 1e6 / 8) if mbps is not None else None,
        error=info.get("error-desc"),
        # ram.total: the guest RAM QEMU migrates (its RAM blocks, ROMs included).
        **wire_fields(bytes_sent, ram.get("total")))


def qemu_pause_to_resume(qs, qd):
    """The source's STOP event to the destination's RESUME event (both QEMU's wall clock): what
    our downtime_ms measures, unlike QEMU's `downtime`, which ends when the source has sent."""
    out = {}
    try:
        resumed = qd.event("RESUME", 5)
        stopped = qs.event("STOP", 0)
    except (QMPError, OSError, ValueError) as e:
        return {"pause_to_resume_error": str(e)}
    if resumed is not None:
        out["t_resume"] = qemu_event_monotonic(resumed)
    if resumed is not None and stopped is not None:
        a, b = stopped["timestamp"], resumed["timestamp"]
        out["pause_to_resume_ms"] = 1000 * (b["seconds"] - a["seconds"]) + (b["microseconds"] - a["microseconds"]) / 1000
    return out


def watch_qemu_migration(qs, src, t_start, timeout, postcopy_sync=None):
    """Polls the source's query-migrate until the migration ends; cancels it after `timeout`
    seconds (not once in post-copy: that would lose the guest). With `postcopy_sync`, issues
    migrate-start-postcopy once dirty-sync-count reaches it. Returns the last query-migrate,
    its status, whether it was cancelled, when it ended, and what to record."""
    postcopy = postcopy_sync is not None
    info, status, cancelled, last_active = {}, "setup", False, {}
    syncs, seen, extra = [], None, {}
    t_end = None
    while True:
        info = qs.cmd("query-migrate")
        now = time.monotonic()
        status = info.get("status", "?")
        ram = info.get("ram", {})
        count = ram.get("dirty-sync-count")
        if count is not None and count != seen:
            seen = count
            syncs.append([round(1000 * (now - t_start), 1), count, ram.get("transferred")])
        if status in ("completed", "failed", "cancelled"):
            t_end = time.monotonic()
            if status == "completed" and not info.get("total-time"):
                # QEMU shows `completed` a moment before its migration thread fills in total-time
                # and downtime (0 until then; seen in 2 of 4 TLS runs on a loaded host).
                deadline = time.monotonic() + 5
                while not info.get("total-time") and time.monotonic() < deadline:
                    time.sleep(0.01)
                    info = qs.cmd("query-migrate")
            break
        if postcopy and "pc_switch_at_ms" not in extra and status == "active" \
                and (count or 0) >= postcopy_sync:
            qs.cmd("migrate-start-postcopy")
            extra.update(pc_switch_at_ms=round(1000 * (time.monotonic() - t_start), 1), pc_switch_sync_count=count,
                         pc_remaining_bytes_at_switch=ram.get("remaining"))
        in_postcopy = status.startswith("postcopy")
        if in_postcopy and not extra.get("pc_switched"):
            # The first poll in post-copy: how far it had got (the switch came before this).
            extra.update(pc_switched=True, pc_seen_in_postcopy_at_ms=round(1000 * (now - t_start), 1),
                         pc_transferred_when_seen=ram.get("transferred"), pc_remaining_when_seen=ram.get("remaining"))
        if not cancelled and not in_postcopy and now - t_start > timeout:
            qs.cmd("migrate_cancel")
            cancelled = True
            last_active = info
        if now - t_start > timeout + (120 if in_postcopy else 15):
            break
        if src.poll() is not None:
            status = "source-died"
            break
        # Finer polling before the switch, so that it follows the sync closely.
        time.sleep(0.005 if postcopy and "pc_switch_at_ms" not in extra else 0.02)
    if t_end is None:
        t_end = time.monotonic()
    if cancelled and status != "completed":
        info = dict(last_active, final_status=status)
    extra["qemu_dirty_syncs"] = syncs          # [ms since start, dirty-sync-count, bytes transferred]
    return info, status, cancelled, t_end, extra


def qemu_postcopy_figures(qd, rec, completed, t_end):
    """What QEMU 7.2 tells about its post-copy phase: the destination's postcopy-blocktime (the
    time all its vCPUs were blocked on missing pages; with one vCPU, that vCPU's) and the
    source's count of page requests. It keeps no per-fault latency, so median and p99 are n/a."""
    ram = (rec.get("raw") or {}).get("ram", {})
    switched = bool(rec.get("pc_switched")) or (ram.get("postcopy-bytes") or 0) > 0 \
        or (ram.get("postcopy-requests") or 0) > 0
    out = {"pc_switched": switched,
           "pc_fault_latency": "n/a: QEMU 7.2 exposes no per-fault latency (only postcopy-blocktime)"}
    if not switched:
        # Finished in pre-copy: no post-copy figures (zeros would read as a fast post-copy).
        return out
    out["pc_faults"] = ram.get("postcopy-requests")
    out["pc_postcopy_bytes"] = ram.get("postcopy-bytes")
    if rec.get("pc_switch_sync_count") is not None:
        out["pc_passes_before_switch"] = rec["pc_switch_sync_count"] - 1
    if not completed:
        return out
    # The destination finishes loading after the source has sent its last page.
    deadline = time.monotonic() + 30
    dinfo = {}
    while time.monotonic() < deadline:
        try:
            dinfo = qd.cmd("query-migrate")
        except (QMPError, OSError) as e:
            out["pc_destination_error"] = str(e)
            break
        if dinfo.get("status") in ("completed", "failed"):
            break
        time.sleep(0.05)
    out["pc_destination_query_migrate"] = dinfo
    out["pc_blocked_ms"] = dinfo.get("postcopy-blocktime")
    out["pc_vcpu_blocked_ms"] = dinfo.get("postcopy-vcpu-blocktime")
    resumed = qd.event("RESUME", 2)
    if resumed is not None:
        # From the destination's resume to the source seeing the migration completed (polled
        # every 20 ms): QEMU's counterpart of our last_page_after_ms.
        out["pc_last_page_ms"] = 1000 * (t_end - qemu_event_monotonic(resumed))
    return out


def wall_minus_monotonic():
    """time.time() - time.monotonic(), from the closest of a few paired readings."""
    best = None
    for _ in range(5):
        a = time.monotonic()
        w = time.time()
        b = time.monotonic()
        if best is None or b - a < best[0]:
            best = (b - a, w - (a + b) / 2)
    return best[1]


def qemu_event_monotonic(event):
    """A QMP event's timestamp (QEMU's wall clock) on this process's monotonic clock."""
    ts = event.get("timestamp") or {}
    return ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6 - wall_minus_monotonic()


def choose_qemu_cpu(args, tsc_khz, workdir):
    """-cpu host, unless this KVM refuses it (seen on nested kvm_pvm: QEMU aborts
    setting MSR 0x10a, IA32_ARCH_CAPABILITIES); then host without that MSR."""
    if args.qemu_cpu != "auto":
        return args.qemu_cpu, None
    failure = None
    for n, cpu in enumerate(("host", "host,-arch-capabilities")):
        errpath = os.path.join(workdir, "cpu-probe-%d.err" % n)
        with open(errpath, "wb") as err:
            p = CHILDREN.spawn([args.qemu, "-name", "bench-probe,debug-threads=on",
                                "-enable-kvm", "-cpu", cpu, "-m", str(MEMORY_MIB),
                                "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
                                "-kernel", args.guest, "-append", dirtier_cmdline(1, 1, tsc_khz),
                                "-device", "isa-debug-exit,iobase=0xf4,iosize=1"],
                               stdout=subprocess.PIPE, stderr=err)
        marks = SerialMarks(p.stdout)
        ok = marks.first.wait(60) and bool(marks.marks)
        CHILDREN.stop(p)
        if ok:
            note = None if failure is None else "-cpu host failed here (%s); using -cpu %s" % (failure, cpu)
            return cpu, note
        if failure is None:
            lines = [l for l in read_tail(errpath, 600).splitlines() if l.strip()]
            failure = " / ".join(lines[:2]) if lines else "no output, status %s" % p.returncode
    raise RuntimeError("QEMU cannot boot the dirtier: " + failure)


# ---------------------------------------------------------------- the network case

# The layout of the migration tests and the demo, with their test-only addresses.
NET_PREFIX = "vmmbench"
NET_GUEST_MAC, NET_GUEST_IP = "52:54:00:c8:00:20", "10.200.0.20"
NET_CLIENT_IP = "10.200.0.1"
NET_MIGRATION_IPS = ("10.200.255.1", "10.200.255.2")
NET_MEMORY_MIB = 128
NET_UDP_PORT = 7
NET_INTERVAL_S = 0.01         # each probe (ICMP echo, UDP echo) every 10 ms, the UDP one 5 ms after
NET_DOWNTIME_MS = 300
NET_AFTER_S = 2.0             # probing goes on this long after the migration ended


def network_unavailable():
    """Why the network case cannot run here, or None. Tries a namespace to be sure."""
    if os.geteuid() != 0:
        return "it needs root (network namespaces and taps)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    if not shutil.which("ip"):
        return "iproute2's `ip` is missing"
    probe = "%s-%d-probe" % (NET_PREFIX, os.getpid())
    rc, out, err = run_quiet(["ip", "netns", "add", probe], 15)
    if rc != 0:
        return "network namespaces are not available here (ip netns add: %s)" % (err or out).strip()[-200:]
    run_quiet(["ip", "netns", "delete", probe], 15)
    return None


class NetTopology:
    """The network of the migration tests (Tests/TestSupport/NetworkLab.swift) and the demo
    (scripts/demo-network.sh), made afresh for each run, in namespaces only (nothing is added
    to the host's own), addresses 10.200.x.y, bridges with STP off:

      LAN    bridge brLAN; the client 10.200.0.1/24 (veth client/clientPort); ports to-hosta, to-hostb
      host A bridge brHOST: tap-a and `uplink` (the other end of to-hosta); mig 10.200.255.1/30
      host B bridge brHOST: tap-b and `uplink` (the other end of to-hostb); mig 10.200.255.2/30

    `mig` is the hosts' own link for the migration stream, not bridged to the LAN. The
    namespaces are named vmmbench-PID-N-ROLE; they go when the run ends, at exit (Ctrl-C and
    SIGTERM included), and the next run removes those of a harness that was killed outright."""

    live = []
    serial = 0

    def __init__(self):
        NetTopology.serial += 1
        stem = "%s-%d-%d" % (NET_PREFIX, os.getpid(), NetTopology.serial)
        self.lan, self.host_a, self.host_b = stem + "-lan", stem + "-hosta", stem + "-hostb"
        self.made = []
        NetTopology.live.append(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def ip(*argv):
        rc, out, err = run_quiet(["ip", *argv], 15)
        if rc != 0:
            raise RuntimeError("network setup failed: ip %s: %s" % (" ".join(argv), (err or out).strip()[-300:]))

    def _build(self):
        ip, lan = self.ip, self.lan
        for ns in (self.lan, self.host_a, self.host_b):
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", lan, "link", "add", "brLAN", "type", "bridge", "stp_state", "0")
        ip("-n", lan, "link", "set", "brLAN", "up")
        ip("-n", lan, "link", "add", "client", "type", "veth", "peer", "name", "clientPort")
        ip("-n", lan, "link", "set", "clientPort", "master", "brLAN", "up")
        ip("-n", lan, "addr", "add", NET_CLIENT_IP + "/24", "dev", "client")
        ip("-n", lan, "link", "set", "client", "up")
        for letter, ns in (("a", self.host_a), ("b", self.host_b)):
            ip("-n", ns, "link", "add", "brHOST", "type", "bridge", "stp_state", "0")
            ip("-n", ns, "link", "set", "brHOST", "up")
            ip("-n", ns, "tuntap", "add", "dev", "tap-" + letter, "mode", "tap")
            ip("-n", ns, "link", "set", "tap-" + letter, "master", "brHOST", "up")
            ip("-n", ns, "link", "add", "uplink", "type", "veth", "peer", "name", "to-host" + letter, "netns", lan)
            ip("-n", ns, "link", "set", "uplink", "master", "brHOST", "up")
            ip("-n", lan, "link", "set", "to-host" + letter, "master", "brLAN", "up")
        ip("-n", self.host_a, "link", "add", "mig", "type", "veth", "peer", "name", "mig", "netns", self.host_b)
        for ns, address in zip((self.host_a, self.host_b), NET_MIGRATION_IPS):
            ip("-n", ns, "addr", "add", address + "/30", "dev", "mig")
            ip("-n", ns, "link", "set", "mig", "up")

    def close(self):
        """Removes the namespaces (their taps, veths and bridges go with them). Idempotent."""
        for ns in reversed(self.made):
            try:
                subprocess.run(["ip", "netns", "delete", ns], timeout=15,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except (OSError, subprocess.SubprocessError):
                pass
        self.made = []
        if self in NetTopology.live:
            NetTopology.live.remove(self)

    @classmethod
    def close_all(cls):
        for topo in list(cls.live):
            topo.close()

    @staticmethod
    def remove_leftovers():
        """Namespaces of a harness that no longer runs (its PID is in their names)."""
        rc, out, _ = run_quiet(["ip", "netns", "list"], 15)
        if rc != 0:
            return
        for line in out.splitlines():
            name = line.split(" ")[0]
            m = re.match(r"^%s-(\d+)-" % NET_PREFIX, name)
            if not m or int(m.group(1)) == os.getpid():
                continue
            try:
                os.kill(int(m.group(1)), 0)
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            run_quiet(["ip", "netns", "delete", name], 15)


def netecho_cmdline():
    return "ip=%s/24" % NET_GUEST_IP


def wait_netecho(serial, proc, errpath, timeout=30):
    """Waits for netecho's `netecho mac=...` line. Returns an error or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "netecho mac=" in serial.header():
            return None
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    return "netecho did not come up (status %s); serial: %r; stderr: %s" % (
        proc.poll(), serial.header()[:200], read_tail(errpath, 400))


# The client's probe, run inside the LAN namespace: an ICMP echo request (raw socket) and a UDP
# datagram to netecho's echo port, each every `interval` s, the UDP one half an interval later.
# Each request carries its own number, so replies are matched exactly. One line per event on
# stdout, times on CLOCK_MONOTONIC (the harness's clock too): "I n t" / "U n t" sent,
# "i n t" / "u n t" answered. SIGTERM stops sending; replies are read 0.3 s more.
PINGER = r'''
import os, select, signal, socket, struct, sys, time
ip, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ident, magic = os.getpid() & 0xffff, b"vmmbench"

def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff

icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(time.monotonic() + 0.3) if not stop else None)
out = sys.stdout
count = {"I": 0, "U": 0}
now = time.monotonic()
due = {"I": now, "U": now + interval / 2}
out.write("ready\n")
out.flush()
while not stop or time.monotonic() < stop[0]:
    now = time.monotonic()
    if not stop:
        for kind in ("I", "U"):
            if now < due[kind]:
                continue
            n = count[kind]
            count[kind] += 1
            body = magic + struct.pack("!Q", n)
            t = time.monotonic()
            try:
                if kind == "I":
                    head = struct.pack("!BBHHH", 8, 0, 0, ident, n & 0xffff)
                    icmp.sendto(struct.pack("!BBHHH", 8, 0, csum(head + body), ident, n & 0xffff) + body, (ip, 0))
                else:
                    udp.sendto(body, (ip, port))
                out.write("%s %d %.6f\n" % (kind, n, t))
            except OSError as e:
                out.write("%s %d %.6f error %s\n" % (kind, n, t, e.errno))
            # Late on a busy machine: the next one an interval from now, never a burst.
            due[kind] = max(due[kind] + interval, now + interval / 2)
    wait = max(0.0, stop[0] - time.monotonic()) if stop else max(0.0, min(due.values()) - time.monotonic())
    try:
        ready, _, _ = select.select([icmp, udp], [], [], min(wait, 0.05))
    except InterruptedError:
        continue
    for s in ready:
        try:
            d, a = s.recvfrom(4096)
        except OSError:
            continue
        t = time.monotonic()
        if a[0] != ip:
            continue
        if s is icmp:
            off = (d[0] & 15) * 4
            if len(d) >= off + 24 and d[off] == 0 and struct.unpack("!H", d[off + 4:off + 6])[0] == ident \
                    and d[off + 8:off + 16] == magic:
                out.write("i %d %.6f\n" % (struct.unpack("!Q", d[off + 16:off + 24])[0], t))
        elif len(d) >= 16 and d[:8] == magic:
            out.write("u %d %.6f\n" % (struct.unpack("!Q", d[8:16])[0], t))
    out.flush()
'''


class Probe:
    """The client's ICMP and UDP echo probe (PINGER) in the LAN namespace, read on a thread."""

    KINDS = {"I": ("icmp", "sent"), "U": ("udp", "sent"), "i": ("icmp", "got"), "u": ("udp", "got")}

    def __init__(self, namespace, errpath):
        self.errpath = errpath
        self.sent = {"icmp": {}, "udp": {}}
        self.got = {"icmp": {}, "udp": {}}
        self.stopped_at = None
        with open(errpath, "wb") as err:
            self.proc = CHILDREN.spawn(["ip", "netns", "exec", namespace, sys.executable, "-u", "-c", PINGER,
                                        NET_GUEST_IP, str(NET_UDP_PORT), str(NET_INTERVAL_S)],
                                       stdout=subprocess.PIPE, stderr=err)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) < 3 or parts[0].decode() not in self.KINDS:
                continue
            kind, which = self.KINDS[parts[0].decode()]
            table = self.sent[kind] if which == "sent" else self.got[kind]
            n, t = int(parts[1]), float(parts[2])
            if which == "sent" or n not in table:
                table[n] = t

    def wait_steady(self, timeout):
        """Waits until the last 50 requests of each kind (older than 100 ms) were all answered.
        Returns an error or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return "the probe ended (status %s): %s" % (self.proc.returncode, read_tail(self.errpath, 400))
            now = time.monotonic()
            ok = True
            for kind in ("icmp", "udp"):
                sent = dict(self.sent[kind])
                recent = sorted(n for n, t in sent.items() if t < now - 0.1)[-50:]
                if len(recent) < 50 or any(n not in self.got[kind] for n in recent):
                    ok = False
            if ok:
                return None
            time.sleep(0.1)
        return "netecho did not answer the client steadily within %.0f s (replies: %d of %d pings, %d of %d UDP)" % (
            timeout, len(self.got["icmp"]), len(self.sent["icmp"]), len(self.got["udp"]), len(self.sent["udp"]))

    def stop(self):
        """Stops sending; returns when that was (monotonic). Idempotent."""
        if self.stopped_at is None:
            self.stopped_at = time.monotonic()
            CHILDREN.kill(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            CHILDREN.stop(self.proc)
            self.thread.join(5)
        return self.stopped_at


def longest_gap_ms(times, t0, t1):
    """The longest time without a reply between t0 and t1: from the last reply before t0 (or t0)
    through every reply up to t1, to t1."""
    before = [t for t in times if t < t0]
    points = [before[-1] if before else t0] + [t for t in times if t0 <= t <= t1] + [t1]
    return 1000 * max(b - a for a, b in zip(points, points[1:]))


def net_figures(probe, t_start, t_stop, t_resume):
    """Replies lost, the longest gap without a reply and the destination's resume to the first
    reply, for the ping and the UDP echo, and for either."""
    out = {}
    all_replies = []
    firsts = []
    for kind in ("icmp", "udp"):
        sent, got = probe.sent[kind], probe.got[kind]
        during = [n for n, t in sent.items() if t >= t_start]
        out["net_%s_sent" % kind] = len(during)
        out["net_%s_lost" % kind] = sum(1 for n in during if n not in got)
        # The noise floor: requests lost in the 2 s before the migration started.
        out["net_%s_lost_before" % kind] = sum(1 for n, t in sent.items() if t_start - 2 <= t < t_start and n not in got)
        times = sorted(got.values())
        all_replies += times
        out["net_%s_max_gap_ms" % kind] = longest_gap_ms(times, t_start, t_stop)
        after = [t for t in times if t_resume is not None and t >= t_resume]
        out["net_%s_first_reply_ms" % kind] = 1000 * (after[0] - t_resume) if after else None
        if after:
            firsts.append(out["net_%s_first_reply_ms" % kind])
    out["net_max_gap_ms"] = longest_gap_ms(sorted(all_replies), t_start, t_stop)
    out["net_first_reply_ms"] = min(firsts) if firsts else None
    out["net_probe_s_after_migration"] = NET_AFTER_S
    return out


def api_get(sock_path, path):
    """GET `path` on a VMM's control socket. Returns (JSON body, when the request was sent, when
    the answer began to arrive), both on CLOCK_MONOTONIC."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(sock_path)
        t0 = time.monotonic()
        s.sendall(b"GET %s HTTP/1.1\r\nHost: vmm\r\nConnection: close\r\n\r\n" % path.encode())
        data = s.recv(65536)
        t1 = time.monotonic()
        while b"\r\n\r\n" not in data or not complete_http(data):
            more = s.recv(65536)
            if not more:
                break
            data += more
    body = data.split(b"\r\n\r\n", 1)[1]
    return json.loads(body[body.find(b"{"):body.rfind(b"}") + 1]), t0, t1


def complete_http(data):
    """Whether `data` holds a whole HTTP response (Content-Length or chunked), whether or not the
    server closes the connection after it."""
    head, body = data.split(b"\r\n\r\n", 1)
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if m:
        return len(body) >= int(m.group(1))
    if re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
        return body.endswith(b"0\r\n\r\n")
    return False


def our_resume_time(sock_path, timeout=10, requests=8):
    """When the destination's guest resumed, on this process's monotonic clock (the VMM's
    clock too, CLOCK_MONOTONIC). Each GET /vm answer says uptime_s (the VMM takes the start time
    as it resumes the guest), so the resume lies between the request's send minus uptime and
    its answer minus uptime; a few requests narrow that to where their intervals overlap.
    Returns (time, uncertainty in ms: half the overlap), or (None, None)."""
    deadline = time.monotonic() + timeout
    low, high = None, None
    done = 0
    while done < requests and time.monotonic() < deadline:
        try:
            info, t0, t1 = api_get(sock_path, "/vm")
            uptime = info.get("uptime_s")
        except (OSError, ValueError, IndexError, AttributeError):
            uptime = None
        if uptime is None:
            time.sleep(0.05)
            continue
        done += 1
        a, b = t0 - uptime, t1 - uptime
        low, high = (a, b) if low is None else (max(low, a), min(high, b))
        time.sleep(0.01)
    if low is None or high < low:
        return None, None
    return (low + high) / 2, 1000 * (high - low) / 2


def destination_announce(sock_path):
    """The `announce` field (schedule and times sent) of the destination's GET /vm or
    GET /vm/migration, where this build has one."""
    for path in ("/vm/migration", "/vm"):
        try:
            doc = api_get(sock_path, path)[0]
        except (OSError, ValueError, IndexError):
            continue
        for holder in (doc, doc.get("report") if isinstance(doc.get("report"), dict) else {}):
            if isinstance(holder, dict) and holder.get("announce") is not None:
                return holder["announce"]
    return None


def announced_at(stderr_text):
    """The destination's log line `network: announced 'NAME' at A, B, ... ms after it resumed`."""
    m = re.search(r"network: announced '[^']*' at ([\d, ]+) ms after it resumed", stderr_text or "")
    return [int(x) for x in m.group(1).replace(" ", "").split(",") if x] if m else None


def destination_report_field(directory, key):
    """`key` from the newest JSON report in `directory`, if any has it."""
    try:
        names = sorted((os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".json")),
                       key=os.path.getmtime, reverse=True)
    except OSError:
        return None
    for path in names:
        try:
            with open(path) as f:
                value = json.load(f).get(key)
            if value is not None:
                return value
        except (OSError, ValueError, AttributeError):
            continue
    return None


# ---------------------------------------------------------------- host facts

def have_module(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


class Installer:
    def __init__(self):
        self.updated = False

    def apt(self, package):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if not self.updated:
            log("installing %s: apt-get update" % package)
            run_quiet(["apt-get", "update"], 600, env=env)
            self.updated = True
        log("installing %s: apt-get install -y %s" % (package, package))
        rc, _, err = run_quiet(["apt-get", "install", "-y", package], 900, env=env)
        if rc != 0:
            warn("apt-get install %s failed: %s" % (package, err.strip()[-300:]))

    def pip(self, package):
        log("installing %s with pip" % package)
        rc, _, err = run_quiet([sys.executable, "-m", "pip", "install", "--quiet", package], 900)
        if rc != 0:
            warn("pip install %s failed: %s" % (package, err.strip()[-300:]))


def ensure_tools(args, systems):
    inst = Installer()
    if any(s.startswith("qemu") for s in systems) and not shutil.which(args.qemu):
        inst.apt("qemu-system-x86")
    if "qemu-tls" in systems and not shutil.which("openssl"):
        inst.apt("openssl")
    if not shutil.which("iperf3"):
        inst.apt("iperf3")
    if not have_module("matplotlib"):
        inst.pip("matplotlib")


def tsc_khz_of_host(args, workdir):
    """KVM's guest TSC rate as our VMM reports it (KVM_GET_TSC_KHZ), from a
    dirtier that needs no TSC rate (no pacing, no marks); else the kernel log."""
    sock = os.path.join(workdir, "tsc.sock")
    p = CHILDREN.spawn([args.vmm, "run", args.guest, "--memory", "64M",
                        "--cmdline", "pages=1 rate=0 mark_us=0", "--api-socket", sock,
                        "--report-dir", os.path.join(workdir, "reports")]
                       + BILLBOARD.guest(args.guest, "64M", "pages=1 rate=0 mark_us=0"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not os.path.exists(sock):
            time.sleep(0.05)
        rc, out, _ = run_quiet([args.vmm, "ctl", "info", "--api-socket", sock], 10)
        if rc == 0:
            khz = json.loads(out).get("tsc_khz")
            if khz:
                return int(khz), "vmm ctl info (KVM_GET_TSC_KHZ)"
    except (ValueError, OSError):
        pass
    finally:
        if p.poll() is None and os.path.exists(sock):
            run_quiet([args.vmm, "ctl", "shutdown", "--api-socket", sock], 5)
        CHILDREN.stop(p)
    rc, out, _ = run_quiet(["dmesg"], 10)
    if rc == 0:
        m = re.search(r"Refined TSC clocksource calibration: ([\d.]+) MHz", out) or \
            re.search(r"tsc: Detected ([\d.]+) MHz processor", out)
        if m:
            return int(float(m.group(1)) * 1000), "dmesg"
    with open("/proc/cpuinfo") as f:
        m = re.search(r"cpu MHz\s*:\s*([\d.]+)", f.read())
    return int(float(m.group(1)) * 1000), "/proc/cpuinfo cpu MHz"


def machine_info(args, run_qemu):
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "kernel": platform.release(), "cores": os.cpu_count(), "cpu": "?"}
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            info["cpu"] = m.group(1).strip() if m else "?"
        with open("/proc/meminfo") as f:
            m = re.search(r"MemTotal:\s*(\d+) kB", f.read())
            info["memory_gib"] = round(int(m.group(1)) / 2**20, 1) if m else None
    except OSError:
        pass
    info["kvm_modules"] = sorted(m for m in os.listdir("/sys/module") if m.startswith("kvm")) \
        if os.path.isdir("/sys/module") else []
    rc, out, _ = run_quiet(["git", "-C", REPO, "describe", "--always", "--dirty"], 10)
    info["vmm_commit"] = out.strip() if rc == 0 else None
    if run_qemu:
        rc, out, _ = run_quiet([args.qemu, "--version"], 10)
        info["qemu_version"] = out.splitlines()[0] if rc == 0 and out else None
    try:
        with open("/proc/loadavg") as f:
            info["loadavg_at_start"] = f.read().split()[:3]
    except OSError:
        pass
    return info


def measure_loopback():
    if not shutil.which("iperf3"):
        return None, "iperf3 not available"
    port = free_port()
    srv = CHILDREN.spawn(["iperf3", "-s", "-1", "-p", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            rc, out, err = run_quiet(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "3", "-J"], 30)
            if rc == 0:
                data = json.loads(out)
                return data["end"]["sum_received"]["bits_per_second"] / 8, None
            if "connect" not in (out + err).lower() and "refused" not in (out + err).lower():
                return None, (out + err).strip()[-300:]
            time.sleep(0.1)
        return None, "iperf3 server did not come up"
    except (ValueError, KeyError) as e:
        return None, "iperf3 output: %s" % e
    finally:
        CHILDREN.stop(srv)


def measure_memcpy(size=256 << 20, repeats=5):
    """Best of `repeats` copies of a 256 MiB buffer, in bytes copied per second."""
    try:
        import numpy as np
        a = np.ones(size, dtype=np.uint8)
        b = np.empty_like(a)
        np.copyto(b, a)
        best = min(_timed(lambda: np.copyto(b, a)) for _ in range(repeats))
        how = "numpy.copyto of 256 MiB"
    except ImportError:
        a = bytearray(b"\x01") * size
        b = bytearray(size)
        ma, mb = memoryview(a), memoryview(b)
        mb[:] = ma

        def copy():
            mb[:] = ma
        best = min(_timed(copy) for _ in range(repeats))
        how = "memoryview slice copy of 256 MiB"
    return size / best, how


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------- summary

MEASURES = [
    # key, label, scale, digits
    ("total_ms", "total time (ms)", 1, 0),
    ("setup_ms", "setup time (ms)", 1, 1),
    ("after_setup_ms", "total time after setup (ms)", 1, 0),
    ("handover_gap_ms", "downtime observed, hand-over gap (ms)", 1, 1),
    ("max_gap_ms", "longest mark gap in window (ms)", 1, 1),
    ("reported_downtime_ms", "downtime reported by the system (ms)", 1, 1),
    ("baseline_max_gap_ms", "longest mark gap before migrating (ms)", 1, 1),
    ("bytes_sent", "bytes sent (MiB)", 1 / 2**20, 1),
    ("memory_bytes", "guest memory, as the system counts it (MiB)", 1 / 2**20, 1),
    ("wire_per_memory", "bytes on wire / guest memory bytes", 1, 3),
    ("rounds", "rounds (ours: copy passes; QEMU: dirty syncs)", 1, 0),
    ("throughput_Bps", "throughput, bytes/total time (MiB/s)", 1 / 2**20, 1),
    ("reported_throughput_Bps", "throughput reported by the system (MiB/s)", 1 / 2**20, 1),
    ("loopback_pct", "throughput as % of loopback TCP", 1, 1),
    ("pause_to_resume_ms", "source pause to destination resume (ms)", 1, 1),
    # CPU seconds of each process outside its vCPU threads, migration start to end (cpu_cost.py)
    ("cpu_source_s_per_gib", "CPU s per GiB of guest memory: source, without vCPU threads", 1, 3),
    ("cpu_destination_s_per_gib", "CPU s per GiB of guest memory: destination, without vCPU threads", 1, 3),
    ("cpu_s_per_gib", "CPU s per GiB of guest memory: source + destination", 1, 3),
    # the dirtier's own rate= reports
    ("write_rate_before", "guest page writes achieved, 2 s before migrating (pages/s)", 1, 0),
    ("write_rate_during", "guest page writes achieved during the migration (pages/s)", 1, 0),
    ("fill_ms", "dirtier fill of the working set (ms, guest's TSC)", 1, 0),
    # post-copy (ours: the report's `postcopy`; QEMU: postcopy-blocktime, postcopy-requests)
    ("pc_passes_before_switch", "post-copy: whole copy passes before the switch", 1, 0),
    ("pc_blocked_ms", "post-copy: vCPU blocked time (ms)", 1, 1),
    ("pc_fault_median_ms", "post-copy: page-fault latency, median (ms)", 1, 3),
    ("pc_fault_p99_ms", "post-copy: page-fault latency, p99 (ms)", 1, 3),
    ("pc_faults", "post-copy: faults (ours) / page requests (QEMU)", 1, 0),
    ("pc_last_page_ms", "post-copy: destination resume to last page (ms)", 1, 0),
    # the network case, from the client's probes
    ("net_icmp_lost", "ping: replies lost", 1, 0),
    ("net_udp_lost", "UDP echo: replies lost", 1, 0),
    ("net_icmp_max_gap_ms", "ping: longest gap without a reply (ms)", 1, 1),
    ("net_udp_max_gap_ms", "UDP echo: longest gap without a reply (ms)", 1, 1),
    ("net_max_gap_ms", "either: longest gap without a reply (ms)", 1, 1),
    ("net_icmp_first_reply_ms", "ping: destination resume to first reply (ms)", 1, 1),
    ("net_udp_first_reply_ms", "UDP echo: destination resume to first reply (ms)", 1, 1),
    ("net_first_reply_ms", "either: destination resume to first reply (ms)", 1, 1),
    ("announce_first_ms", "first announcement after resume (ms; ours' log)", 1, 0),
    ("net_icmp_lost_before", "ping: replies lost in the 2 s before migrating", 1, 0),
]
# What QEMU 7.2 does not expose: shown as "n/a" in its columns, not "-".
QEMU_NOT_EXPOSED = {"pc_fault_median_ms", "pc_fault_p99_ms"}


def stats(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def summarize(runs, systems, configs, loopback_Bps):
    """Per (system, config): converged count and median/min/max of every measure
    over the completed runs."""
    out = []
    for case, limit, ac in configs:
        entry = {"case": case, "downtime_limit_ms": limit, "auto_converge": ac, "systems": {}}
        for system in systems:
            rs = [r for r in runs if r["system"] == system and r["case"] == case
                  and r["downtime_limit_ms"] == limit and r["auto_converge"] == ac]
            if not rs:
                continue
            done = [r for r in rs if r.get("converged")]
            s = {"runs": len(rs), "converged": len(done),
                 "outcomes": sorted(set(r.get("outcome", "?") for r in rs))}
            if any("pc_switched" in r for r in rs):
                s["switched"] = sum(1 for r in rs if r.get("pc_switched"))
            for key, _, _, _ in MEASURES:
                if key == "fill_ms":
                    # The fill is before the migration: every run that filled counts.
                    vals = [r.get(key) for r in rs]
                elif key == "loopback_pct":
                    vals = [100 * r["throughput_Bps"] / loopback_Bps
                            for r in done if loopback_Bps and r.get("throughput_Bps")]
                elif key == "after_setup_ms":
                    vals = [r["total_ms"] - r["setup_ms"] for r in done
                            if r.get("total_ms") is not None and r.get("setup_ms") is not None]
                else:
                    vals = [r.get(key) for r in done]
                s[key] = stats(vals)
            entry["systems"][system] = s
        # The tables' ratio columns, left/right of the medians, for the JSON.
        entry["ratios"] = {}
        for a, b, label in COMPARISONS:
            if a in entry["systems"] and b in entry["systems"]:
                entry["ratios"][label] = {
                    key: ratio_value(entry["systems"][a].get(key), entry["systems"][b].get(key))
                    for key, _, _, _ in MEASURES
                    if ratio_value(entry["systems"][a].get(key), entry["systems"][b].get(key)) is not None}
        out.append(entry)
    return out


def ratio_value(a, b):
    if a is None or b is None or not b["median"]:
        return None
    return a["median"] / b["median"]


def fmt_stat(st, scale, digits):
    if st is None:
        return "-"
    med = st["median"] * scale
    if st["n"] == 1 or st["min"] == st["max"]:
        return "%.*f" % (digits, med)
    return "%.*f [%.*f-%.*f]" % (digits, med, digits, st["min"] * scale, digits, st["max"] * scale)


def ratio(a, b):
    if a is None or b is None or not b["median"]:
        return "-"
    return "%.2f" % (a["median"] / b["median"])


def config_title(case, limit, ac):
    qemu_limit = (" (QEMU: %g ms, so that it switches); ours after %d rounds, QEMU asked after a dirty sync"
                  % (QEMU_POSTCOPY_DOWNTIME_MS, POSTCOPY_AFTER_ROUNDS)) if case == POSTCOPY_CASE else ""
    note = ""
    if case != NET_CASE and not dirtier_options(case)["mark_us"]:
        note = (" [no serial marks in this case: no observed downtime or mark gaps; downtime only as each "
                "system reports it; no rate reports either]")
    policy = ("auto-converge on (ours: convergence throttle)" if ac
              else "auto-converge off (ours: its default convergence, adaptive; QEMU: its default, none)")
    return "%s, downtime limit %g ms%s, %s%s" % (CASES[case][0], limit, qemu_limit, policy, note)


def systems_title(systems):
    return "Side by side: " + ", ".join(SYSTEM_LABEL[s] for s in SYSTEMS if s in systems)


def side_by_side(summary, systems):
    """[(title, header, rows)]: a column for each system in `systems` that ran this
    configuration, then a ratio column for each comparison whose two systems both ran."""
    blocks = []
    for entry in summary:
        st = entry["systems"]
        cols = [s for s in systems if s in st]
        if not cols:
            continue
        pairs = [(a, b, label) for a, b, label in COMPARISONS if a in st and b in st]
        header = ["measure"] + [SYSTEM_LABEL[s] for s in cols] + [label for _, _, label in pairs]
        rows = [["converged"] + ["%d/%d" % (st[s]["converged"], st[s]["runs"]) for s in cols] + [""] * len(pairs)]
        if any(st[s].get("switched") is not None for s in cols):
            rows.append(["switched to post-copy"] + ["%d/%d" % (st[s].get("switched", 0), st[s]["runs"]) for s in cols]
                        + [""] * len(pairs))
        for key, label, scale, digits in MEASURES:
            if all(st[s].get(key) is None for s in cols):
                continue
            rows.append([label] + ["n/a" if s.startswith("qemu") and key in QEMU_NOT_EXPOSED
                                   else fmt_stat(st[s].get(key), scale, digits) for s in cols]
                        + [ratio(st[a].get(key), st[b].get(key)) for a, b, _ in pairs])
        blocks.append((config_title(entry["case"], entry["downtime_limit_ms"], entry["auto_converge"]),
                       header, rows))
    return blocks


def tables(summary, left, right, ratio_label, invert=False):
    """[(title, header, rows)] comparing system `left` with `right`; the ratio is
    left/right, or right/left with `invert`."""
    blocks = []
    for entry in summary:
        sys_ = entry["systems"]
        if left not in sys_ or right not in sys_:
            continue
        a, b = sys_[left], sys_[right]
        header = ["measure", SYSTEM_LABEL[left], SYSTEM_LABEL[right], ratio_label]
        rows = [["converged", "%d/%d" % (a["converged"], a["runs"]),
                 "%d/%d" % (b["converged"], b["runs"]), ""]]
        for key, label, scale, digits in MEASURES:
            if a.get(key) is None and b.get(key) is None:
                continue
            rows.append([label, fmt_stat(a.get(key), scale, digits), fmt_stat(b.get(key), scale, digits),
                         ratio(b.get(key), a.get(key)) if invert else ratio(a.get(key), b.get(key))])
        blocks.append((config_title(entry["case"], entry["downtime_limit_ms"], entry["auto_converge"]),
                       header, rows))
    return blocks


def goal_lines(summary):
    """Issue #16's goals for the network case, against the measured medians: ours loses no more
    replies than QEMU (over the same transport where it ran, else plain), and its first reply
    comes within 20 ms of the destination's resume. Reported, never asserted."""
    lines = []
    for entry in summary:
        if entry["case"] != NET_CASE:
            continue
        st = entry["systems"]
        for ours in ("ours-tls", "ours-plain"):
            if ours not in st:
                continue
            peer = "qemu-tls" if ours == "ours-tls" and "qemu-tls" in st else "qemu"
            for key, what in (("net_icmp_lost", "ping replies lost"), ("net_udp_lost", "UDP echo replies lost")):
                a = (st[ours].get(key) or {}).get("median")
                b = (st.get(peer, {}).get(key) or {}).get("median")
                if a is None or b is None:
                    continue
                lines.append("%s (median): %s %g, %s %g: %s" % (
                    what, SYSTEM_LABEL[ours], a, SYSTEM_LABEL[peer], b,
                    "met (no more than QEMU's)" if a <= b else "NOT met (more than QEMU's)"))
            first = (st[ours].get("net_first_reply_ms") or {}).get("median")
            if first is not None:
                lines.append("resume to first reply (either probe), median: %s %.1f ms: %s" % (
                    SYSTEM_LABEL[ours], first, "met (under 20 ms)" if first < 20 else "NOT met (20 ms or more)"))
    return lines


def render_text(blocks):
    lines = []
    for title, header, rows in blocks:
        widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
        lines.append("")
        lines.append("== " + title)
        for r in [header] + rows:
            lines.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                   for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def render_md(blocks):
    lines = []
    for title, header, rows in blocks:
        lines += ["", "#### " + title, "",
                  "| " + " | ".join(header) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


PLOT_COLORS = {"ours-tls": "tab:blue", "ours-plain": "tab:cyan", "qemu": "tab:orange", "qemu-tls": "tab:red",
               RING: "tab:green"}
PLOT_STYLES = {(300, False): "-", (50, False): "--", (300, True): ":"}
PLOT_MARKERS = {(300, False): "o", (50, False): "s", (300, True): "^"}


def _plot_panel(ax, summary, systems, key, ylabel, xlabel):
    """One panel: the median of `key` per case (x) for each system and setting, with min-max
    bars; an x on top where a system ran a case and no run completed."""
    import matplotlib.transforms as mtransforms
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    cases = [c for c in CASES if any(e["case"] == c for e in summary)]
    xs = {c: i for i, c in enumerate(cases)}
    settings = sorted({(e["downtime_limit_ms"], e["auto_converge"]) for e in summary},
                      key=lambda s: (s[1], -s[0]))
    plotted = [s for s in SYSTEMS if s in systems] or list(systems)
    # Each system's points sit a little apart around the case, so that error bars do not hide each other.
    shift = {s: 0.03 * (i - (len(plotted) - 1) / 2) for i, s in enumerate(plotted)}
    has_data = False
    for system in plotted:
        for n, setting in enumerate(settings):
            px, py, lo, hi, nx = [], [], [], [], []
            for e in summary:
                if (e["downtime_limit_ms"], e["auto_converge"]) != setting or system not in e["systems"]:
                    continue
                st = e["systems"][system].get(key)
                x = xs[e["case"]] + 0.15 * (n - (len(settings) - 1) / 2) + shift[system]
                if st is None:
                    if not e["systems"][system]["converged"]:
                        nx.append(x)
                    # NaN breaks the line instead of joining its neighbours.
                    px.append(x)
                    py.append(float("nan"))
                    lo.append(0)
                    hi.append(0)
                    continue
                px.append(x)
                py.append(st["median"])
                lo.append(st["median"] - st["min"])
                hi.append(st["max"] - st["median"])
            label = "%s, %g ms%s" % (SYSTEM_LABEL[system], setting[0], ", auto-converge" if setting[1] else "")
            if any(v == v and v > 0 for v in py):
                has_data = True
                ax.errorbar(px, py, yerr=[lo, hi], color=PLOT_COLORS.get(system),
                            linestyle=PLOT_STYLES.get(setting, "-"),
                            marker=PLOT_MARKERS.get(setting, "o"), capsize=3, label=label)
            if nx:
                # No completed run: an x at the top of the plot.
                top = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
                ax.scatter(nx, [0.96] * len(nx), transform=top, color=PLOT_COLORS.get(system),
                           marker="x", s=60,
                           label=None if any(v == v for v in py) else label + " (no run converged)")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([CASES[c][3] for c in cases], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if has_data:
        # A log scale needs at least one positive value; without one the axis stays empty and linear.
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def plot(summary, systems, path):
    """migration.png: observed downtime and total time per workload and system."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not available"
    # The network case has no serial marks; its figures are in the tables.
    summary = [e for e in summary if e["case"] != NET_CASE]
    if not summary:
        return "no case to plot"
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    _plot_panel(axes[0], summary, systems, "handover_gap_ms", "observed downtime (ms, serial marks)",
                "workload (working set, dirty rate); the hot sweep has no marks")
    _plot_panel(axes[1], summary, systems, "total_ms", "total migration time (ms)",
                "workload (working set, dirty rate)")
    axes[0].set_title("Downtime observed from outside (median, min-max)", fontsize=10)
    axes[1].set_title("Total migration time (median, min-max); x on top = did not converge", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def plot_cpu(summary, systems, path):
    """migration-cpu.png: CPU seconds per GiB of guest memory (source + destination, without
    their vCPU threads) per workload and system."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not available"
    if not summary:
        return "no case to plot"
    fig, ax = plt.subplots(1, 1, figsize=(11, 5.5))
    _plot_panel(ax, summary, systems, "cpu_s_per_gib",
                "CPU s per GiB of guest memory (source + destination)", "workload (working set, dirty rate)")
    ax.set_title("CPU cost of migrating, outside the vCPU threads (median, min-max); x on top = did not converge",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs per case and setting (default 3)")
    ap.add_argument("--quick", action="store_true",
                    help="the everyday subset (make bench-migration QUICK=1): 1 run, 300 ms only, no ring tracker, "
                         "cases " + ", ".join(QUICK_CASES))
    ap.add_argument("--vmm", default=os.path.join(REPO, ".build/release/vmm"))
    ap.add_argument("--guest", default=os.path.join(REPO, "GuestImages/build/dirtier.elf"))
    ap.add_argument("--netecho", default=os.path.join(REPO, "GuestImages/build/netecho.elf"),
                    help="the network case's guest")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--qemu-cpu", default="auto",
                    help="QEMU -cpu model (default: host, or host,-arch-capabilities where KVM refuses host)")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "bench-results"))
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help="comma-separated subset of: %s (default: all four)" % ", ".join(SYSTEMS))
    ap.add_argument("--skip-qemu", action="store_true", help="run neither QEMU system")
    ap.add_argument("--qemu-postcopy-sync", type=int, default=QEMU_POSTCOPY_SYNCS,
                    help="postcopy case: QEMU's migrate-start-postcopy once dirty-sync-count reaches this "
                         "(default %d: after its second sync)" % QEMU_POSTCOPY_SYNCS)
    ap.add_argument("--skip-ring", action="store_true",
                    help="do not run our ring tracker (it runs with ours-tls, when that is selected)")
    ap.add_argument("--cases", help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--timeout", type=float, default=60, help="seconds per migration (default 60)")
    ap.add_argument("--steady", type=float, default=3, help="seconds to run after the first mark (default 3)")
    ap.add_argument("--settle", type=float, default=1, help="seconds to watch the destination after (default 1)")
    ap.add_argument("--limits", help="comma-separated downtime limits in ms to run, auto-converge off only "
                                      "(default: 300, 50 and 300 with auto-converge)")
    ap.add_argument("--ours-convergence", choices=["off", "throttle", "adaptive"],
                    help="our convergence policy in every setting, instead of adaptive (throttle with "
                         "auto-converge): to measure what the policy buys, e.g. off against adaptive")
    ap.add_argument("--max-bandwidth", type=int, default=0, metavar="BYTES_PER_S",
                    help="cap every migration's bandwidth (ours --max-bandwidth, QEMU max-bandwidth) to this many "
                         "bytes per second, e.g. to see a convergence policy act on a slow link (default 0: "
                         "unlimited, QEMU 1 TiB/s)")
    ap.add_argument("--channels", type=int, default=int(os.environ.get("BENCH_CHANNELS", "1")),
                    help="our data channels (vmm ctl migrate --channels; default 1, or $BENCH_CHANNELS); "
                         "the post-copy case always uses 1")
    args = ap.parse_args()

    for path, what in ((args.vmm, "the VMM (swift build -c release)"), (args.guest, "the dirtier (make -C GuestImages)")):
        if not os.path.exists(path):
            sys.exit("missing %s: %s" % (what, path))
    if args.quick:
        args.runs = 1
    cases = QUICK_CASES if args.quick else list(CASES)
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in CASES]
        if unknown:
            sys.exit("unknown case(s) %s; known: %s" % (", ".join(unknown), ", ".join(CASES)))
        cases = [c for c in CASES if c in wanted]
    settings = [(300, False)] if args.quick else [(300, False), (50, False), (300, True)]
    if args.limits:
        # Only these downtime limits, auto-converge off (a sweep of one option, e.g. --channels).
        settings = [(int(x), False) for x in args.limits.split(",") if x.strip()]
    skipped_cases = {}      # case -> why it cannot run here
    if NET_CASE in cases:
        why = network_unavailable() or (None if os.path.exists(args.netecho) else
                                        "the guest %s is missing (make -C GuestImages)" % args.netecho)
        if why:
            skipped_cases[NET_CASE] = why
            log("skipped: the network case cannot run here: %s" % why)
            cases = [c for c in cases if c != NET_CASE]
    configs = [(c, lim, ac) for c in cases for lim, ac in SINGLE_SETTING_CASES.get(c, settings)]
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SYSTEMS]
    if unknown:
        sys.exit("unknown system(s) %s; known: %s" % (", ".join(unknown), ", ".join(SYSTEMS)))
    systems = [s for s in SYSTEMS if s in wanted and not (args.skip_qemu and s.startswith("qemu"))]
    if "ours-tls" in systems and not args.skip_ring and not args.quick:
        systems.append(RING)
    if not systems:
        sys.exit("no system left to run")
    if not configs:
        sys.exit("no case left to run" + "".join("; the %s case was skipped: %s" % kv for kv in skipped_cases.items()))
    run_qemu = any(s.startswith("qemu") for s in systems)

    os.makedirs(args.out_dir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="migbench-")
    started = time.monotonic()
    try:
        ensure_tools(args, systems)
        if run_qemu and not shutil.which(args.qemu):
            sys.exit("QEMU (%s) is not available; use --skip-qemu" % args.qemu)
        info = machine_info(args, run_qemu)
        if any(c == NET_CASE for c, _, _ in configs):
            NetTopology.remove_leftovers()
        global BILLBOARD
        BILLBOARD = Billboard(args.vmm, workdir)
        tsc_khz, tsc_source = tsc_khz_of_host(args, workdir)
        log("host: %s, %s cores, kernel %s; guest TSC %d kHz (%s)" % (
            info["cpu"], info["cores"], info["kernel"], tsc_khz, tsc_source))
        log("measuring the machine: loopback TCP (iperf3, 3 s) and memcpy")
        loopback_Bps, loopback_err = measure_loopback()
        memcpy_Bps, memcpy_how = measure_memcpy()
        limits = {"loopback_tcp_Bps": loopback_Bps, "loopback_tcp_how": "iperf3 -c 127.0.0.1 -t 3",
                  "loopback_tcp_error": loopback_err, "memcpy_Bps": memcpy_Bps, "memcpy_how": memcpy_how}
        log("  loopback TCP %s, memcpy %.0f MiB/s" % (
            "%.0f MiB/s" % (loopback_Bps / 2**20) if loopback_Bps else "unknown (%s)" % loopback_err,
            memcpy_Bps / 2**20))

        qemu_cpu = qemu_note = None
        if run_qemu:
            qemu_cpu, qemu_note = choose_qemu_cpu(args, tsc_khz, workdir)
            if qemu_note:
                log("note: " + qemu_note)
        tls_dirs = None
        if "qemu-tls" in systems:
            tls_dirs = make_qemu_tls_creds(workdir)
            log("QEMU TLS: CA, server and client certificates made with openssl in %s" %
                os.path.dirname(tls_dirs[0]))
        ours = OurVMM(args, tsc_khz, workdir)
        qemu = QEMU(args, tsc_khz, workdir, qemu_cpu, tls_dirs) if qemu_cpu else None

        common = {
            "guest": os.path.relpath(args.guest, REPO), "memory_mib": MEMORY_MIB, "vcpus": VCPUS,
            "pattern": PATTERN, "mark_us": MARK_US, "tsc_khz": tsc_khz, "tsc_khz_source": tsc_source,
            "timeout_s": args.timeout, "steady_s_after_first_mark": args.steady, "settle_s": args.settle,
            "transport": "TCP over 127.0.0.1",
            "dirtier_report_ms": REPORT_MS, "fill_timeout_s": FILL_TIMEOUT_S,
            "cpu_cost": "user+system CPU s of the source and destination processes outside their vCPU threads, "
                        "from just before the migration starts to just after it ends, from /proc/PID/task/*/schedstat "
                        "and stat (bench/cpu_cost.py); vCPU threads by name (QEMU `CPU n/KVM` with -name "
                        "...,debug-threads=on) or by a kernel stack inside kvm_arch_vcpu_ioctl_run (ours: every "
                        "vCPU thread is `vcpuN`, and a build older than that, whose threads were all `vmm`, is "
                        "recognised by the stack); divided by the guest memory in GiB",
            "wire_per_memory": "ours bytes_sent / memory_bytes of the migration report; QEMU ram.transferred / ram.total",
            "systems": systems,
            "ours": "vmm ctl migrate --max-bandwidth 0 --max-downtime-ms L --convergence adaptive|throttle "
                    "--timeout T (auto-converge off: our default policy, adaptive; on: throttle, sized from the "
                    "dirty/link ratio once the rounds stall)",
            "ours_tls": "vmm receive (no --insecure-plaintext) and vmm ctl migrate --peer %s: mutually "
                        "authenticated TLS 1.3 between the host keys of the run's billboard" % BILLBOARD.host,
            "ours_plain": "--insecure-plaintext on vmm receive and vmm ctl migrate",
            "qemu_tls": "-object tls-creds-x509,id=tls0,dir=D,endpoint=server|client,verify-peer=on on each side, "
                        "migrate-set-parameters tls-creds=tls0 on both; CA, server and client certificates "
                        "(ECDSA P-256, server IP SANs 127.0.0.1 and %s) made with openssl at run start"
                        % NET_MIGRATION_IPS[1],
            "qemu": "-cpu %s; capabilities auto-converge=on/off, xbzrle/compress/multifd/postcopy-ram/release-ram "
                    "off; parameters downtime-limit=L, max-bandwidth=%d, cpu-throttle-initial=%d, "
                    "cpu-throttle-increment=%d, max-cpu-throttle=%d; cancelled after T s"
                    % (qemu_cpu, QEMU_UNLIMITED_BANDWIDTH, THROTTLE_INITIAL, THROTTLE_INCREMENT, THROTTLE_MAX),
            "postcopy": "case %s: ours --postcopy --postcopy-after-rounds %d (TLS and plain); QEMU plain with "
                        "postcopy-ram on both sides and postcopy-blocktime on the destination, migrate-start-postcopy "
                        "once dirty-sync-count >= %d (it switches at its next iteration); limit 300 ms (QEMU %d ms), "
                        "auto-converge off"
                        % (POSTCOPY_CASE, POSTCOPY_AFTER_ROUNDS, args.qemu_postcopy_sync, QEMU_POSTCOPY_DOWNTIME_MS),
            "network": "case %s: netecho.elf %d MiB, cmdline %r, MAC %s; namespaces LAN (bridge brLAN, client %s), "
                       "host A and host B (bridge brHOST with tap-a/tap-b and a veth uplink to brLAN), STP off; "
                       "migration over the hosts' own veth %s -> %s; downtime limit %d ms, bandwidth unlimited; "
                       "the client sends an ICMP echo and a UDP datagram (port %d) every %g ms each and probes %g s "
                       "after the migration ends; ours: vmm run/receive --net tap=...; QEMU: -netdev tap,ifname=... "
                       "-device virtio-net-pci,disable-modern=on, its default self-announce"
                       % (NET_CASE, NET_MEMORY_MIB, netecho_cmdline(), NET_GUEST_MAC, NET_CLIENT_IP,
                          NET_MIGRATION_IPS[0], NET_MIGRATION_IPS[1], NET_DOWNTIME_MS, NET_UDP_PORT,
                          NET_INTERVAL_S * 1000, NET_AFTER_S),
        }
        bandwidth = ("bandwidth capped at %d bytes/s" % args.max_bandwidth) if args.max_bandwidth else "bandwidth unlimited"
        common["max_bandwidth"] = args.max_bandwidth
        log("settings for every system: %d MiB, %d vCPU, pattern=%s mark_us=%d, %s, timeout %g s, "
            "migrate %g s after the first mark" % (MEMORY_MIB, VCPUS, PATTERN, MARK_US, bandwidth, args.timeout, args.steady))
        if args.ours_convergence:
            log("ours: convergence %s in every setting (--ours-convergence), whatever the tables' titles say "
                "of its defaults" % args.ours_convergence)

        runs = []
        skipped = {}        # system -> why this build cannot run it
        total = sum(len(systems_for(case, systems)) for case, _, _ in configs) * args.runs
        n = 0
        for case, limit, ac in configs:
            for k in range(1, args.runs + 1):
                for system in systems_for(case, systems):
                    n += 1
                    if system in skipped:
                        continue
                    tag = "r%d" % n
                    log("[%d/%d] %s | limit %g ms | auto-converge %s | %s | run %d of %d" % (
                        n, total, CASES[case][0], limit, "on" if ac else "off", SYSTEM_LABEL[system], k, args.runs))
                    t0 = time.monotonic()
                    try:
                        if case == NET_CASE:
                            runner = qemu if system.startswith("qemu") else ours
                            rec = runner.run_net(tag, tls=system.endswith("tls"))
                        elif system.startswith("qemu"):
                            rec = qemu.run(tag, case, limit, ac, tls=system == "qemu-tls")
                        else:
                            rec = ours.run(tag, case, limit, ac, tracker="ring" if system == RING else "bitmap",
                                           tls=system.startswith("ours-tls"))
                    except Unavailable as e:
                        skipped[system] = str(e)
                        log("      -> skipped: %s cannot run with this build (%s); no more %s runs" % (
                            SYSTEM_LABEL[system], e, SYSTEM_LABEL[system]))
                        continue
                    pages, rate = CASES[case][1], CASES[case][2]
                    rec.update(system=system, case=case, pages=pages, rate=rate,
                               dirtier=None if case == NET_CASE else dirtier_options(case),
                               cmdline=netecho_cmdline() if case == NET_CASE else dirtier_cmdline(pages, rate, tsc_khz,
                                                                                                  case),
                               downtime_limit_ms=limit, auto_converge=ac, run=k,
                               harness_s=round(time.monotonic() - t0, 2))
                    runs.append(rec)
                    log("      -> %s%s" % (rec.get("outcome"), run_brief(rec)))

        ran = [s for s in systems if s not in skipped]
        summary_q = summarize(runs, ran, configs, loopback_Bps)
        blocks_q = side_by_side(summary_q, [s for s in SYSTEMS if s in ran])
        blocks_t = tables(summary_q, "ours-tls", RING, "ring/bitmap", invert=True) if RING in ran else []
        skipped_lines = ["%s skipped: %s" % (SYSTEM_LABEL[s], why) for s, why in skipped.items()]
        skipped_lines += ["the %s case skipped: %s" % (c, why) for c, why in skipped_cases.items()]
        goals = goal_lines(summary_q)
        elapsed = time.monotonic() - started

        head = ("machine: %s, %s cores, %s GiB, kernel %s (%s); %s" % (
            info["cpu"], info["cores"], info.get("memory_gib"), info["kernel"],
            ", ".join(info.get("kvm_modules", [])), info["date"]))
        limits_line = "machine limits: loopback TCP %s; memcpy %.0f MiB/s (%s)" % (
            "%.0f MiB/s (iperf3)" % (loopback_Bps / 2**20) if loopback_Bps else "unknown",
            memcpy_Bps / 2**20, memcpy_how)
        log("")
        log(head)
        log(limits_line)
        for line in skipped_lines:
            log(line)
        if blocks_q:
            log("\n### %s (median [min-max] over completed runs; ratios left/right)" % systems_title(ran))
            log(render_text(blocks_q))
        if blocks_t:
            log("\n### Our dirty trackers, over TLS: bitmap vs ring")
            log(render_text(blocks_t))
        if goals:
            log("\n### Network case: issue #16's goals (measured, not asserted)")
            for line in goals:
                log("  " + line)
        log("\nwall time of this run: %.0f s" % elapsed)

        os.makedirs(args.out_dir, exist_ok=True)
        json_path = os.path.join(args.out_dir, "migration.json")
        md_path = os.path.join(args.out_dir, "migration.md")
        png_path = os.path.join(args.out_dir, "migration.png")
        cpu_png_path = os.path.join(args.out_dir, "migration-cpu.png")
        result = {"meta": dict(info, command=" ".join(sys.argv), quick=args.quick, runs_per_config=args.runs,
                               wall_s=round(elapsed, 1), qemu_cpu=qemu_cpu, qemu_cpu_note=qemu_note,
                               systems=systems, skipped_systems=skipped, skipped_cases=skipped_cases,
                               goals=goals),
                  "settings": common, "machine_limits": limits,
                  "cases": {c: {"label": CASES[c][0], "pages": CASES[c][1], "rate": CASES[c][2],
                                "dirtier": None if c == NET_CASE else dirtier_options(c),
                                "systems": systems_for(c, systems)} for c in cases},
                  "runs": runs,
                  "summary": summary_q}
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
        plot_err = plot(summary_q, ran, png_path)
        cpu_plot_err = plot_cpu(summary_q, ran, cpu_png_path)
        with open(md_path, "w") as f:
            f.write("## Live migration: our VMM vs QEMU, in plaintext and over TLS\n\n")
            f.write("%s  \n%s  \nQEMU: %s, `-cpu %s`. VMM commit: %s.  \n" % (
                head, limits_line, info.get("qemu_version") or "not run", qemu_cpu, info.get("vmm_commit")))
            f.write("Guest: dirtier.elf, %d MiB, %d vCPU, pattern=%s, mark_us=%d; loopback TCP; bandwidth unlimited; "
                    "%g s timeout; %d run(s) per setting; median [min-max] over completed runs.\n" % (
                        MEMORY_MIB, VCPUS, PATTERN, MARK_US, args.timeout, args.runs))
            f.write("Command: `%s`\n" % " ".join(["python3", "bench/migration_bench.py"] + sys.argv[1:]))
            f.write("\nObserved downtime: the guest writes a '.' to COM1 every millisecond; the harness timestamps "
                    "each one as it arrives on the source's and destination's stdout, and reports the gap from the "
                    "source's last mark to the destination's first. Reported downtime is each system's own figure "
                    "(ours: source pause to destination resume; QEMU: its `downtime`). Rounds: ours counts copy "
                    "passes including the final one, QEMU counts dirty-bitmap syncs (`dirty-sync-count`). "
                    "Bytes: ours counts the whole stream, QEMU `ram.transferred`. Setup: ours runs from the "
                    "request to the destination's accept (connection, TLS handshake, challenge, manifest, admission); "
                    "QEMU's `setup-time` starts in its migration thread, after the connection and TLS handshake, "
                    "which only its `total-time` includes.\n")
            if any(c == POSTCOPY_CASE for c, _, _ in configs):
                f.write("\nPost-copy (%s): ours `--postcopy --postcopy-after-rounds %d`; QEMU (plaintext) "
                        "`postcopy-ram` on both sides, `postcopy-blocktime` on the destination, "
                        "`migrate-start-postcopy` once `dirty-sync-count` reaches %d (QEMU switches at its next "
                        "iteration), QEMU's downtime limit 1 ms so that it does not finish in pre-copy instead. "
                        "vCPU blocked time: ours the sum of the destination's fault latencies, QEMU its "
                        "`postcopy-blocktime`. Fault latency: QEMU 7.2 exposes none (n/a). Faults: ours counts the "
                        "destination's missing-page faults, QEMU the source's `postcopy-requests`.\n" % (
                            CASES[POSTCOPY_CASE][0], POSTCOPY_AFTER_ROUNDS, args.qemu_postcopy_sync))
            if any(c == NET_CASE for c, _, _ in configs):
                f.write("\nNetwork case: netecho.elf (%d MiB) on a tap in host A's namespace, migrated over the hosts' "
                        "own link to a tap in host B's; the client on the LAN bridge sends an ICMP echo and a UDP "
                        "datagram to port %d every %d ms each. Resume time: ours from the destination's GET /vm "
                        "(uptime), QEMU from its RESUME event. Announcements: ours its own (RARP + gratuitous ARP), "
                        "QEMU its self-announce.\n" % (NET_MEMORY_MIB, NET_UDP_PORT, NET_INTERVAL_S * 1000))
            f.write("\nCPU: user + system seconds of the source and destination processes outside their vCPU "
                    "threads, from the migration's start to its end, read from /proc/PID/task/*/ (bench/cpu_cost.py), "
                    "divided by the guest's memory in GiB. vCPU threads: QEMU's by name (`CPU n/KVM`, "
                    "`-name ...,debug-threads=on`); ours by name too (`vcpuN`), or, for a build whose threads were all "
                    "`vmm` at the kernel level, by their kernel stack inside KVM_RUN. Bytes on wire / guest memory: ours `bytes_sent / memory_bytes` "
                    "of its report, QEMU `ram.transferred / ram.total`. Guest page writes achieved: the dirtier's "
                    "own `rate=` reports every %d ms (2 s before, and during the migration). The filled cases "
                    "(fill=random|text) start measuring after the dirtier's fill; the hot sweep (store=byte, "
                    "rate=0, mark_us=0) has no marks and no reports, so its downtime is each system's own.\n"
                    % REPORT_MS)
            if qemu_note:
                f.write("\nNote: %s.\n" % qemu_note)
            for line in skipped_lines:
                f.write("\n**%s**\n" % line)
            if blocks_q:
                f.write("\n### %s\n" % systems_title(ran))
                f.write(render_md(blocks_q) + "\n")
            if blocks_t:
                f.write("\n### Our dirty trackers, over TLS: bitmap vs ring\n")
                f.write(render_md(blocks_t) + "\n")
            if goals:
                f.write("\n### Network case: issue #16's goals (measured, not asserted)\n\n")
                f.write("".join("- %s\n" % line for line in goals))
        log("wrote %s, %s%s%s" % (json_path, md_path, ", " + png_path if not plot_err else " (no plot: %s)" % plot_err,
                                  ", " + cpu_png_path if not cpu_plot_err else ""))
    except KeyboardInterrupt:
        log("\ninterrupted; stopping every child")
        return 130
    finally:
        CHILDREN.kill_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def run_brief(r):
    parts = []
    for key, fmt in (("total_ms", " total %.0f ms"), ("handover_gap_ms", ", observed downtime %.1f ms"),
                     ("reported_downtime_ms", ", reported %.1f ms"), ("rounds", ", rounds %s")):
        if r.get(key) is not None:
            parts.append(fmt % r[key])
    if r.get("bytes_sent"):
        parts.append(", %.0f MiB" % (r["bytes_sent"] / 2**20))
    if r.get("wire_per_memory") is not None:
        parts.append(" (%.3f of guest memory)" % r["wire_per_memory"])
    if r.get("cpu_s_per_gib") is not None:
        parts.append(", CPU %.3f s/GiB (src %.3f, dst %.3f)" % (
            r["cpu_s_per_gib"], r["cpu_source_s_per_gib"], r["cpu_destination_s_per_gib"]))
    elif (r.get("cpu_window") or {}).get("missing"):
        parts.append(", CPU not measured (%s)" % "; ".join("%s: %s" % kv for kv in r["cpu_window"]["missing"].items()))
    if r.get("write_rate_during") is not None:
        parts.append(", writes %.0f/s (before %s)" % (
            r["write_rate_during"], "%.0f" % r["write_rate_before"] if r.get("write_rate_before") is not None else "-"))
    if r.get("fill_ms") is not None:
        parts.append(", fill %d ms" % r["fill_ms"])
    if r.get("pc_switched") is False:
        parts.append(", did NOT switch to post-copy")
    for key, fmt in (("pc_blocked_ms", ", vCPU blocked %.1f ms"), ("pc_fault_median_ms", ", fault median %.3f ms"),
                     ("pc_fault_p99_ms", " p99 %.3f ms"), ("pc_faults", ", faults/requests %s"),
                     ("net_icmp_lost", ", pings lost %s"), ("net_udp_lost", ", UDP lost %s"),
                     ("net_max_gap_ms", ", longest gap %.1f ms"),
                     ("net_first_reply_ms", ", resume to first reply %.1f ms")):
        if r.get(key) is not None:
            parts.append(fmt % r[key])
    if r.get("error") and not r.get("converged"):
        parts.append(" (%s)" % str(r["error"])[:200])
    return "".join(parts)


if __name__ == "__main__":
    sys.exit(main())
