#!/usr/bin/env bash
# Turns target/reliability/results.jsonl (one line per fault scenario run, written by the
# fault suite) into the table of docs/RELIABILITY.md.
set -euo pipefail
cd "$(dirname "$0")/.."
results=${1:-target/reliability/results.jsonl}
python3 - "$results" <<'PY'
import json, sys, collections
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    line = line.strip()
    if not line:
        continue
    r = json.loads(line)
    t = rows.setdefault(r["fault"], {"runs": 0, "items": 0, "lost": 0, "duplicated": 0, "partial": 0})
    t["runs"] += 1
    for k in ("items", "lost", "duplicated", "partial"):
        t[k] += r[k]
print("| fault kind | runs | items | lost | duplicated | partial |")
print("|---|---:|---:|---:|---:|---:|")
total = {"runs": 0, "items": 0, "lost": 0, "duplicated": 0, "partial": 0}
for fault, t in sorted(rows.items()):
    print(f"| {fault} | {t['runs']} | {t['items']} | {t['lost']} | {t['duplicated']} | {t['partial']} |")
    for k in total:
        total[k] += t[k]
print(f"| **all** | {total['runs']} | {total['items']} | {total['lost']} | {total['duplicated']} | {total['partial']} |")
PY
