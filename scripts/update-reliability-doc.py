"""Replaces a results table of docs/RELIABILITY.md (between its markers) with a new one.

Usage: update-reliability-doc.py TABLE COMMAND [SECTION]; SECTION names the markers
(`results`, the fault suite's, by default; `cluster` for the cluster suite's).
"""
import datetime
import sys

table_path, command = sys.argv[1], sys.argv[2]
section = sys.argv[3] if len(sys.argv) > 3 else "results"
doc_path = "docs/RELIABILITY.md"
table = open(table_path).read().strip()
doc = open(doc_path).read()
start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
head, rest = doc.split(start, 1)
_, tail = rest.split(end, 1)
stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
body = f"{start}\nMeasured {stamp} with `{command}`:\n\n{table}\n{end}"
open(doc_path, "w").write(head + body + tail)
print(f"updated {doc_path}")
