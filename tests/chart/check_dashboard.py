#!/usr/bin/env python3
"""Checks that every bulkops metric a Grafana dashboard queries exists.

    check_dashboard.py DASHBOARD.json [METRICS.txt ...]

Every `bulkops_[a-z0-9_]+` name in a panel target's `expr` (rows' nested panels and
template variable queries included) must be

  * with exposition files (Prometheus text format, e.g. `curl :8080/metrics`): a sample
    family declared by `# TYPE` in one of them, or a series of one (`_bucket`, `_sum`,
    `_count` of a histogram or summary; counters are declared with their `_total` name);
  * without: a name registered in shared/src/metrics.rs (its "bulkops_..." string
    literals), or a process-collector metric when metrics.rs registers the collector
    with the `bulkops` namespace; histogram names also admit `_bucket`, `_sum`, `_count`.

Exits non-zero listing unknown names. Standard library only.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
METRICS_RS = REPO / "shared" / "src" / "metrics.rs"
NAME = re.compile(r"\bbulkops_[a-z0-9_]+")
SERIES_SUFFIXES = ("_bucket", "_sum", "_count")
# What the `prometheus` crate's ProcessCollector exports (Linux), under its namespace.
PROCESS_COLLECTOR = (
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
)


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query in the dashboard."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            for t in p.get("targets") or []:
                if isinstance(t.get("expr"), str):
                    found.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels") or [])

    walk(dashboard.get("panels") or [])
    for var in (dashboard.get("templating") or {}).get("list") or []:
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if var.get("type") == "query" and isinstance(q, str):
            found.append((f"variable {var.get('name')}", q))
    return found


def known_from_source() -> tuple[set[str], set[str], str]:
    """(all names, histogram names, description) from shared/src/metrics.rs."""
    src = METRICS_RS.read_text()
    names = set(re.findall(r'"(bulkops_[a-z0-9_]+)"', src))
    histograms = set()
    for m in re.finditer(r'\b(histogram|histogram_vec)\(\s*&?r,\s*"(bulkops_[a-z0-9_]+)"', src):
        histograms.add(m.group(2))
    collector = re.search(r'ProcessCollector::new\([^;]*"bulkops"', src, re.S)
    if collector:
        names |= {f"bulkops_{n}" for n in PROCESS_COLLECTOR}
    desc = f"{len(names)} names from {METRICS_RS.relative_to(REPO)}" + (
        " (incl. the process collector's)" if collector else ""
    )
    return names, histograms, desc


def known_from_expositions(paths: list[Path]) -> tuple[set[str], set[str], str]:
    names: set[str] = set()
    histograms: set[str] = set()
    for path in paths:
        for line in path.read_text().splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(None, 3)
                names.add(name)
                if kind.strip() in ("histogram", "summary"):
                    histograms.add(name)
            elif line and not line.startswith("#"):
                names.add(re.split(r"[{\s]", line, 1)[0])
    return names, histograms, f"{len(names)} families/series from {len(paths)} exposition file(s)"


def resolves(name: str, names: set[str], histograms: set[str]) -> bool:
    if name in names:
        return True
    for suffix in SERIES_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in histograms:
            return True
    return False


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    dashboard_path = Path(argv[1])
    dashboard = json.loads(dashboard_path.read_text())
    exprs = dashboard_exprs(dashboard)
    if argv[2:]:
        names, histograms, source = known_from_expositions([Path(p) for p in argv[2:]])
    else:
        names, histograms, source = known_from_source()
    used: dict[str, list[str]] = {}
    for title, expr in exprs:
        for name in NAME.findall(expr):
            used.setdefault(name, []).append(title)
    unknown = {n: t for n, t in used.items() if not resolves(n, names, histograms)}
    problems = []
    if not exprs:
        problems.append("the dashboard has no queries")
    ds = [v for v in (dashboard.get("templating") or {}).get("list") or [] if v.get("type") == "datasource"]
    if not any(v.get("name") == "datasource" and v.get("query") == "prometheus" for v in ds):
        problems.append("no `datasource` template variable of type prometheus")

    print("check_dashboard summary")
    print(f"  {dashboard_path}: schemaVersion {dashboard.get('schemaVersion')}, {len(exprs)} queries, "
          f"{len(used)} distinct bulkops_* names, checked against {source}")
    for name in sorted(unknown):
        print(f"  UNKNOWN {name} (in: {', '.join(sorted(set(unknown[name])))})")
    for p in problems:
        print(f"  PROBLEM {p}")
    failed = len(unknown) + len(problems)
    print(f"{len(used) - len(unknown)} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
