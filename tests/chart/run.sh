#!/usr/bin/env bash
# Checks the deployment files: the Helm chart (lint, render, Kubernetes schemas,
# assertions), the Grafana dashboard's metric names, and docker-compose.yml.
#
#   bash tests/chart/run.sh
#
# Needs python3 (3.11+) and pip's access to PyPI; no helm binary, cluster or Docker engine.
# Everything it writes stays under ${TARGET_DIR:-target}/ (git-ignored): the virtualenv
# chart-venv/ with the pinned tools of requirements.txt, and chart-work/ (Helm's caches,
# chart copies), apart from pip's own download cache.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
target="${TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$repo/$target" ;; esac
venv="$target/chart-venv"
requirements="tests/chart/requirements.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"

if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "run.sh: creating $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --ignore-requires-python --requirement "$requirements"
    echo "$want" > "$stamp"
fi
py="$venv/bin/python"
export TARGET_DIR="$target"

status=0
"$py" tests/chart/check_dashboard.py helm/bulkops/dashboards/bulkops.json || status=1
echo
"$py" tests/chart/check_chart.py || status=1
echo
"$py" tests/chart/check_compose.py || status=1
echo
if [[ $status -eq 0 ]]; then
    echo "tests/chart: all checks passed"
else
    echo "tests/chart: FAILED"
fi
exit $status
