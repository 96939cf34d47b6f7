#!/usr/bin/env bash
# The benchmarks in one command: medallion against the tools users would pick instead, on the same data,
# in one run on this machine. `bench/run.sh --scale 10m` (see `bench/run.sh --help` and BENCHMARKS.md).
#
# Builds the release binary and the CSV->Parquet floor, installs the peers (bench/requirements.txt) into
# their own Python environment, then hands over to bench/harness.py.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medallion/target}"
profile="${MEDALLION_BENCH_PROFILE:-release}"

if [[ " $* " != *" --help "* && " $* " != *" -h "* ]]; then
    echo "building medallion and the floor ($profile profile)..." >&2
    cargo build --quiet --manifest-path "$root/Cargo.toml" --profile "$profile" \
        --bin medallion --example csv_to_parquet
fi
dir="$profile"
[[ "$profile" == "dev" ]] && dir="debug"

echo "installing the peers (bench/requirements.txt)..." >&2
python="$(MEDALLION_VENV="${MEDALLION_BENCH_VENV:-$HOME/.cache/medallion/bench-venv}" \
    bash "$root/.ci/setup-python.sh" "$root/bench/requirements.txt")"

exec "$python" "$root/bench/harness.py" \
    --medallion "$CARGO_TARGET_DIR/$dir/medallion" \
    --floor "$CARGO_TARGET_DIR/$dir/examples/csv_to_parquet" \
    "$@"
