#!/usr/bin/env bash
# Not part of CI (several minutes of downloads): install exactly the floors of requirements.txt
# (each `>=` read as `==`, jaxlib pinned with jax) in a fresh venv and run the tests that
# exercise each dependency. Usage: bash .ci/floors.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-/tmp/dyrep_floors_venv}"
floors="$(mktemp)"
grep -E '^[A-Za-z0-9_.-]+>=' requirements.txt | sed 's/>=/==/' > "$floors"
sed -n 's/^jax==/jaxlib==/p' "$floors" >> "$floors"
python -m venv "$venv"
"$venv/bin/pip" install -c "$floors" ".[dev]"
"$venv/bin/python" -m pytest -n 0 -p no:cacheprovider tests/test_optim.py tests/test_configs.py \
  tests/test_checkpoint.py tests/test_data.py tests/test_controller.py tests/test_train.py
