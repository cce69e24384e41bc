#!/usr/bin/env python3
"""Joins the result directories of several migration_bench.py runs of one VMM build into one.

    python3 bench/merge_results.py OUT_DIR PART_DIR [PART_DIR ...]

The full matrix at 5 runs per setting takes well over an hour here; run in parts (`--cases` a few
at a time), a part that fails or is interrupted costs only itself. This writes OUT_DIR/migration.json
(the parts' runs and summaries side by side, every part's command in `meta.command`), migration.md
(the parts' tables, in order) and the two plots, as one run would. It refuses parts of different VMM
commits, different run counts or overlapping cases: a merged table must read as one measurement."""
import importlib.util
import json
import os
import sys


def load(part):
    path = os.path.join(part, "migration.json") if os.path.isdir(part) else part
    with open(path) as f:
        return path, json.load(f)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out_dir, parts = sys.argv[1], sys.argv[2:]
    loaded = [load(p) for p in parts]
    first = loaded[0][1]["meta"]
    seen = {}
    for path, data in loaded:
        meta = data["meta"]
        for key in ("vmm_commit", "runs_per_config", "quick"):
            if meta.get(key) != first.get(key):
                sys.exit(f"merge_results: {path} has {key} {meta.get(key)!r}, the first part {first.get(key)!r}; "
                         "merge only parts of one build and one setting of --runs")
        for case in data.get("cases", {}):
            if case in seen:
                sys.exit(f"merge_results: case {case} is in both {seen[case]} and {path}")
            seen[case] = path

    meta = dict(first)
    meta["command"] = " ; ".join(d["meta"].get("command", "?") for _, d in loaded)
    meta["wall_s"] = round(sum(d["meta"].get("wall_s", 0) for _, d in loaded), 1)
    meta["parts"] = [{"file": p, "date": d["meta"].get("date"), "wall_s": d["meta"].get("wall_s"),
                      "loadavg_at_start": d["meta"].get("loadavg_at_start")} for p, d in loaded]
    systems = []
    for _, d in loaded:
        systems += [s for s in d["meta"].get("systems", []) if s not in systems]
    meta["systems"] = systems
    meta["skipped_systems"] = {k: v for _, d in loaded for k, v in d["meta"].get("skipped_systems", {}).items()}
    meta["skipped_cases"] = {k: v for _, d in loaded for k, v in (d["meta"].get("skipped_cases") or {}).items()}
    meta["goals"] = [g for _, d in loaded for g in (d["meta"].get("goals") or [])]
    merged = {"meta": meta, "settings": loaded[0][1].get("settings"),
              "machine_limits": loaded[0][1].get("machine_limits"),
              "cases": {k: v for _, d in loaded for k, v in d.get("cases", {}).items()},
              "runs": [r for _, d in loaded for r in d.get("runs", [])],
              "summary": [s for _, d in loaded for s in d.get("summary", [])]}

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "migration.json"), "w") as f:
        json.dump(merged, f, indent=1)
    with open(os.path.join(out_dir, "migration.md"), "w") as f:
        f.write(f"Merged from {len(parts)} runs of one build ({meta.get('vmm_commit')}), "
                f"{meta.get('wall_s', 0) / 60:.0f} min in all; each part's own header follows.\n\n")
        for path, _ in loaded:
            md = os.path.join(os.path.dirname(path), "migration.md")
            if os.path.exists(md):
                f.write(open(md).read().rstrip() + "\n\n")

    # The plots as migration_bench.py draws them, from the joined summary.
    spec = importlib.util.spec_from_file_location("migration_bench",
                                                  os.path.join(os.path.dirname(os.path.abspath(__file__)), "migration_bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ran = [s for s in systems if s not in meta["skipped_systems"]]
    for name, draw in (("migration.png", bench.plot), ("migration-cpu.png", bench.plot_cpu)):
        err = draw(merged["summary"], ran, os.path.join(out_dir, name))
        if err:
            print(f"merge_results: no {name}: {err}")
    print(f"merge_results: {out_dir}/migration.json holds {len(merged['runs'])} runs of {len(merged['cases'])} cases "
          f"from {len(parts)} parts")


if __name__ == "__main__":
    main()
