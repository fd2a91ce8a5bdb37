#!/usr/bin/env bash
# The test suite once per Keras backend, then the core tests (parity, save/load,
# routes, the house rules) against the oldest Keras pyproject.toml allows.
# Usage: bash tests/run_all_backends.sh [pytest args]
set -euo pipefail
for backend in tensorflow jax torch; do
    echo "=== KERAS_BACKEND=$backend"
    KERAS_BACKEND=$backend python -m pytest -q -p no:cacheprovider "$@"
done

oldest=$(python -c "import re; print(re.search(r'\"keras>=([0-9.]+)\"', open('pyproject.toml').read()).group(1))")
target="${TMPDIR:-/tmp}/keras-oldest-$oldest"
python -m pip install -q --no-deps --target "$target" "keras==$oldest"
echo "=== keras $oldest (oldest allowed), KERAS_BACKEND=torch"
PYTHONPATH="$target" KERAS_BACKEND=torch python -m pytest -q -p no:cacheprovider \
    tests/test_structure.py tests/test_parity.py tests/test_saving.py tests/test_routes.py "$@"
