#!/usr/bin/env python3
"""Prints a compact Markdown summary (one line per case) from bench-results/migration.json:
total time, observed hand-over downtime and throughput, ours (bitmap) against QEMU, with ratios."""
import json
import sys

path = sys.argv[1] if len(sys.argv) > 1 else "bench-results/migration.json"
data = json.load(open(path))
cases = data.get("cases", {})
labels = {k: v.get("label", k) for k, v in cases.items()} if isinstance(cases, dict) else {}


def med(s, key, scale=1.0):
    v = s.get(key, {}).get("median")
    return None if v is None else v * scale


def fmt(v, digits=0):
    return "-" if v is None else f"{v:,.{digits}f}"


def ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}"


print("| case | limit | auto-conv. | total ms ours / QEMU (ratio) | observed downtime ms ours / QEMU (ratio) | throughput MiB/s ours / QEMU (ratio) | converged ours / QEMU |")
print("|---|---:|---|---|---|---|---|")
for s in data["summary"]:
    ours, qemu = s["systems"].get("ours-bitmap", {}), s["systems"].get("qemu", {})
    t = (med(ours, "total_ms"), med(qemu, "total_ms"))
    d = (med(ours, "handover_gap_ms"), med(qemu, "handover_gap_ms"))
    r = (med(ours, "throughput_Bps", 1 / 1048576), med(qemu, "throughput_Bps", 1 / 1048576))
    name = labels.get(s["case"], s["case"])
    print(f"| {name} | {s['downtime_limit_ms']} | {'on' if s['auto_converge'] else 'off'} | "
          f"{fmt(t[0])} / {fmt(t[1])} ({ratio(*t)}) | {fmt(d[0], 1)} / {fmt(d[1], 1)} ({ratio(*d)}) | "
          f"{fmt(r[0])} / {fmt(r[1])} ({ratio(*r)}) | {ours.get('converged', 0)}/{ours.get('runs', 0)} / {qemu.get('converged', 0)}/{qemu.get('runs', 0)} |")
