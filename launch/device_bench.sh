#!/usr/bin/env bash
# The accelerator checks of issue 10 in one short call, on one GPU (or TPU) host, from the
# repository root; docs/benchmarks.md records what it printed on an H200.
#
#   launch/device_bench.sh [OUT_DIR]        (default: runs/device, or $OUT where it is set)
#
# 1. the machine's own ceilings (`bench ceiling`): an 8192^3 matmul in bfloat16 and float32,
#    each at JAX's default precision (TF32 for float32 on a GPU) and 'highest', median of 10;
# 2. `bench train` at the paper's setting (configs/paper.py), batch 16, float32 and bfloat16;
# 3. the `--max-len` sweep at batch 2 (peak memory per T, blockwise attention), up to T = 2,048;
# 4. time to quality: the ml-100k SASRec and HeterRec runs (configs/ml100k_sasrec.py,
#    configs/ml100k.py) from a prepared data/ml100k (skipped where it is absent);
# 5. `bench train` at the paper's batch of 128, float32 and bfloat16.
# Each `bench train` of 2. and 5. also writes a jax.profiler trace of two untimed steps under
# OUT_DIR/trace_bBATCH/run0 (float32) and run1 (bfloat16): where a GPU step's time goes.
# Each step has its own time limit and writes its JSON or log under OUT_DIR as it ends, so a call
# cut short still returns what finished. Where a folder .whl/ of wheels is here (packages the
# machine lacks, e.g. grain), they are installed into /tmp/site first.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # usage
case "${1:-}" in -h|--help) usage 0 ;; -*) echo "error: unknown flag $1 (see --help)" >&2; exit 2 ;; esac
OUT_DIR="${1:-${OUT:-runs/device}}"
mkdir -p "$OUT_DIR"
site=""
if compgen -G '.whl/*.whl' > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  site=":/tmp/site"
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD$site${PYTHONPATH:+:$PYTHONPATH}"
step() { echo "== $(date +%T) $*"; }
paper_bench() {  # bench train at configs/paper.py, batch $1, float32 and bfloat16
  step "bench train, paper, batch $1"
  timeout 120 python3 -m heterrec_jax.bench train --config configs/paper.py --steps 30 \
      --warmup 5 --dtypes float32,bfloat16 --trace "$OUT_DIR/trace_b$1" "train.batch_size=$1" \
      > "$OUT_DIR/paper_b$1.log" 2>&1
  grep -E '^train|^\|' "$OUT_DIR/paper_b$1.log"; tail -n 3 "$OUT_DIR/paper_b$1.log" | grep -i error
}

step versions
nvidia-smi -L 2>/dev/null
python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
            "optax", optax.__version__, jax.devices())' || exit 1

step ceilings
timeout 120 python3 -m heterrec_jax.bench ceiling --n "${CEILING_N:-8192}" --repeats 10 \
    --statistic median --dtypes bfloat16,float32 --precisions default,highest \
    > "$OUT_DIR/ceiling.log" 2>&1
grep -E 'TFLOP/s|^error' "$OUT_DIR/ceiling.log"; tail -n 1 "$OUT_DIR/ceiling.log" > "$OUT_DIR/ceiling.json"

paper_bench 16

step 'bench train --max-len sweep, batch 2'
timeout 240 python3 -m heterrec_jax.bench train --config configs/paper.py --steps 10 \
    --warmup 2 --max-len 128,256,512,1024,2048 train.batch_size=2 > "$OUT_DIR/max_len.log" 2>&1
grep -E '^\|' "$OUT_DIR/max_len.log"; tail -n 3 "$OUT_DIR/max_len.log" | grep -i error

if [[ -f data/ml100k/schema.json ]]; then
  for name in sasrec heterrec; do
    config="configs/ml100k_$name.py"; [[ "$name" == heterrec ]] && config=configs/ml100k.py
    step "time to quality: $config"
    start=$SECONDS
    timeout 150 python3 -m heterrec_jax.train --config "$config" --workdir "/tmp/runs/$name" \
        data.path=data/ml100k > "$OUT_DIR/train_$name.log" 2>&1
    echo "exit $?, wall $((SECONDS - start)) s"
    cp "/tmp/runs/$name/results.json" "$OUT_DIR/results_$name.json" 2>/dev/null
    tr '\r' '\n' < "$OUT_DIR/train_$name.log" | grep -v '^$' | tail -n 12
  done
fi
paper_bench 128
step done
