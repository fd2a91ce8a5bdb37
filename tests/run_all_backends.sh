#!/usr/bin/env bash
# The test suite once per Keras backend. Usage: bash tests/run_all_backends.sh [pytest args]
set -euo pipefail
for backend in tensorflow jax torch; do
    echo "=== KERAS_BACKEND=$backend"
    KERAS_BACKEND=$backend python -m pytest -q -p no:cacheprovider "$@"
done
