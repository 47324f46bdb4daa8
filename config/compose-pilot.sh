#!/usr/bin/env bash
# A composition pilot (docs/compose.md): a slice of OpenMoji objects, each drawn in many colours with one colour of
# each never trained; an adapter trained on it (config/compose-pilot.json + any train.py settings given), its learning
# curve scoring the held-out (object, colour) pairs: asked colour, object by shape, both. Resumable: run it again.
#     bash config/compose-pilot.sh NAME [--key=value ...]         # ~45 min on 2 CPU cores at the defaults
#     OBJECTS=40 RECOLOURS=11 HUE_BINS=12 bash config/compose-pilot.sh hue12     # colour tokens (vq.py hue_bins)
# Runs, data and shards go to $RUNS (default ~/.cache/mmmoe/runs/compose); the figures are the "pairs_*" entries of
# the run's state.json log, and samples.png in the run's directory shows what it drew.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: bash config/compose-pilot.sh NAME [--key=value ...]}
shift
runs=${RUNS:-$HOME/.cache/mmmoe/runs/compose}
objects=${OBJECTS:-40} recolours=${RECOLOURS:-11} hue=${HUE_BINS:-0}
mkdir -p "$runs"
data=$runs/openmoji-$objects-objects-$recolours-colours
[ -f "$data/captions.jsonl" ] || python data/openmoji/prepare.py --out "$data" --recolours "$recolours" --objects "$objects"
vq=demo/vq16k
if [ "$hue" != 0 ]; then  # demo/vq16k's encoder and codes, its decoder fine-tuned on emoji turned to the first hue bin
  vq=$runs/vq16k-hue$hue
  [ -f "$runs/openmoji/captions.jsonl" ] || python data/openmoji/prepare.py --out "$runs/openmoji"
  python vq.py train --data "$runs/openmoji" --out "$vq" --decoder-of demo/vq16k --hue-bins "$hue" --steps 500 \
    --lr 5e-4 --warmup 20 --chroma-loss 5 --eval-every 250 --resume      # a finished run only loads and exits
fi
shards=$runs/shards-$objects-$recolours-$(basename "$vq")
python vq.py shards --vq "$vq" --data "$data" --out "$shards"
python train.py config/compose-pilot.json --shards="$shards" --out_dir="$runs/$name" --resume "$@"
python analyze.py --ckpt "$runs/$name" --curve "$runs/$name/curve.png"   # the curve, and its points as a table
