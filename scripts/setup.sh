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
floor=2.13  # pyproject's torch floor, the oldest tested (docs/platforms.md)
have=$("$venv/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
if "$venv/bin/python" -c "import sys; v = tuple(map(int, '$have'.split('.')[:2])); sys.exit(v >= (2, 6) and v < tuple(map(int, '$floor'.split('.'))))"; then
  $pip install -q -e ".[test]"
else  # keep the user's torch 2.6..2.12 (pip would pull a CUDA torch of several GB): every other requirement as usual
  echo "keeping your torch $have, below the tested floor $floor (untested; docs/platforms.md)"
  $pip install -q --no-deps -e .
  "$venv/bin/python" -c "
from importlib.metadata import requires
reqs = {r.split(';')[0].strip() for r in requires('sae-vlm')}
print('\n'.join(sorted(r for r in reqs if not r.startswith(('torch', 'sae-vlm')))))" > "$venv/.sae-vlm-deps.txt"
  $pip install -q -r "$venv/.sae-vlm-deps.txt"
fi
echo "sae-vlm installed in $venv"
