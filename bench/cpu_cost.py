"""CPU cost of a migration, measured from outside the processes.

What a migration costs is the CPU time the source and destination processes spend
*besides running the guest*: their threads other than the vCPU threads. It is read from
/proc, the same way for every system:

- each live thread's time on a CPU from /proc/PID/task/TID/schedstat (nanoseconds), or
  from /proc/PID/task/TID/stat (utime + stime in clock ticks) where schedstat is missing;
- threads that end inside the window (a finished sender, a page server) are no longer
  listed at its end, so their time is taken from the process's own total
  (/proc/PID/stat, which keeps the time of threads that have ended) minus the time of
  the threads still listed (both in clock ticks, so accurate to a tick or two).

Which threads are vCPU threads is decided per thread, in this order:

- by name: QEMU's are `CPU n/KVM` (with `-name NAME,debug-threads=on`), ours are `vcpuN`
  (our VMM names its threads with pthread_setname_np: `vcpu0`, `postcopy-pages`, ...);
- by what the kernel says the thread is doing: a thread whose kernel stack
  (/proc/PID/task/TID/stack, root only) holds `kvm_arch_vcpu_ioctl_run` is inside
  KVM_RUN, which only a vCPU thread calls. A thread that is running at that instant shows
  no stack, so the window keeps looking (every `period`) and, when told how many vCPU
  threads to expect, looks on after open() and close() until it has found them.
  (/proc/PID/task/TID/syscall would not do: a running thread shows only `running`, and
  KVM's own worker thread in the process, `kvm-nx-lpage-re`, shows the KVM_RUN of the
  thread it was forked from.)

A role whose expected vCPU threads were not all found gets no figure (None), and the
reason, rather than a figure that would hold the guest's own CPU time.

A window is opened before the migration starts and closed right after it ended while
both processes still exist (our source exits about 300 ms after a completed migration,
QEMU's stays; a child that has exited but not been waited for is still readable). Threads
that start inside the window count from zero.
"""
import os
import re
import time

VCPU_THREAD = re.compile(r"^(vcpu\d+|CPU \d+/KVM)$")
KVM_RUN_FRAME = "kvm_arch_vcpu_ioctl_run"
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _stat_ticks(path):
    """utime + stime of a /proc stat file, in clock ticks (the name may hold spaces and
    parentheses, so the fields are counted from the last ')')."""
    with open(path) as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def _thread_seconds(task_dir):
    try:
        with open(os.path.join(task_dir, "schedstat")) as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return _stat_ticks(os.path.join(task_dir, "stat")) * TICK_S


def in_kvm_run(task_dir):
    """True when the thread's kernel stack is inside KVM_RUN, False when it is not (or the
    thread is on a CPU right now), None when the stack cannot be read (not root)."""
    try:
        with open(os.path.join(task_dir, "stack")) as f:
            return KVM_RUN_FRAME in f.read()
    except PermissionError:
        return None
    except OSError:
        return False


def sample(pid):
    """One look at a process: {tid: (name, seconds, ticks)} and the process's total ticks;
    None once it has gone."""
    base = "/proc/%d" % pid
    try:
        total = _stat_ticks(base + "/stat")
        threads = {}
        for tid in os.listdir(base + "/task"):
            task = "%s/task/%s" % (base, tid)
            try:
                with open(task + "/comm") as f:
                    name = f.read().rstrip("\n")
                threads[int(tid)] = (name, _thread_seconds(task), _stat_ticks(task + "/stat"))
            except (OSError, ValueError):
                continue  # the thread ended while we looked
        return {"total_ticks": total, "threads": threads}
    except (OSError, ValueError):
        return None


def non_vcpu_seconds(before, after, last_seen=None, vcpu_tids=None):
    """CPU seconds spent between two samples of one process by its threads that are not
    vCPU threads (named so, or with a tid in `vcpu_tids`), with the time of threads that
    ended in between. Returns (seconds, seconds of the vCPU threads).

    `last_seen` ({tid: (name, seconds, ticks)}, the latest look at every thread during the
    window) tells the ended threads apart: an ended vCPU thread (our source's, after the
    guest moved) is left out up to its last look; what no look explains counts as
    migration work, which can only overstate the cost."""
    if before is None or after is None:
        return None, None
    last_seen = last_seen or {}
    vcpu_tids = vcpu_tids or set()
    seconds = vcpu = 0.0
    explained_ticks = 0
    threads = list(after["threads"].items()) + [(t, v) for t, v in last_seen.items() if t not in after["threads"]]
    for tid, (name, secs, ticks) in threads:
        _, secs0, ticks0 = before["threads"].get(tid, (name, 0.0, 0))
        explained_ticks += ticks - ticks0
        spent = max(0.0, secs - secs0)
        if VCPU_THREAD.match(name) or tid in vcpu_tids:
            vcpu += spent
        else:
            seconds += spent
    unexplained = (after["total_ticks"] - before["total_ticks"]) - explained_ticks
    if unexplained > 0:
        seconds += unexplained * TICK_S
    return seconds, vcpu


class Window:
    """The CPU the given processes spend outside their vCPU threads between open() and
    close(); processes are named by role ("source", "destination"). A thread looks at
    them every `period` seconds in between, so that threads that end inside the window
    are known by name and by their time shortly before they ended, and vCPU threads are
    found by their kernel stack."""

    def __init__(self, pids, period=0.02, find_s=3.0):
        import threading
        self.pids = {role: pid for role, pid in pids.items() if pid}
        self.before = {}
        self.last_seen = {role: {} for role in self.pids}
        self.last_sample = {role: None for role in self.pids}
        # role -> {tid: (name, how it was found)}
        self.vcpus = {role: {} for role in self.pids}
        self.stack_readable = True
        self.period = period
        self.find_s = find_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _classify(self, role, pid, threads):
        found = self.vcpus[role]
        for tid, (name, _, _) in threads.items():
            if tid in found:
                continue
            if VCPU_THREAD.match(name):
                found[tid] = (name, "name")
                continue
            state = in_kvm_run("/proc/%d/task/%d" % (pid, tid))
            if state is None:
                self.stack_readable = False
            elif state:
                found[tid] = (name, "kernel stack in KVM_RUN")

    def _look(self):
        for role, pid in self.pids.items():
            s = sample(pid)
            if s:
                self.last_seen[role].update(s["threads"])
                self.last_sample[role] = s
                self._classify(role, pid, s["threads"])

    def _watch(self):
        # Ends at close(), or once every process has gone (a run that failed before close()).
        while not self._stop.wait(self.period):
            self._look()
            if not any(os.path.exists("/proc/%d" % pid) for pid in self.pids.values()):
                return

    def _find(self, expect):
        """Looks (every 5 ms) until each role in `expect` ({role: n}) has n vCPU threads
        found, or find_s seconds passed."""
        if not expect:
            return
        deadline = time.monotonic() + self.find_s
        while any(len(self.vcpus.get(r, {})) < n for r, n in expect.items() if r in self.pids):
            if time.monotonic() > deadline or not self.stack_readable:
                return
            for role, pid in self.pids.items():
                if len(self.vcpus[role]) < expect.get(role, 0):
                    s = sample(pid)
                    if s:
                        self._classify(role, pid, s["threads"])
            time.sleep(0.005)

    def open(self, expect=None):
        """Starts the window. `expect` ({role: n}): the vCPU threads each process has now;
        the window first looks until it has found them (a few ms for a busy guest)."""
        self.expect_open = dict(expect or {})
        for role, pid in self.pids.items():
            s = sample(pid)
            if s:
                self._classify(role, pid, s["threads"])
        self._find(self.expect_open)
        self.before = {role: sample(pid) for role, pid in self.pids.items()}
        self._look()
        self._thread.start()
        return self

    def close(self, expect=None):
        """Ends the window. `expect` ({role: n}): the vCPU threads each process should have
        had in the window (the destination's start when the guest resumes there); after the
        last sample the window looks on until it has found them, to tell them apart.
        Returns {role: seconds or None, "vcpu_seconds": {...}, "vcpu_threads": {...},
        "vcpu_thread_names": [...], "missing": {role: why}}."""
        self._stop.set()
        self._thread.join()
        after = {role: sample(pid) for role, pid in self.pids.items()}
        notes = {}
        for role, s in after.items():
            if s is None and self.last_sample[role] is not None:
                # Gone and already waited for: its last look stands in (up to `period` late).
                after[role] = self.last_sample[role]
                notes[role] = "the process had gone at close; its last look (within %g s) was used" % self.period
            elif s is not None:
                self.last_seen[role].update(s["threads"])
                self._classify(role, self.pids[role], s["threads"])
        expect = dict(expect or {})
        for role, n in self.expect_open.items():
            expect[role] = max(expect.get(role, 0), n)
        self._find(expect)
        out = {"vcpu_seconds": {}, "vcpu_threads": {}, "missing": {}, "notes": notes}
        names = set()
        for role in self.pids:
            found = self.vcpus[role]
            secs, vcpu = non_vcpu_seconds(self.before.get(role), after.get(role), self.last_seen[role], set(found))
            out["vcpu_seconds"][role] = vcpu
            out["vcpu_threads"][role] = [[tid, name, how] for tid, (name, how) in sorted(found.items())]
            names.update(name for name, _ in found.values())
            want = expect.get(role, 0)
            if secs is not None and len(found) < want:
                out["missing"][role] = "%d of %d vCPU thread(s) found%s; the figure would hold guest time" % (
                    len(found), want, "" if self.stack_readable else " (/proc/PID/task/TID/stack unreadable: not root?)")
                secs = None
            out[role] = secs
        out["vcpu_thread_names"] = sorted(names)
        return out
