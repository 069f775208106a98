"""Summarises a Schemathesis NDJSON report: per operation and phase, the schema-valid
(positive) requests sent and how many the API accepted (2xx), and every status seen.

    python3 tests/api/st_summary.py target/schemathesis-events.ndjson
"""

import collections
import json
import sys


def main(path: str) -> None:
    rows = collections.defaultdict(lambda: collections.Counter())
    statuses = collections.defaultdict(collections.Counter)
    with open(path, encoding="utf-8") as f:
        for line in f:
            event = json.loads(line).get("ScenarioFinished")
            if not event:
                continue
            recorder = event.get("recorder") or {}
            label = recorder.get("label", "?")
            phase = event.get("phase")
            phase = phase.get("name") if isinstance(phase, dict) else phase
            interactions = recorder.get("interactions") or {}
            for case_id, node in (recorder.get("cases") or {}).items():
                response = (interactions.get(case_id) or {}).get("response")
                if not response:
                    continue
                code = response["status_code"]
                meta = (node.get("value") or {}).get("meta") or {}
                mode = (meta.get("generation") or {}).get("mode")
                statuses[label][code] += 1
                if mode == "positive":
                    rows[(label, phase)]["positive"] += 1
                    if 200 <= code < 300:
                        rows[(label, phase)]["accepted"] += 1
    print(f"{'operation':<42} {'phase':<9} {'positive':>8} {'accepted':>8}  statuses (all cases)")
    for (label, phase), c in sorted(rows.items()):
        share = 100.0 * c["accepted"] / c["positive"] if c["positive"] else 0.0
        codes = " ".join(f"{k}:{v}" for k, v in sorted(statuses[label].items()))
        print(f"{label:<42} {phase:<9} {c['positive']:>8} {c['accepted']:>5} {share:3.0f}%  {codes}")


if __name__ == "__main__":
    main(sys.argv[1])
