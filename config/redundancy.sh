#!/usr/bin/env bash
# Does the MoE's redundancy help a new modality, at an equal budget? (the paper's title claim; docs/redundancy.md)
# One variant of the same base function, trained on one slice of OpenMoji where capacity binds (160 objects in 11
# colours each, colour tokens: demo/vq), with its learning curve (training emoji, held-out pairs) and, for an MoE,
# its routing report, in its run:
#     moe            8 copied experts, top-2, routed PLoRA (rank 4 each) and a LoRA on the router: the recipe
#     frozen-router  the same, the router frozen (no routing can specialise)
#     dense          one expert (the dense model itself), its update of rank 32: the budget of 8 x 4
#     moe4, moe2     4 or 2 copied experts, top-2, updates of rank 8 or 16
# Every variant has attention LoRA of rank 4 and the same image rows; the trainable parameters are printed at start.
#     bash config/redundancy.sh VARIANT SEED [--key=value ...]      # ~25 min on 2 CPU cores with AMX; resumable
# Runs go to $RUNS (default ~/.cache/mmmoe/runs/redundancy)/VARIANT-sSEED. The table and curves of all of them:
#     python analyze.py --variants ~/.cache/mmmoe/runs/redundancy/*-s[0-9]* --out DIR     # redundancy.md, .png
set -euo pipefail
cd "$(dirname "$0")/.."
variant=${1:?usage: bash config/redundancy.sh moe|frozen-router|dense|moe4|moe2 SEED [--key=value ...]}
seed=${2:?usage: bash config/redundancy.sh VARIANT SEED [--key=value ...]}
shift 2
case $variant in
  moe) experts=8 top_k=2 set=(--expert_rank=4) ;;
  frozen-router) experts=8 top_k=2 set=(--expert_rank=4 --router=false) ;;
  dense) experts=1 top_k=1 set=(--expert_rank=32 --router=false) ;;
  moe4) experts=4 top_k=2 set=(--expert_rank=8) ;;
  moe2) experts=2 top_k=2 set=(--expert_rank=16) ;;
  *) echo "error: unknown variant $variant (moe, frozen-router, dense, moe4 or moe2)" >&2; exit 1 ;;
esac
runs=${RUNS:-$HOME/.cache/mmmoe/runs/redundancy}
mkdir -p "$runs"
base=$(python -c "import upcycle; print(upcycle.builtin_base($experts, $top_k))")   # built once, then cached
data=$runs/openmoji-160-objects
[ -f "$data/captions.jsonl" ] || python data/openmoji/prepare.py --out "$data" --recolours 11 --objects 160
python vq.py shards --vq demo/vq --data "$data" --out "$runs/shards-160"
python train.py config/redundancy.json --base="$base" --shards="$runs/shards-160" --out_dir="$runs/$variant-s$seed" \
    --seed="$seed" "${set[@]}" --resume "$@"
python analyze.py --ckpt "$runs/$variant-s$seed" --curve "$runs/$variant-s$seed/curve.png"
# the MoE variants' specialisation: image-leaning experts and expert CKA, before and after (report.md; no drawing)
[ "$experts" = 1 ] || python analyze.py --ckpt "$runs/$variant-s$seed" --out "$runs/$variant-s$seed/report"
