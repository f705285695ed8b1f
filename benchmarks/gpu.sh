#!/usr/bin/env bash
# Training throughput on one GPU, ours vs the peers, in under 5 minutes on an H100:
#   d_in=1024, k=20, batch 4096, widths x8 and x64; ours in bf16 (BatchTopK, Matryoshka, TopK) against
#   dictionary_learning 0.1.0 BatchTopK / Matryoshka (the paper's trainer) and sparsify 1.3.3 TopK, with ratios;
#   then the monosemanticity-score timing at the paper scale (benchmarks/ms_speed.py --gpu).
#
# Needs only torch, transformers and triton: our package comes from src/ via PYTHONPATH, and the peers from
# benchmarks/.peers, which must already exist (nothing is pip-installed here). Create it where pip works:
#   pip install --no-deps --target benchmarks/.peers dictionary-learning==0.1.0 eai-sparsify==1.3.3 einops
#
# Overrides (for a CPU dry run of the script's logic), e.g.:
#   DEVICE=cpu WIDTHS=1 D_IN=64 K=4 BATCH=256 STEPS=2 WARMUP=1 bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
WIDTHS=${WIDTHS:-8,64}
D_IN=${D_IN:-1024}
K=${K:-20}
BATCH=${BATCH:-4096}
STEPS=${STEPS:-50}
WARMUP=${WARMUP:-5}
ARCHS=${ARCHS:-batchtopk,matryoshka,topk}
MS_TIMEOUT=${MS_TIMEOUT:-120}  # seconds allowed for ms_speed.py, so the whole script stays under 5 minutes
PY=${PYTHON:-python}

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export SAE_VLM_NO_PIP=1  # benchmarks/peers.py must not reach for pip on the GPU box

PEERS=benchmarks/.peers
if [[ ! -d $PEERS/dictionary_learning || ! -d $PEERS/sparsify || ! -d $PEERS/einops ]]; then
    echo "error: $PEERS is missing or incomplete; create it where pip works with" >&2
    echo "  pip install --no-deps --target $PEERS dictionary-learning==0.1.0 eai-sparsify==1.3.3 einops" >&2
    echo "and carry that folder to this machine (it is git-ignored)" >&2
    exit 2
fi
if [[ $DEVICE == cuda* ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: DEVICE=$DEVICE but torch sees no CUDA device; set DEVICE=cpu for a dry run" >&2
    exit 2
fi

start=$SECONDS
echo "== training throughput: ours (bf16) vs dictionary_learning and sparsify =="
"$PY" benchmarks/train_throughput.py --device "$DEVICE" --archs "$ARCHS" --widths "$WIDTHS" --d-in "$D_IN" --k "$K" \
    --batch-size "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --bf16 --vs dictionary-learning,sparsify
echo "(training benchmark: $((SECONDS - start)) s)"

if [[ -f benchmarks/ms_speed.py ]]; then
    echo "== monosemanticity score timing =="
    if [[ $DEVICE == cuda* ]]; then
        timeout "$MS_TIMEOUT" "$PY" -u benchmarks/ms_speed.py --gpu --skip-cpu \
            || echo "ms_speed.py stopped (exit $?; over ${MS_TIMEOUT}s or failed); rerun it alone for its figures"
    else
        echo "skipped: ms_speed.py --gpu needs CUDA (DEVICE=$DEVICE)"
    fi
fi
echo "total: $((SECONDS - start)) s"
