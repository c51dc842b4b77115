#!/usr/bin/env bash
# Every benchmark (bench/*.py) in its seconds-long smoke mode, for CI: proves each script runs end
# to end and prints its table. No thresholds: CI machines are shared and noisy, so no figure here is
# a claim. The first script trains and exports a tiny bench repository once (bench/results/*-smoke,
# about 15 s); vgg16 is skipped in smoke mode (each script says so). A script without --smoke runs
# with --duration 0.5. Budget: under 4 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

# Not here: bench/peers.py installs Triton (PyTriton) into a venv of its own and takes about ten
# minutes; its figures and command are in docs/BENCHMARKS.md.
SKIP=" bench/peers.py "

started=$SECONDS
for script in bench/[!_]*.py; do
  if [[ "$SKIP" == *" $script "* ]]; then
    echo "== $script: not part of the smoke run"
    continue
  fi
  if "$PYTHON" "$script" --help | grep -q -- --smoke; then
    args=(--smoke)
  else
    args=(--duration 0.5)
  fi
  echo "== $script ${args[*]}"
  t=$SECONDS
  "$PYTHON" "$script" "${args[@]}"
  echo "-- $script: $((SECONDS - t))s"
done
echo "== benchmark smoke runs: $((SECONDS - started))s in all"
