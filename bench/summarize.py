#!/usr/bin/env python3
"""Prints a compact Markdown summary (one line per case and setting) from bench-results/migration.json:
total time and observed hand-over downtime of the four systems (ours TLS, ours plain, QEMU plain,
QEMU TLS), the ratios of total time, and how many runs converged. "-" = not run, skipped or no
completed run."""
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
    print(f"| {name} | {s['downtime_limit_ms']} | {'on' if s['auto_converge'] else 'off'} | "
          + " / ".join(fmt(total[k]) for k, _ in SYSTEMS) + " | "
          + " / ".join(fmt(down[k], 1) for k, _ in SYSTEMS) + " | "
          + " | ".join(ratio(total[a], total[b]) for a, b, _ in RATIOS) + f" | {conv} |")
