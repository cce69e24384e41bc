#!/usr/bin/env python3
"""The fixed cost of a migration's hand-over, for an idle guest.

Migrates the dirtier (512 MiB, one page, 250 us serial marks by default) between two of our
VMMs on this host over TLS, as migration_bench.py does for `ours-tls`, a few times, and prints
for each run the downtime observed from the guest's marks (the source's last mark to the
destination's first), the downtime the source reports, and its `downtime_phases_ms`.

    swift build -c release
    python3 bench/handover_bench.py --runs 5 [--mark-us 250] [--rate 0] [--pages 1] [--plaintext]

Writes every run (with the reports) to bench-results/handover.json.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import migration_bench as mb  # noqa: E402

PHASES = ["pause", "last_pages", "state", "ready", "lease_handover", "go", "resume"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--vmm", default=os.path.join(mb.REPO, ".build/release/vmm"))
    ap.add_argument("--guest", default=os.path.join(mb.REPO, "GuestImages/build/dirtier.elf"))
    ap.add_argument("--mark-us", type=int, default=250, help="the dirtier's mark period (default 250 us)")
    ap.add_argument("--pages", type=int, default=1, help="the dirtier's working set in pages (default 1)")
    ap.add_argument("--rate", type=int, default=0, help="pages/s the dirtier writes (0: unpaced; default 0)")
    ap.add_argument("--plaintext", action="store_true", help="--insecure-plaintext on both sides instead of TLS")
    ap.add_argument("--steady", type=float, default=2)
    ap.add_argument("--settle", type=float, default=1)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--out", default=os.path.join(mb.REPO, "bench-results", "handover.json"))
    args = ap.parse_args()
    if not os.path.exists(args.vmm):
        sys.exit("no vmm at %s: swift build -c release" % args.vmm)

    mb.MARK_US = args.mark_us
    mb.CASES["handover"] = ("idle guest, hand-over", args.pages, args.rate, "idle")
    workdir = tempfile.mkdtemp(prefix="handover-")
    mb.BILLBOARD = mb.Billboard(args.vmm, workdir)
    tsc_khz, _ = mb.tsc_khz_of_host(args, workdir)
    ours = mb.OurVMM(args, tsc_khz, workdir)
    load = os.getloadavg()
    print("load average %.2f %.2f %.2f; dirtier pages=%d rate=%d mark_us=%d; %s" % (
        load + (args.pages, args.rate, args.mark_us, "plaintext" if args.plaintext else "TLS")))
    runs = []
    for k in range(args.runs):
        rec = ours.run("h%d" % k, "handover", 300, False, "bitmap", not args.plaintext)
        raw = rec.get("raw") or {}
        phases = raw.get("downtime_phases_ms") or {}
        rec["load_average"] = os.getloadavg()
        runs.append(rec)
        if rec.get("outcome") != "completed":
            print("run %d: %s %s" % (k + 1, rec.get("outcome"), rec.get("error")))
            continue
        print("run %d: observed %.2f ms (baseline max gap %.2f), reported %.2f ms | %s | intent %.2f, running reply %.2f" % (
            k + 1, rec.get("handover_gap_ms") or -1, rec.get("baseline_max_gap_ms") or -1,
            rec.get("reported_downtime_ms") or -1,
            " ".join("%s %.2f" % (p, phases.get(p, -1)) for p in PHASES),
            raw.get("handover_intent_ms") or 0, phases.get("running_reply", -1)))
        if phases.get("destination"):
            print("       destination: " + " ".join("%s %.2f" % (k, v) for k, v in sorted(phases["destination"].items())
                                                  if isinstance(v, (int, float))) + ", clock " + str(phases.get("clock")))
        time.sleep(0.5)
    done = [r for r in runs if r.get("outcome") == "completed"]
    if done:
        def med(values):
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else float("nan")
        print("median of %d: observed %.2f ms, reported %.2f ms | %s" % (
            len(done), med([r.get("handover_gap_ms") for r in done]), med([r.get("reported_downtime_ms") for r in done]),
            " ".join("%s %.2f" % (p, med([((r.get("raw") or {}).get("downtime_phases_ms") or {}).get(p) for r in done]))
                     for p in PHASES)))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "runs": runs}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
