#!/usr/bin/env bash
# The whole benchmark suite on one CUDA machine, in under 8.5 minutes, fetching nothing from the network.
# (Each step is capped; the worst case with the defaults is 8.25 minutes, inside one 10-minute device call.)
#
#   benchmarks/gpu.sh [OUT]          # OUT defaults to benchmarks/results/gpu-<date>
#
# Writes everything under OUT: attention.json/.png/.txt (kernel grid: TFLOP/s, % of the measured matmul peak and
# of the H100/H200 datasheet peak, with the FlashAttention-2/3 reference figures in the header), models.json/.txt
# (polymodal vs transformers, bf16 and fp32 × eager and compiled, GFLOP/s and % of peak, greedy generation against
# generate's dynamic and static caches), generate.json/.txt (GENERATE=1: the small KV-cache sampling script),
# scaling.json/.txt (data-parallel training at 2, 4 … processes, one per GPU, when 2 or more are visible),
# nvidia-smi.txt, pip-freeze.txt, log.txt.
#
# Environment:
#   PYTHON=python3            the interpreter (default: python)
#   XFORMERS_WHEEL=path.whl   a carried xformers wheel, installed with --no-index --no-deps (or put one
#                             at benchmarks/wheels/xformers-*.whl); without one the xformers rows say why
#   BASELINE_ATTENTION=a.json / BASELINE_MODELS=m.json   earlier reports to --compare against
#   DEVICE=cuda:1             another GPU (DEVICE=cpu with ATTENTION_ARGS=--quick MODELS_ARGS=--quick: a dry run
#                             of this script on a machine without one)
#   ATTENTION_ARGS=... MODELS_ARGS=...                   extra options for the two suites
#   ATTENTION_BUDGET_S=150 MODELS_BUDGET_S=180           time caps; rows left over are "skipped" with the reason
#   MODELS_ARGS default: --models gpt2,vit-b16,imagegpt-s,clip-b16,vit-s16-train --dtypes bfloat16,float32
#                        --modes eager,compiled --batches 32 --gen-batches 1,4 (generation first: what the budget
#                        reaches; MODELS_ARGS= with nothing runs the suite's own CUDA defaults: batches 1 and 32)
#   GENERATE=1                                           also run benchmarks/generate.py (≤ 45 s)
#   SCALING=0 / SCALING_ARGS=... / SCALING_BUDGET_S=120  skip, or pass options to, the training-scaling step
#
# Each step has its own time cap (a timed-out step is logged and the next one still runs):
# setup ≤ 45 s, attention ≤ ATTENTION_BUDGET_S + 60 s, models ≤ MODELS_BUDGET_S + 60 s:
# 8.25 minutes at worst with the defaults on one GPU (generate and scaling add ≤ 45 s and ≤ 120 s when enabled).
# The full CUDA attention grid (1,700 rows, about 1 s each on an H200) does not fit a device lease: unless
# ATTENTION_ARGS is set, the run measures bf16, head dim 128, forward and forward+backward on nine shapes
# that cover each family (ViT, LM, cross, DALL·E sparse, varlen) — 144 rows, about 150 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
ATTENTION_BUDGET_S=${ATTENTION_BUDGET_S:-150}
MODELS_BUDGET_S=${MODELS_BUDGET_S:-180}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONUNBUFFERED=1
START=$(date +%s)
log() { echo "[$(($(date +%s) - START)) s] $*" | tee -a "$OUT/log.txt"; }

# -- setup: the GPU, polymodal from this checkout, an optional carried xformers wheel -----------------
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed (see nvidia-smi.txt)"
if [ "$DEVICE" != cpu ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  log "error: torch sees no CUDA device; nothing to run"; exit 1
fi
here=$(pwd)
if ! $PY -c "import polymodal, pathlib, sys; sys.exit(0 if pathlib.Path(polymodal.__file__).resolve().parent == pathlib.Path('$here/core').resolve() else 1)" 2>/dev/null; then
  log "installing this checkout (editable, offline, no dependencies)"
  timeout 45 $PY -m pip install --no-index --no-deps --no-build-isolation -e . >> "$OUT/log.txt" 2>&1 \
    || { log "error: could not install polymodal from $here offline"; exit 1; }
fi
wheel=${XFORMERS_WHEEL:-$(ls benchmarks/wheels/xformers-*.whl 2>/dev/null | head -n 1)}
if [ -n "$wheel" ]; then
  log "installing the carried xformers wheel $wheel"
  timeout 30 $PY -m pip install --no-index --no-deps "$wheel" >> "$OUT/log.txt" 2>&1 || log "xformers wheel failed to install"
fi
$PY -m pip freeze > "$OUT/pip-freeze.txt" 2>/dev/null || true
log "setup done: $($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")')"

# -- 1. attention kernels: the full grid, bf16 and fp32, forward and forward+backward -----------------
compare_a=${BASELINE_ATTENTION:+--compare $BASELINE_ATTENTION}
ATTENTION_ARGS=${ATTENTION_ARGS---dtypes bfloat16 --head-dims 128 --cases vit-197,vit-577,lm-1024,lm-4096,lm-8192,cross-64x4096,image-row-1280,varlen-packed,varlen-causal-packed}
log "attention: polymodal bench attention --device $DEVICE --budget-s $ATTENTION_BUDGET_S ${ATTENTION_ARGS:-}"
# shellcheck disable=SC2086  # the optional arguments are meant to split
timeout $((ATTENTION_BUDGET_S + 60)) $PY -m polymodal.cli bench attention --device "$DEVICE" --budget-s "$ATTENTION_BUDGET_S" \
  --out "$OUT/attention.json" --plot "$OUT/attention.png" $compare_a ${ATTENTION_ARGS:-} > "$OUT/attention.txt" 2> "$OUT/attention.log"
log "attention exit status $?"

# -- 2. models against transformers: bf16 and fp32, eager and compiled (train step: eager, bf16 autocast) --
compare_m=${BASELINE_MODELS:+--compare $BASELINE_MODELS}
MODELS_ARGS=${MODELS_ARGS---models gpt2,vit-b16,imagegpt-s,clip-b16,vit-s16-train --dtypes bfloat16,float32 --modes eager,compiled --batches 32 --gen-batches 1,4}
log "models: polymodal bench models --device $DEVICE --budget-s $MODELS_BUDGET_S ${MODELS_ARGS:-}"
# shellcheck disable=SC2086
timeout $((MODELS_BUDGET_S + 60)) $PY -m polymodal.cli bench models --device "$DEVICE" --budget-s "$MODELS_BUDGET_S" \
  --out "$OUT/models.json" $compare_m ${MODELS_ARGS:-} > "$OUT/models.txt" 2> "$OUT/models.log"
log "models exit status $?"

# -- 3. the small KV-cache sampling script (GENERATE=1; the generation rows now live in the models suite) ---
if [ "${GENERATE:-0}" = 1 ] && [ -f benchmarks/generate.py ]; then
  log "generate: python benchmarks/generate.py --device $DEVICE"
  timeout 45 $PY benchmarks/generate.py --device "$DEVICE" --out "$OUT/generate.json" > "$OUT/generate.txt" 2>&1
  log "generate exit status $?"
fi
# -- 4. data-parallel training scaling: 1, 2, 4 … processes, one GPU each (all the GPUs visible) ---------
ngpu=0
[ "$DEVICE" != cpu ] && ngpu=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -ge 2 ] && [ "${SCALING:-1}" != 0 ]; then
  procs=$($PY -c "n=$ngpu; print(','.join(str(w) for w in (1, 2, 4, 8, 16) if w <= n))")
  log "scaling: polymodal bench scaling --device cuda --procs $procs ${SCALING_ARGS:-} ($ngpu GPU(s) visible)"
  # shellcheck disable=SC2086
  timeout "${SCALING_BUDGET_S:-120}" $PY -m polymodal.cli bench scaling --device cuda --procs "$procs" \
    --out "$OUT/scaling.json" ${SCALING_ARGS:-} > "$OUT/scaling.txt" 2> "$OUT/scaling.log"
  log "scaling exit status $?"
fi

log "done in $(($(date +%s) - START)) s; results under $OUT"
