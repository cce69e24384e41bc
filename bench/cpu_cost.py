"""CPU cost of a migration, measured from outside the processes.

What a migration costs is the CPU time the source and destination processes spend
*besides running the guest*: their threads other than the vCPU threads (ours are named
`vcpuN`, QEMU's `CPU n/KVM`). It is read from /proc, the same way for every system:

- each live thread's time on a CPU from /proc/PID/task/TID/schedstat (nanoseconds), or
  from /proc/PID/task/TID/stat (utime + stime in clock ticks) where schedstat is missing;
- threads that end inside the window (a finished sender, a page server) are no longer
  listed at its end, so their time is taken from the process's own total
  (/proc/PID/stat, which keeps the time of threads that have ended) minus the time of
  the threads still listed (both in clock ticks, so accurate to a tick or two).

A window is opened before the migration starts and closed right after it ended while
both processes still exist (our source exits about 300 ms after a completed migration,
QEMU's stays). Threads that start inside the window count from zero.
"""
import os
import re

VCPU_THREAD = re.compile(r"^(vcpu\d+|CPU \d+/KVM)$")
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


def non_vcpu_seconds(before, after, last_seen=None):
    """CPU seconds spent between two samples of one process by its threads that are not
    vCPU threads, with the time of threads that ended in between.

    `last_seen` ({tid: (name, seconds, ticks)}, the latest look at every thread during the
    window) tells the ended threads apart: an ended vCPU thread (our source's, after the
    guest moved) is left out up to its last look; what no look explains counts as
    migration work, which can only overstate the cost."""
    if before is None or after is None:
        return None
    last_seen = last_seen or {}
    seconds = 0.0
    explained_ticks = 0
    for tid, (name, secs, ticks) in after["threads"].items():
        _, secs0, ticks0 = before["threads"].get(tid, (name, 0.0, 0))
        explained_ticks += ticks - ticks0
        if not VCPU_THREAD.match(name):
            seconds += max(0.0, secs - secs0)
    for tid, (name, secs, ticks) in last_seen.items():
        if tid in after["threads"]:
            continue
        _, secs0, ticks0 = before["threads"].get(tid, (name, 0.0, 0))
        explained_ticks += ticks - ticks0
        if not VCPU_THREAD.match(name):
            seconds += max(0.0, secs - secs0)
    unexplained = (after["total_ticks"] - before["total_ticks"]) - explained_ticks
    if unexplained > 0:
        seconds += unexplained * TICK_S
    return seconds


class Window:
    """The CPU the given processes spend outside their vCPU threads between open() and
    close(); processes are named by role ("source", "destination"). A thread looks at
    them every `period` seconds in between, so that threads that end inside the window
    are known by name and by their time shortly before they ended."""

    def __init__(self, pids, period=0.02):
        import threading
        self.pids = {role: pid for role, pid in pids.items() if pid}
        self.before = {}
        self.last_seen = {role: {} for role in self.pids}
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _look(self):
        for role, pid in self.pids.items():
            s = sample(pid)
            if s:
                self.last_seen[role].update(s["threads"])

    def _watch(self):
        while not self._stop.wait(self.period):
            self._look()

    def open(self):
        self.before = {role: sample(pid) for role, pid in self.pids.items()}
        self._look()
        self._thread.start()
        return self

    def close(self):
        """{role: seconds or None, "vcpu_thread_names": [...]}."""
        self._stop.set()
        self._thread.join()
        out = {}
        names = set()
        for role, pid in self.pids.items():
            after = sample(pid)
            out[role] = non_vcpu_seconds(self.before.get(role), after, self.last_seen[role])
            names.update(n for n, _, _ in self.last_seen[role].values() if VCPU_THREAD.match(n))
        out["vcpu_thread_names"] = sorted(names)
        return out
