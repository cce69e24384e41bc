#!/usr/bin/env python3
"""Prints a compact Markdown summary (one line per case and setting) from bench-results/migration.json:
total time and observed hand-over downtime of the four systems (ours TLS, ours plain, QEMU plain,
QEMU TLS), the ratios of total time, and how many runs converged. "-" = not run, skipped or no
completed run. Then, when they ran, one line per system for the post-copy case (vCPU blocked
time, fault latency) and for the network case (replies lost, gaps, resume to first reply). Last, where
the results have them, one line per case and setting for CPU per GiB of guest memory (source +
destination, without their vCPU threads), bytes on wire / guest memory and the guest's achieved
page-write rate."""
import json
import sys

SYSTEMS = [("ours-tls", "ours TLS"), ("ours-plain", "ours plain"), ("qemu", "QEMU plain"), ("qemu-tls", "QEMU TLS")]
# Ratios of total time, left / right.
RATIOS = [("ours-tls", "qemu-tls", "TLS ours/QEMU"), ("ours-tls", "qemu", "ours TLS/QEMU plain"),
          ("ours-plain", "qemu", "plain ours/QEMU"), ("ours-tls", "ours-plain", "ours TLS/plain")]
# Results from before the TLS columns: our only system then migrated over plain TCP.
OLD_NAMES = {"ours-bitmap": "ours-plain"}

path = sys.argv[1] if len(sys.argv) > 1 else "bench-results/migration.json"
data = json.load(open(path))
cases = data.get("cases", {})
labels = {k: v.get("label", k) for k, v in cases.items()} if isinstance(cases, dict) else {}


def med(s, key):
    return (s.get(key) or {}).get("median")


def fmt(v, digits=0):
    return "-" if v is None else f"{v:,.{digits}f}"


def ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}"


for system, why in data.get("meta", {}).get("skipped_systems", {}).items():
    print(f"{system} skipped: {why}  ")
names = " / ".join(label for _, label in SYSTEMS)
print(f"| case | limit | auto-conv. | total ms {names} | observed downtime ms {names} | "
      + " | ".join(f"total {label}" for _, _, label in RATIOS) + f" | converged {names} |")
print("|---|---:|---|---|---|" + "---:|" * len(RATIOS) + "---|")
for s in data["summary"]:
    by = {OLD_NAMES.get(k, k): v for k, v in s["systems"].items()}
    total = {k: med(by.get(k, {}), "total_ms") for k, _ in SYSTEMS}
    down = {k: med(by.get(k, {}), "handover_gap_ms") for k, _ in SYSTEMS}
    conv = " / ".join(f"{by[k]['converged']}/{by[k]['runs']}" if k in by else "-" for k, _ in SYSTEMS)
    name = labels.get(s["case"], s["case"])
    if ((cases.get(s["case"]) or {}).get("dirtier") or {}).get("mark_us") == 0:
        # No serial marks (the hot sweep): the downtime each system reports, said so.
        down = {k: med(by.get(k, {}), "reported_downtime_ms") for k, _ in SYSTEMS}
        name += " (downtime: as each system reports it)"
    print(f"| {name} | {s['downtime_limit_ms']} | {'on' if s['auto_converge'] else 'off'} | "
          + " / ".join(fmt(total[k]) for k, _ in SYSTEMS) + " | "
          + " / ".join(fmt(down[k], 1) for k, _ in SYSTEMS) + " | "
          + " | ".join(ratio(total[a], total[b]) for a, b, _ in RATIOS) + f" | {conv} |")


def extra_table(case, title, columns):
    """One line per system that ran `case`: the medians of `columns` ([(key, heading, digits)])."""
    entry = next((e for e in data["summary"] if e["case"] == case), None)
    if entry is None:
        return
    print(f"\n{title}\n")
    print("| system | " + " | ".join(h for _, h, _ in columns) + " | converged |")
    print("|---|" + "---:|" * len(columns) + "---|")
    for key, label in SYSTEMS:
        st = entry["systems"].get(key)
        if st is None:
            continue
        cells = []
        for k, _, digits in columns:
            v = med(st, k)
            cells.append("n/a" if v is None and key.startswith("qemu") and k in ("pc_fault_median_ms", "pc_fault_p99_ms")
                         else fmt(v, digits))
        print(f"| {label} | " + " | ".join(cells) + f" | {st['converged']}/{st['runs']} |")


for case, why in data.get("meta", {}).get("skipped_cases", {}).items():
    print(f"\nthe {case} case skipped: {why}  ")
extra_table("postcopy", "Post-copy, 256 MiB unpaced (medians)", [
    ("total_ms", "total ms", 0), ("handover_gap_ms", "observed downtime ms", 1),
    ("pc_blocked_ms", "vCPU blocked ms", 1), ("pc_fault_median_ms", "fault median ms", 3),
    ("pc_fault_p99_ms", "fault p99 ms", 3), ("pc_faults", "faults / requests", 0),
    ("pc_last_page_ms", "resume to last page ms", 0)])
extra_table("net", "Network: netecho pinged every 10 ms during the migration (medians)", [
    ("net_icmp_lost", "pings lost", 0), ("net_udp_lost", "UDP lost", 0),
    ("net_max_gap_ms", "longest gap ms", 1), ("net_first_reply_ms", "resume to first reply ms", 1),
    ("pause_to_resume_ms", "pause to resume ms", 1)])
goals = data.get("meta", {}).get("goals", [])
if goals:
    print()
for line in goals:
    print(f"- {line}")


# CPU per GiB, bytes on wire per byte of guest memory, the write rate achieved (results from
# before these measures have none, and print nothing here).
if any(med(st, "cpu_s_per_gib") is not None for e in data["summary"] for st in e["systems"].values()):
    CPU_RATIOS = [("ours-tls", "qemu-tls", "ours TLS/QEMU TLS"), ("ours-tls", "qemu", "ours TLS/QEMU plain"),
                  ("ours-plain", "qemu", "ours plain/QEMU plain")]
    print(f"\nCPU s per GiB of guest memory, source + destination without vCPU threads; bytes on wire / guest "
          f"memory; guest page writes/s achieved during the migration (medians; {names})\n")
    print(f"| case | limit | auto-conv. | CPU s/GiB | " + " | ".join(f"CPU {label}" for _, _, label in CPU_RATIOS)
          + " | wire/memory | writes/s |")
    print("|---|---:|---|---|" + "---:|" * len(CPU_RATIOS) + "---|---|")
    for s in data["summary"]:
        by = {OLD_NAMES.get(k, k): v for k, v in s["systems"].items()}
        cpu = {k: med(by.get(k, {}), "cpu_s_per_gib") for k, _ in SYSTEMS}
        wire = " / ".join(fmt(med(by.get(k, {}), "wire_per_memory"), 3) for k, _ in SYSTEMS)
        rate = " / ".join(fmt(med(by.get(k, {}), "write_rate_during")) for k, _ in SYSTEMS)
        print(f"| {labels.get(s['case'], s['case'])} | {s['downtime_limit_ms']} | {'on' if s['auto_converge'] else 'off'} | "
              + " / ".join(fmt(cpu[k], 3) for k, _ in SYSTEMS) + " | "
              + " | ".join(ratio(cpu[a], cpu[b]) for a, b, _ in CPU_RATIOS) + f" | {wire} | {rate} |")
