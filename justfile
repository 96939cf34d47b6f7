# Everyday recipes. `just --list` shows them.

export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", env_var("HOME") + "/.cache/medallion/target")

# Run the reference pipeline on the committed sample into ./lake.
run:
    cargo run -- run pipelines/transactions.yaml

# Check the reference pipeline without touching data.
validate:
    cargo run -- validate pipelines/transactions.yaml

# Print the stage DAG (text, mermaid or dot).
plan format="text":
    cargo run -- plan --format {{format}} pipelines/transactions.yaml

# The whole test suite, as CI runs it.
test *args:
    bash .ci/test {{args}}

# Format, lints, tests and a pipeline run, exactly as CI.
ci:
    bash .ci/run

lint:
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings

# Regenerate the committed sample under data/landing (deterministic for the seed).
sample:
    rm -rf data/landing
    cargo run -- generate --out data/landing --transactions 15000 --days 60 --change-days 5 --seed 42

# Generate a large workload (the benchmarks: `bench/run.sh --scale 10m`).
generate out="/tmp/medallion-landing" n="1000000":
    cargo run --release -- generate --out {{out}} --transactions {{n}} --days 120

# Remove the local lake (tables written by `just run`).
clean-lake:
    rm -rf lake

# Benchmarks against Python deltalake, Polars, DuckDB and PySpark (see BENCHMARKS.md).
bench scale="1m" *args:
    bash bench/run.sh --scale {{scale}} {{args}}
