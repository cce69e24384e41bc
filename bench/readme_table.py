#!/usr/bin/env python3
"""Regenerates the README's live-migration table from a migration_bench.py result file.

    python3 bench/readme_table.py [bench-results/migration.json] [README.md]

The table is bench/summarize.py's output for that file, headed by the run's date, machine, commit
and command, and it replaces whatever stands between the two markers below in the README. The
file must hold a whole run of the matrix or a quick one; nothing is edited by hand, so the README
never shows a figure that no result file holds."""
import json
import os
import subprocess
import sys

BEGIN = "<!-- migration-table:begin (bench/readme_table.py writes this part) -->"
END = "<!-- migration-table:end -->"


def main():
    results = sys.argv[1] if len(sys.argv) > 1 else "bench-results/migration.json"
    readme = sys.argv[2] if len(sys.argv) > 2 else "README.md"
    try:
        meta = json.load(open(results)).get("meta", {})
    except (OSError, ValueError) as e:
        sys.exit(f"readme_table: cannot read {results} ({e}); run `make bench-migration` first")
    text = open(readme).read()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        sys.exit(f"readme_table: {readme} must hold the markers once each, in order:\n{BEGIN}\n{END}")
    here = os.path.dirname(os.path.abspath(__file__))
    table = subprocess.run([sys.executable, os.path.join(here, "summarize.py"), results],
                           check=True, capture_output=True, text=True).stdout.strip()
    runs = meta.get("runs_per_config", "?")
    head = (f"Measured {meta.get('date', '?')} on {meta.get('cpu', '?')}, {meta.get('cores', '?')} cores, "
            f"kernel {meta.get('kernel', '?')} ({', '.join(meta.get('kvm_modules', [])) or 'kvm'}); "
            f"{meta.get('qemu_version', 'QEMU ?')}; VMM commit {meta.get('vmm_commit', '?')}; "
            f"{runs} run(s) per setting{' (quick subset)' if meta.get('quick') else ''}, medians. "
            f"Command: `{meta.get('command', '?')}`.")
    start = text.index(BEGIN) + len(BEGIN)
    new = text[:start] + "\n" + head + "\n\n" + table + "\n" + text[text.index(END):]
    if new != text:
        open(readme, "w").write(new)
    print(f"readme_table: {readme} now shows {results} ({runs} run(s) per setting)")


if __name__ == "__main__":
    main()
