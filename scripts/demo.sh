#!/usr/bin/env bash
# make demo: seed a realistic demo agency into the bulkops_demo database, run a producer
# and two workers, bulk create Sales Records from a policy search, convert a few hundred
# of them (plus some stand-alone leads), show progress live, and stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release}
RUN=.demo
mkdir -p "$RUN"
export BULKOPS__DATABASE__URL=${DEMO_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/bulkops_demo}
export BULKOPS__AMQP__PREFIX=bulkops_demo
export BULKOPS__AMQP__EVENTS_EXCHANGE=crm.events
export BULKOPS__REDIS__PREFIX=bulkops_demo
export BULKOPS__AUTH__JWT_SECRET=${BULKOPS__AUTH__JWT_SECRET:-demo-secret-not-for-production}
export BULKOPS__HTTP__BIND=${DEMO_HTTP_BIND:-127.0.0.1:8080}
API="http://$BULKOPS__HTTP__BIND"
INDIVIDUALS=${INDIVIDUALS:-20000}

pids=()
cleanup() {
  for pid in "${pids[@]:-}"; do [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]:-}"; do [ -n "$pid" ] && wait "$pid" 2>/dev/null || true; done
  echo "Stopped the producer and workers (logs in $RUN/)."
}
trap cleanup EXIT

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

echo "== Seeding a demo agency ($INDIVIDUALS Individuals) into bulkops_demo"
"$BIN/bulkops" seed --reset --individuals "$INDIVIDUALS" > "$RUN/seed.json"
AGENCY=$(json 'd["agency_id"]' < "$RUN/seed.json")
ADMIN=$(json 'd["admin_user_id"]' < "$RUN/seed.json")
RECORD_TYPE=$(json 'd["record_type_id"]' < "$RUN/seed.json")
echo "   agency $AGENCY, acting user $ADMIN, record type $RECORD_TYPE, $(json 'd["already_linked"]' < "$RUN/seed.json") Individuals already hold a Sales Record"

echo "== Starting a producer on $API and two workers (metrics on :9091 and :9092)"
"$BIN/bulkops-producer" 2> "$RUN/producer.log" & pids+=($!)
BULKOPS__METRICS__BIND=127.0.0.1:9091 "$BIN/bulkops-worker" 2> "$RUN/worker-1.log" & pids+=($!)
BULKOPS__METRICS__BIND=127.0.0.1:9092 "$BIN/bulkops-worker" 2> "$RUN/worker-2.log" & pids+=($!)
for _ in $(seq 1 100); do
  curl -fs "$API/readyz" > /dev/null 2>&1 && break
  sleep 0.2
done
curl -fs "$API/readyz" > /dev/null || { echo "the producer is not ready; see $RUN/producer.log"; exit 1; }
TOKEN=$("$BIN/bulkops" token --user "$ADMIN")
auth=(-H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json")

FILTER='{"policy": {"coverage_type": ["Medicare Supplement", "Medicare Advantage"], "status": ["Active"]}}'
echo "== Preview of a bulk create for: $FILTER"
curl -fs "${auth[@]}" -X POST "$API/v1/bulk/sales-records/preview" \
  -d "{\"filter\": $FILTER, \"record_type_id\": $RECORD_TYPE}" | tee "$RUN/preview.json"; echo
TOTAL=$(json 'd["total"]' < "$RUN/preview.json")

echo "== Bulk create (expected_total $TOTAL)"
curl -fs "${auth[@]}" -X POST "$API/v1/bulk/sales-records" -H "Idempotency-Key: demo-create-$AGENCY" \
  -d "{\"filter\": $FILTER, \"record_type_id\": $RECORD_TYPE, \"expected_total\": $TOTAL}" | tee "$RUN/create.json"; echo
CREATE_BATCH=$(json 'd["batch_id"]' < "$RUN/create.json")
"$BIN/bulkops" batch watch "$CREATE_BATCH"

echo "== Giving 300 of the new Sales Records a lead's history, plus 25 stand-alone leads"
"$BIN/bulkops" seed-leads --agency "$AGENCY" --from-batch "$CREATE_BATCH" --count 300 --standalone 25 > "$RUN/leads.json"
echo "   $(json 'len(d)' < "$RUN/leads.json") Sales Records with notes, SOA notes, activities, attachments, prescriptions and sales policies (half in a lead-conversion status)"

echo "== Converting them to Individuals"
curl -fs "${auth[@]}" -X POST "$API/v1/bulk/conversions" -H "Idempotency-Key: demo-convert-$AGENCY" \
  -d "{\"sales_record_ids\": $(cat "$RUN/leads.json")}" | tee "$RUN/convert.json"; echo
CONVERT_BATCH=$(json 'd["batch_id"]' < "$RUN/convert.json")
"$BIN/bulkops" batch watch "$CONVERT_BATCH"

echo "== Outcome"
for b in "$CREATE_BATCH" "$CONVERT_BATCH"; do
  curl -fs "${auth[@]}" "$API/v1/batches/$b" | json '"batch %s %s: total %s, counts %s" % (d["id"], d["kind"], d["total"], d["counts"])'
done
echo "   failed or skipped items: $API/v1/batches/<id>/items?status=skipped (or bulkops batch items <id> --status failed)"
echo "== Metrics"
echo "   producer: $API/metrics   workers: http://127.0.0.1:9091/metrics http://127.0.0.1:9092/metrics"
echo "   outcomes counted by the workers (summed) and by the producer at acceptance:"
for url in "$API" http://127.0.0.1:9091 http://127.0.0.1:9092; do curl -fs "$url/metrics" || true; done \
  | awk '/^bulkops_items_(processed|settled_on_accept)_total/ { sum[$1] += $2 } END { for (k in sum) printf "   %s %d\n", k, sum[k] }' \
  | sort
