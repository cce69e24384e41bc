#!/usr/bin/env python3
"""Live-migration benchmark: our VMM against QEMU, each in plaintext and over TLS, and
our two dirty trackers.

Four systems migrate the same guest with the same settings: ours over mutually
authenticated TLS (the default), ours with --insecure-plaintext, QEMU over plain TCP
and QEMU with tls-creds-x509 (mutual, certificates made with openssl for the run).
Every run boots the dirtier workload (GuestImages/build/dirtier.elf) on a source,
lets it reach steady state, migrates it over loopback TCP to a destination on the
same host, and measures the migration from the inside (each system's own report)
and from the outside (gaps between the guest's serial progress marks). A system this
build cannot run (ours over TLS before TLS is wired) is skipped with the reason.

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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEMORY_MIB = 512
VCPUS = 1
MARK_US = 1000
PATTERN = "seq"
# QEMU's max-bandwidth defaults to 128 MiB/s; "unlimited" is spelled as 1 TiB/s.
QEMU_UNLIMITED_BANDWIDTH = 1 << 40
# Our auto-converge: 20 % from the third round on, +10 % per round, at most 99 %.
# QEMU is given the same numbers explicitly.
THROTTLE_INITIAL, THROTTLE_INCREMENT, THROTTLE_MAX = 20, 10, 99

# name -> (label, dirtier pages, dirtier rate in pages/s, x label for the plot)
CASES = {
    "idle": ("idle (1 page at 1 page/s)", 1, 1, "idle"),
    "ws64-5k": ("64 MiB at 5,000 pages/s", 16384, 5000, "64M\n5k/s"),
    "ws64-20k": ("64 MiB at 20,000 pages/s", 16384, 20000, "64M\n20k/s"),
    "ws64-50k": ("64 MiB at 50,000 pages/s", 16384, 50000, "64M\n50k/s"),
    "ws256-max": ("256 MiB unpaced", 65536, 0, "256M\nunpaced"),
}
QUICK_CASES = ["idle", "ws64-5k", "ws256-max"]

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

    def guest(self, image, memory, cmdline):
        """Arguments naming the registration of exactly this image, memory and command line."""
        key = (image, memory, cmdline)
        if key not in self.names:
            name = "bench%d" % (len(self.names) + 1)
            subprocess.run([self.vmm, "billboard", "register", "--billboard", self.dir, "--signed-by", self.admin,
                            "--name", name, "--image", image, "--memory", memory, "--cmdline", cmdline],
                           check=True, stdout=subprocess.DEVNULL)
            self.names[key] = name
        return self.args() + ["--name", self.names[key]]


BILLBOARD = None
atexit.register(CHILDREN.kill_all)


def _on_signal(signum, _frame):
    CHILDREN.kill_all()
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
    """Reads a child's serial output on a thread and timestamps every '.'."""

    def __init__(self, stream):
        self.fd = stream.fileno()
        self.stream = stream
        self.marks = []
        self.text = bytearray()      # everything that is not a mark (bounded)
        self.first = threading.Event()
        self.eof = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

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
                if n != len(chunk) and len(self.text) < 8192:
                    self.text += chunk.replace(b".", b"")
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
        self.tsc_khz = tsc_khz
        self.workdir = workdir
        self.timeout = args.timeout
        self.steady = args.steady
        self.settle = args.settle

    def ctl(self, sub, sock, *extra, timeout=15):
        return run_quiet([self.vmm, "ctl", sub, *extra, "--api-socket", sock], timeout)

    def start_destination(self, tag, tracker, tls):
        sock = os.path.join(self.workdir, tag + "-dst.sock")
        errpath = os.path.join(self.workdir, tag + "-dst.err")
        # `vmm receive` keeps listening after a failed connection until a migration completes or
        # this passes (exit 4); the harness stops it after every run anyway, this is a backstop.
        listen_timeout = int(self.steady + self.timeout + 120)
        for _attempt in range(5):
            port = free_port()
            with open(errpath, "wb") as err:
                p = CHILDREN.spawn([self.vmm, "receive", "--listen", "127.0.0.1:%d" % port,
                                    "--listen-timeout", str(listen_timeout),
                                    "--api-socket", sock, "--dirty-tracker", tracker,
                                    "--report-dir", os.path.join(self.workdir, "reports")]
                                   + ([] if tls else ["--insecure-plaintext"]) + BILLBOARD.args(),
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

    def run(self, tag, case, downtime_ms, auto_converge, tracker, tls):
        _, pages, rate, _ = CASES[case]
        rec = {}
        dst = src = None
        ssock = os.path.join(self.workdir, tag + "-src.sock")
        serrpath = os.path.join(self.workdir, tag + "-src.err")
        try:
            dst, dmarks, port, dsock, derrpath = self.start_destination(tag, tracker, tls)
            cmdline = dirtier_cmdline(pages, rate, self.tsc_khz)
            with open(serrpath, "wb") as err:
                src = CHILDREN.spawn([self.vmm, "run", self.guest, "--memory", "%dM" % MEMORY_MIB,
                                      "--cmdline", cmdline, "--api-socket", ssock,
                                      "--dirty-tracker", tracker,
                                      "--report-dir", os.path.join(self.workdir, "reports")]
                                     + BILLBOARD.guest(self.guest, "%dM" % MEMORY_MIB, cmdline),
                                     stdout=subprocess.PIPE, stderr=err)
            smarks = SerialMarks(src.stdout)
            problem = wait_steady(smarks, src, self.steady, 30)
            if problem:
                rec.update(outcome="error", converged=False, error=problem + " " + read_tail(serrpath))
                return rec
            cmd = [self.vmm, "ctl", "migrate", "127.0.0.1:%d" % port, "--api-socket", ssock]
            cmd += ["--peer", BILLBOARD.host] if tls else ["--insecure-plaintext"]
            cmd += ["--max-downtime-ms", str(downtime_ms), "--max-bandwidth", "0",
                    "--timeout", str(self.timeout), "--quiet"]
            if auto_converge:
                cmd.append("--auto-converge")
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
                    warn("%s: outcome completed but ctl migrate exited %s" % (tag, rc))
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
                    error=report.get("error"))
            completed = rec.get("converged", False)
            if completed:
                time.sleep(self.settle)
            rec.update(mark_gaps(smarks, dmarks, t_start, t_end, self.settle, completed))
            if completed:
                try:
                    src.wait(5)
                except subprocess.TimeoutExpired:
                    rec["note"] = "the source VMM was still running 5 s after a completed migration"
                    warn("%s: %s" % (tag, rec["note"]))
                if dst.poll() is not None:
                    rec["note"] = "the destination exited (status %s): %s" % (dst.returncode, read_tail(derrpath))
                    warn("%s: %s" % (tag, rec["note"]))
            return rec
        except Unavailable:
            raise
        except Exception as e:  # a broken run is recorded, not fatal
            rec.update(outcome="error", converged=False, error="%s: %s" % (type(e).__name__, e))
            return rec
        finally:
            # Graceful shutdown through the API where it is up (the guest runs there), then
            # signals: a destination still listening, after a failed migration, gets SIGTERM.
            for p, sock in ((dst, os.path.join(self.workdir, tag + "-dst.sock")), (src, ssock)):
                if p is not None and p.poll() is None and os.path.exists(sock):
                    self.ctl("shutdown", sock, timeout=5)
                    try:
                        p.wait(5)
                    except subprocess.TimeoutExpired:
                        pass
                if p is not None:
                    CHILDREN.stop(p)
            if dst is not None:
                rec["destination_exit_status"] = dst.returncode


def dirtier_cmdline(pages, rate, tsc_khz):
    return "pages=%d rate=%d tsc_khz=%d pattern=%s mark_us=%d" % (pages, rate, tsc_khz, PATTERN, MARK_US)


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
            # events are skipped

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def make_qemu_tls_creds(workdir):
    """A CA, a server certificate (IP SAN 127.0.0.1, the host of the migrate URI, which the
    client checks) and a client certificate, made with openssl for this run. Returns two
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
    leaf("server", "/CN=127.0.0.1",
         "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
         "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
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
        self.tsc_khz = tsc_khz
        self.workdir = workdir
        self.timeout = args.timeout
        self.steady = args.steady
        self.settle = args.settle
        self.cpu = cpu
        # (server directory, client directory) from make_qemu_tls_creds, for the TLS runs.
        self.tls_dirs = tls_dirs

    def tls_object(self, endpoint):
        """Mutual TLS: each side verifies the other's certificate against the run's CA."""
        d = self.tls_dirs[0] if endpoint == "server" else self.tls_dirs[1]
        return ["-object", "tls-creds-x509,id=tls0,dir=%s,endpoint=%s,verify-peer=on" % (d, endpoint)]

    def base(self, cmdline, qmp_path):
        return [self.qemu, "-enable-kvm", "-cpu", self.cpu, "-m", str(MEMORY_MIB), "-smp", str(VCPUS),
                "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
                "-kernel", self.guest, "-append", cmdline,
                "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
                "-qmp", "unix:%s,server=on,wait=off" % qmp_path]

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
        cmdline = dirtier_cmdline(pages, rate, self.tsc_khz)
        rec = {}
        src = dst = qs = qd = None
        try:
            dsockp = os.path.join(self.workdir, tag + "-qdst.qmp")
            derr = os.path.join(self.workdir, tag + "-qdst.err")
            with open(derr, "wb") as err:
                dst = CHILDREN.spawn(self.base(cmdline, dsockp) + ["-incoming", "defer"]
                                     + (self.tls_object("server") if tls else []),
                                     stdout=subprocess.PIPE, stderr=err)
            dmarks = SerialMarks(dst.stdout)
            qd = QMP(dsockp)
            if tls:
                qd.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
                rec["destination_tls_creds"] = qd.cmd("query-migrate-parameters").get("tls-creds")
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
                src = CHILDREN.spawn(self.base(cmdline, ssockp) + (self.tls_object("client") if tls else []),
                                     stdout=subprocess.PIPE, stderr=err)
            smarks = SerialMarks(src.stdout)
            qs = QMP(ssockp)
            problem = wait_steady(smarks, src, self.steady, 60)
            if problem:
                rec.update(outcome="error", converged=False, error=problem + " " + read_tail(serr))
                return rec

            caps = {"auto-converge": auto_converge, "xbzrle": False, "compress": False,
                    "multifd": False, "postcopy-ram": False, "release-ram": False}
            qs.cmd("migrate-set-capabilities",
                   capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
            params = {"downtime-limit": int(downtime_ms), "max-bandwidth": QEMU_UNLIMITED_BANDWIDTH,
                      "cpu-throttle-initial": THROTTLE_INITIAL,
                      "cpu-throttle-increment": THROTTLE_INCREMENT,
                      "max-cpu-throttle": THROTTLE_MAX}
            if tls:
                # The client checks the server's certificate against the URI's host, 127.0.0.1.
                params["tls-creds"] = "tls0"
            qs.cmd("migrate-set-parameters", **params)
            rec["qemu_capabilities"] = caps
            rec["qemu_parameters"] = qs.cmd("query-migrate-parameters")

            t_start = time.monotonic()
            qs.cmd("migrate", uri="tcp:127.0.0.1:%d" % port)
            info = {}
            status = "setup"
            cancelled = False
            while True:
                info = qs.cmd("query-migrate")
                status = info.get("status", "?")
                if status in ("completed", "failed", "cancelled"):
                    break
                if not cancelled and time.monotonic() - t_start > self.timeout:
                    qs.cmd("migrate_cancel")
                    cancelled = True
                    last_active = info
                if cancelled and time.monotonic() - t_start > self.timeout + 15:
                    break
                if src.poll() is not None:
                    status = "source-died"
                    break
                time.sleep(0.02)
            t_end = time.monotonic()
            if cancelled and status != "completed":
                info = dict(last_active, final_status=status)
            rec["raw"] = info
            rec["wall_ms"] = 1000 * (t_end - t_start)
            ram = info.get("ram", {})
            completed = status == "completed"
            total_ms = info.get("total-time")
            if total_ms is None:
                total_ms = 1000 * (t_end - t_start)
            bytes_sent = ram.get("transferred")
            mbps = ram.get("mbps")
            rec.update(
                outcome="completed" if completed else ("not-converged" if cancelled else status),
                converged=completed,
                total_ms=total_ms, setup_ms=info.get("setup-time"),
                reported_downtime_ms=info.get("downtime"),
                bytes_sent=bytes_sent, rounds=ram.get("dirty-sync-count"),
                pages_sent=ram.get("normal"), zero_pages=ram.get("duplicate"),
                throughput_Bps=(bytes_sent / (total_ms / 1000)) if bytes_sent and total_ms else None,
                reported_throughput_Bps=(mbps * 1e6 / 8) if mbps is not None else None,
                error=info.get("error-desc"))
            if not completed:
                # Where a TLS handshake fails, the destination says why on stderr.
                rec["destination_stderr"] = read_tail(derr, 500)
            if completed:
                time.sleep(self.settle)
            rec.update(mark_gaps(smarks, dmarks, t_start, t_end, self.settle, completed))
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


def choose_qemu_cpu(args, tsc_khz, workdir):
    """-cpu host, unless this KVM refuses it (seen on nested kvm_pvm: QEMU aborts
    setting MSR 0x10a, IA32_ARCH_CAPABILITIES); then host without that MSR."""
    if args.qemu_cpu != "auto":
        return args.qemu_cpu, None
    failure = None
    for n, cpu in enumerate(("host", "host,-arch-capabilities")):
        errpath = os.path.join(workdir, "cpu-probe-%d.err" % n)
        with open(errpath, "wb") as err:
            p = CHILDREN.spawn([args.qemu, "-enable-kvm", "-cpu", cpu, "-m", str(MEMORY_MIB),
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
    ("rounds", "rounds (ours: copy passes; QEMU: dirty syncs)", 1, 0),
    ("throughput_Bps", "throughput, bytes/total time (MiB/s)", 1 / 2**20, 1),
    ("reported_throughput_Bps", "throughput reported by the system (MiB/s)", 1 / 2**20, 1),
    ("loopback_pct", "throughput as % of loopback TCP", 1, 1),
]


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
            for key, _, _, _ in MEASURES:
                if key == "loopback_pct":
                    vals = [100 * r["throughput_Bps"] / loopback_Bps
                            for r in done if loopback_Bps and r.get("throughput_Bps")]
                elif key == "after_setup_ms":
                    vals = [r["total_ms"] - r["setup_ms"] for r in done
                            if r.get("total_ms") is not None and r.get("setup_ms") is not None]
                else:
                    vals = [r.get(key) for r in done]
                s[key] = stats(vals)
            entry["systems"][system] = s
        out.append(entry)
    return out


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
    return "%s, downtime limit %g ms, auto-converge %s" % (CASES[case][0], limit, "on" if ac else "off")


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
        for key, label, scale, digits in MEASURES:
            if all(st[s].get(key) is None for s in cols):
                continue
            rows.append([label] + [fmt_stat(st[s].get(key), scale, digits) for s in cols]
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


def plot(summary, systems, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not available"
    cases = [c for c in CASES if any(e["case"] == c for e in summary)]
    xs = {c: i for i, c in enumerate(cases)}
    import matplotlib.transforms as mtransforms
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    colors = {"ours-tls": "tab:blue", "ours-plain": "tab:cyan", "qemu": "tab:orange", "qemu-tls": "tab:red",
              RING: "tab:green"}
    styles = {(300, False): "-", (50, False): "--", (300, True): ":"}
    markers = {(300, False): "o", (50, False): "s", (300, True): "^"}
    settings = sorted({(e["downtime_limit_ms"], e["auto_converge"]) for e in summary},
                      key=lambda s: (s[1], -s[0]))
    plotted = [s for s in SYSTEMS if s in systems] or list(systems)
    # Each system's points sit a little apart around the case, so that error bars do not hide each other.
    shift = {s: 0.03 * (i - (len(plotted) - 1) / 2) for i, s in enumerate(plotted)}
    for ax, key, ylabel in ((axes[0], "handover_gap_ms", "observed downtime (ms, serial marks)"),
                            (axes[1], "total_ms", "total migration time (ms)")):
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
                    ax.errorbar(px, py, yerr=[lo, hi], color=colors.get(system), linestyle=styles.get(setting, "-"),
                                marker=markers.get(setting, "o"), capsize=3, label=label)
                if nx:
                    # No completed run: an x at the top of the plot.
                    top = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
                    ax.scatter(nx, [0.96] * len(nx), transform=top, color=colors.get(system),
                               marker="x", s=60,
                               label=None if any(v == v for v in py) else label + " (no run converged)")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([CASES[c][3] for c in cases])
        ax.set_xlabel("workload (working set, dirty rate)")
        ax.set_ylabel(ylabel)
        if has_data:
            # A log scale needs at least one positive value; without one the axis stays empty and linear.
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_title("Downtime observed from outside (median, min-max)", fontsize=10)
    axes[1].set_title("Total migration time (median, min-max); x on top = did not converge", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs per case and setting (default 3)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 run, 300 ms only, cases idle, ws64-5k, ws256-max")
    ap.add_argument("--vmm", default=os.path.join(REPO, ".build/release/vmm"))
    ap.add_argument("--guest", default=os.path.join(REPO, "GuestImages/build/dirtier.elf"))
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--qemu-cpu", default="auto",
                    help="QEMU -cpu model (default: host, or host,-arch-capabilities where KVM refuses host)")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "bench-results"))
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help="comma-separated subset of: %s (default: all four)" % ", ".join(SYSTEMS))
    ap.add_argument("--skip-qemu", action="store_true", help="run neither QEMU system")
    ap.add_argument("--skip-ring", action="store_true",
                    help="do not run our ring tracker (it runs with ours-tls, when that is selected)")
    ap.add_argument("--cases", help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--timeout", type=float, default=60, help="seconds per migration (default 60)")
    ap.add_argument("--steady", type=float, default=3, help="seconds to run after the first mark (default 3)")
    ap.add_argument("--settle", type=float, default=1, help="seconds to watch the destination after (default 1)")
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
    configs = [(c, lim, ac) for c in cases for lim, ac in settings]
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SYSTEMS]
    if unknown:
        sys.exit("unknown system(s) %s; known: %s" % (", ".join(unknown), ", ".join(SYSTEMS)))
    systems = [s for s in SYSTEMS if s in wanted and not (args.skip_qemu and s.startswith("qemu"))]
    if "ours-tls" in systems and not args.skip_ring:
        systems.append(RING)
    if not systems:
        sys.exit("no system left to run")
    run_qemu = any(s.startswith("qemu") for s in systems)

    os.makedirs(args.out_dir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="migbench-")
    started = time.monotonic()
    try:
        ensure_tools(args, systems)
        if run_qemu and not shutil.which(args.qemu):
            sys.exit("QEMU (%s) is not available; use --skip-qemu" % args.qemu)
        info = machine_info(args, run_qemu)
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
            "systems": systems,
            "ours": "vmm ctl migrate --max-bandwidth 0 --max-downtime-ms L [--auto-converge] --timeout T "
                    "(auto-converge: 20%% from the third round, +10%%/round, max 99%%)",
            "ours_tls": "vmm receive (no --insecure-plaintext) and vmm ctl migrate --peer %s: mutually "
                        "authenticated TLS 1.3 between the host keys of the run's billboard" % BILLBOARD.host,
            "ours_plain": "--insecure-plaintext on vmm receive and vmm ctl migrate",
            "qemu_tls": "-object tls-creds-x509,id=tls0,dir=D,endpoint=server|client,verify-peer=on on each side, "
                        "migrate-set-parameters tls-creds=tls0 on both; CA, server and client certificates "
                        "(ECDSA P-256, server IP SAN 127.0.0.1) made with openssl at run start",
            "qemu": "-cpu %s; capabilities auto-converge=on/off, xbzrle/compress/multifd/postcopy-ram/release-ram "
                    "off; parameters downtime-limit=L, max-bandwidth=%d, cpu-throttle-initial=%d, "
                    "cpu-throttle-increment=%d, max-cpu-throttle=%d; cancelled after T s"
                    % (qemu_cpu, QEMU_UNLIMITED_BANDWIDTH, THROTTLE_INITIAL, THROTTLE_INCREMENT, THROTTLE_MAX),
        }
        log("settings for every system: %d MiB, %d vCPU, pattern=%s mark_us=%d, bandwidth unlimited, timeout %g s, "
            "migrate %g s after the first mark" % (MEMORY_MIB, VCPUS, PATTERN, MARK_US, args.timeout, args.steady))

        runs = []
        skipped = {}        # system -> why this build cannot run it
        total = len(configs) * args.runs * len(systems)
        n = 0
        for case, limit, ac in configs:
            for k in range(1, args.runs + 1):
                for system in systems:
                    n += 1
                    if system in skipped:
                        continue
                    tag = "r%d" % n
                    log("[%d/%d] %s | limit %g ms | auto-converge %s | %s | run %d of %d" % (
                        n, total, CASES[case][0], limit, "on" if ac else "off", SYSTEM_LABEL[system], k, args.runs))
                    t0 = time.monotonic()
                    try:
                        if system.startswith("qemu"):
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
                               cmdline=dirtier_cmdline(pages, rate, tsc_khz),
                               downtime_limit_ms=limit, auto_converge=ac, run=k,
                               harness_s=round(time.monotonic() - t0, 2))
                    runs.append(rec)
                    log("      -> %s%s" % (rec.get("outcome"), run_brief(rec)))

        ran = [s for s in systems if s not in skipped]
        summary_q = summarize(runs, ran, configs, loopback_Bps)
        blocks_q = side_by_side(summary_q, [s for s in SYSTEMS if s in ran])
        blocks_t = tables(summary_q, "ours-tls", RING, "ring/bitmap", invert=True) if RING in ran else []
        skipped_lines = ["%s skipped: %s" % (SYSTEM_LABEL[s], why) for s, why in skipped.items()]
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
        log("\nwall time of this run: %.0f s" % elapsed)

        os.makedirs(args.out_dir, exist_ok=True)
        json_path = os.path.join(args.out_dir, "migration.json")
        md_path = os.path.join(args.out_dir, "migration.md")
        png_path = os.path.join(args.out_dir, "migration.png")
        result = {"meta": dict(info, command=" ".join(sys.argv), quick=args.quick, runs_per_config=args.runs,
                               wall_s=round(elapsed, 1), qemu_cpu=qemu_cpu, qemu_cpu_note=qemu_note,
                               systems=systems, skipped_systems=skipped),
                  "settings": common, "machine_limits": limits,
                  "cases": {c: {"label": CASES[c][0], "pages": CASES[c][1], "rate": CASES[c][2]} for c in cases},
                  "runs": runs,
                  "summary": summary_q}
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
        plot_err = plot(summary_q, ran, png_path)
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
        log("wrote %s, %s%s" % (json_path, md_path, ", " + png_path if not plot_err else " (no plot: %s)" % plot_err))
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
    if r.get("error") and not r.get("converged"):
        parts.append(" (%s)" % str(r["error"])[:200])
    return "".join(parts)


if __name__ == "__main__":
    sys.exit(main())
