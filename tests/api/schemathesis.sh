#!/usr/bin/env bash
# Runs Schemathesis (from PyPI, pinned) against a live producer's OpenAPI document:
#   bash tests/api/schemathesis.sh <base-url> <bearer-token>
# Checks: no 5xx, and every answer (status code, content type, headers, body) matches the
# document. The virtualenv lives in ${TARGET_DIR:-target}/st-venv.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
base=$1
token=$2
target="${TARGET_DIR:-$repo/target}"
venv="$target/st-venv"
version=4.32.5
if [[ ! -x "$venv/bin/schemathesis" ]] || ! "$venv/bin/schemathesis" --version | grep -q "$version"; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
fi
cd "$target"
exec "$venv/bin/schemathesis" --no-color run "$base/v1/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
  --phases examples,coverage,fuzzing \
  --max-examples "${ST_MAX_EXAMPLES:-40}" \
  --workers 2 \
  --seed 1
