#!/usr/bin/env bash
# Run the benchmark suite (training step, inference, conversion) and save the JSON beside this
# script; the printed markdown tables are what benchmarks/RESULTS.md quotes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m acnet bench --out benchmarks/results.json "$@"
