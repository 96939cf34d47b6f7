#!/usr/bin/env bash
# Runs the reference pipeline for yesterday's logical date. JSON logs go to a file per day, the run report
# to the cron log; the exit code is medallion's (0 ok, 1 stage/check failed, 2 invalid, 3 runtime, 4 locked).
set -euo pipefail
cd "${MEDALLION_PROJECT:-/opt/medallion}"
day="$(date -u -d yesterday +%F)"
logs="${MEDALLION_LOGS:-/var/log/medallion}"
mkdir -p "$logs"
# Wait up to 10 minutes for a run still going (a slow previous day), then give up with exit code 4.
exec "${MEDALLION_BIN:-medallion}" run pipelines/transactions.yaml --date "$day" --lock-timeout 600 \
    --output text --log-format json 2>>"$logs/medallion-$day.jsonl"
