#!/usr/bin/env bash
# Runs Schemathesis (from PyPI, pinned) against a live producer's OpenAPI document:
#   ST_RECORD_TYPE_ID=… ST_SAVED_SEARCH_ID=… ST_BATCH_ID=… \
#     bash tests/api/schemathesis.sh <base-url> <bearer-token>
# Checks: no 5xx, and every answer (status code, content type, headers, body) matches the
# document. The ids name a record type, saved search and batch of the token's agency: ids
# the document cannot know, put into most generated requests by tests/api/st_hooks.py
# (random ones the rest). Its warnings that the document and the API disagree
# (validation_mismatch: "mostly rejected generated data"; missing_test_data; missing_auth)
# fail the run. The virtualenv lives in ${TARGET_DIR:-target}/st-venv; the output is kept
# in schemathesis-last.log beside it.
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
config="$target/schemathesis.toml"
cat > "$config" <<TOML
[warnings]
fail-on = ["validation_mismatch", "missing_test_data", "missing_auth"]
TOML
set +e
PYTHONPATH="$repo/tests/api${PYTHONPATH:+:$PYTHONPATH}" SCHEMATHESIS_HOOKS=st_hooks \
"$venv/bin/schemathesis" --no-color --config-file "$config" run "$base/v1/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
  --phases examples,coverage,fuzzing \
  --max-examples "${ST_MAX_EXAMPLES:-40}" \
  --workers 2 \
  --seed 1 \
  --report ndjson --report-ndjson-path "$target/schemathesis-events.ndjson" 2>&1 | tee "$target/schemathesis-last.log"
status=${PIPESTATUS[0]}
set -e
python3 "$repo/tests/api/st_summary.py" "$target/schemathesis-events.ndjson" | tee -a "$target/schemathesis-last.log" || true
# A warning that fails the run says so in the summary; make sure of it whatever the exit code.
if grep -q "Schema validation mismatch" "$target/schemathesis-last.log"; then
  echo "schemathesis.sh: the validation_mismatch warning appeared" >&2
  exit 1
fi
exit "$status"
