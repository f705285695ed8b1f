#!/usr/bin/env bash
# Create a venv and install sae-vlm with its test extras.
# Keeps an existing torch (e.g. a user's CUDA build): the venv sees system site-packages when torch
# is importable there; otherwise installs the pinned CPU wheel this kind of machine keeps on local disk.
set -euo pipefail
venv=${1:-.venv}
py=${PY:-python3}
if [ ! -x "$venv/bin/python" ]; then
  if "$py" -c "import torch" 2>/dev/null; then
    "$py" -m venv --system-site-packages "$venv"
  else
    "$py" -m venv "$venv"
  fi
fi
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  # On a machine without torch: the CPU build lies on local disk here (no CUDA download).
  $pip install -q "torch==2.13.0"
fi
$pip install -q -e ".[test]"
echo "sae-vlm installed in $venv"
