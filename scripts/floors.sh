#!/usr/bin/env bash
# The oldest versions pyproject.toml claims, tested: installs the floors of torch, transformers and numpy into a
# scratch venv and runs a smoke subset of the tests on the toy world: extract, train, evaluate, steer, and the
# platform fallbacks. Not part of `make test` (the install alone takes minutes). Record the result in
# docs/platforms.md with the date.
#   bash scripts/floors.sh            # the floors below, venv in a temp folder, removed at the end
#   TORCH=2.14.1 bash scripts/floors.sh
# The torch floor is the oldest CPU wheel this kind of machine can install, and Python the only interpreter it has
# (docs/platforms.md says why).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
TORCH=${TORCH:-2.13.0}
TRANSFORMERS=${TRANSFORMERS:-5.18.0}
NUMPY=${NUMPY:-1.24.0}
SMOKE=(
  tests/test_platforms.py
  tests/test_toyworld.py
  "tests/test_extract_store.py::test_cli_store_matches_direct_capture"
  "tests/test_train.py::test_streamed_and_in_memory_batches_agree"
  "tests/test_train.py::test_same_seed_same_weights_other_seed_differs"
  "tests/test_eval_cli.py::test_evaluate_npy"
  "tests/test_eval_cli.py::test_evaluate_store_with_embedder_and_folder_taxonomy"
  "tests/test_steer.py::test_cli_steer_and_steer_score"
  "tests/test_steer.py::test_steering_score_end_to_end"
)

venv=$(mktemp -d "${TMPDIR:-/tmp}/sae-vlm-floors.XXXXXX")
trap 'rm -rf "$venv"' EXIT
"$PY" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)
"${pip[@]}" "torch==$TORCH"
# the floors pinned, everything else the newest that pip finds compatible with them
"${pip[@]}" "numpy==$NUMPY" "transformers==$TRANSFORMERS" -e ".[images,eval,stability]" "pytest>=8"
"$venv/bin/python" - <<'EOF'
import sys, numpy, torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"numpy {numpy.__version__}")
EOF
OMP_NUM_THREADS=1 PYTHONPATH="$PWD/src" "$venv/bin/python" -m pytest -q -p no:cacheprovider "${SMOKE[@]}"
