#!/usr/bin/env bash
# The GW-init comparison (docs/gw.md): the demo's recipe, 200 steps of 8 sequences,
# for gw / random / mean at the paper's full scale and gw at a quarter of it, 3 seeds each (12 runs), then the table
# and PNG. Resumable: rerun it and every run continues from its last checkpoint (a finished one only loads and exits).
#     bash config/compare-init.sh [RUNS_DIR]        # default ~/.cache/mmmoe/runs/init; ~7 min a run on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-$HOME/.cache/mmmoe/runs/init}
mkdir -p "$runs"
t0=$(date +%s)
for arm in "gw 1" "random 1" "mean 1" "gw 0.25"; do
  set -- $arm
  for seed in 0 1 2; do
    name=$1-x$2-seed$seed
    python train.py config/cpu-demo.json --init=$1 --init_scale=$2 --seed=$seed --steps=200 --eval_every=20 \
        --curve_every=0 --save_every=50 --log_every=1 --out_dir="$runs/$name" --resume 2>> "$runs/$name.log"
    echo "$name done, $(( $(date +%s) - t0 )) s so far"
  done
done
python analyze.py --compare "$runs"/*/ --out docs --target 5.0
