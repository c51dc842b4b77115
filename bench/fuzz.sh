#!/usr/bin/env bash
# The fuzz tests (tests/test_fuzz.py) with many more examples than the suite's 150 per property:
# random bytes as messages, mutated valid messages, broken images with arbitrary Unicode texts,
# control characters, random V2 tensors, non-finite features. Each property must never crash the
# server nor answer INTERNAL/UNKNOWN; the server must be healthy afterwards.
#
#   bash bench/fuzz.sh [EXAMPLES]        # default 5000 per property (about 5 minutes on 2 cores)
#
# Prints "fuzz: N inputs tried". Hypothesis is derandomised, so a run is reproducible.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
FUSIONSERVE_FUZZ_EXAMPLES=${1:-5000} exec "$PYTHON" -m pytest tests/test_fuzz.py -s -q -p no:cacheprovider
