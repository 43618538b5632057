#!/usr/bin/env bash
# Generate training data and train PFJet-SSD on a lent GPU machine (16 cores + 1 GPU), in one call.
#
# This is how the GPU-trained checkpoints were made. The machine starts bare and has no network, so the
# generator's wheels for its Python (3.12: pythia8mc, awkward) travel in .whl/ (see docs/training.md).
# Models train side by side on the one GPU, identical but for one config key AXIS taking each of VALUES
# (default: model.activation, PReLU as the reference vs ReLU which ONNX Runtime fuses into Conv), so their
# validation AP can be compared at equal budget. The φ-padding comparison of issue 3:
#   AXIS=model.circular_phi VALUES="true false" scripts/device_train.sh
#
# Environment: OUT (results), N_TRAIN / N_VAL events per channel, MINUTES of training per model, BATCH,
# POOL (min-bias pool size), WORKERS (cores), AXIS, VALUES (ACTIVATIONS: the old name of VALUES), EXTRA (more
# `jetssd train` arguments, e.g. a TWN fine-tune: EXTRA='--set compress.twn=true --set run.init="models/fpn-relu-h200/best.pt"').
set -euo pipefail
OUT=${OUT:-out}
N_TRAIN=${N_TRAIN:-20000}
N_VAL=${N_VAL:-1000}
MINUTES=${MINUTES:-6}
WORKERS=${WORKERS:-16}
DATA=${DATA:-/tmp/jetssd-data}
AXIS=${AXIS:-model.activation}
VALUES=${VALUES:-${ACTIVATIONS:-"prelu relu"}}
BATCH=${BATCH:-64}
EXTRA=${EXTRA:-}
POOL=${POOL:-5000}

export PYTHONPATH=$PWD
if ! python3 -c 'import pythia8mc, awkward' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  # pip --target puts the wheel's data (Pythia's settings database) under /tmp/site/share.
  export PYTHIA8DATA=/tmp/site/share/Pythia8/xmldoc
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c 'import torch, numpy; print("torch", torch.__version__, "numpy", numpy.__version__, "cuda", torch.cuda.is_available())'

t0=$(date +%s)
python3 -m jetssd.cli generate --channels WW,ZZ,HH,tt,QCD --events "$N_TRAIN" --pileup 50 --seed 1001 \
  --format reference --no-baseline --workers "$WORKERS" --pool-size "$POOL" --out "$DATA/train" 2>&1 | tail -n 3
python3 -m jetssd.cli generate --channels WW,ZZ,HH,tt,QCD --events "$N_VAL" --pileup 50 --seed 2002 \
  --format reference --no-baseline --workers "$WORKERS" --pool-size "$POOL" --out "$DATA/val" 2>&1 | tail -n 3
echo "generation took $(( $(date +%s) - t0 )) s"

n_models=$(echo $VALUES | wc -w)
per_model_workers=$(( (WORKERS - 2) / n_models ))
if [ "$per_model_workers" -lt 1 ]; then per_model_workers=1; fi
for act in $VALUES; do
  case "$act" in true|false|[0-9]*) value=$act ;; *) value="\"$act\"" ;; esac  # JSON: strings quoted
  python3 -m jetssd.cli train \
    --set "data.train=[\"$DATA/train/*.h5\"]" --set "data.validation=[\"$DATA/val/*.h5\"]" \
    --set "data.workers=$per_model_workers" --set "$AXIS=$value" \
    --set optim.epochs=100 --set "optim.batch_size=$BATCH" --set optim.patience=100 \
    --set "run.time_limit_minutes=$MINUTES" --set "run.out=\"$OUT/$act\"" $EXTRA \
    > "$OUT/train-$act.log" 2>&1 &
done
wait
for act in $VALUES; do
  tail -n 4 "$OUT/train-$act.log"
  # best.pt, metrics.jsonl and loss.png come back (the tool returns at most 8 files; the config is in best.pt)
  rm -f "$OUT/$act/last.pt" "$OUT/$act/config.json"
done
echo "total $(( $(date +%s) - t0 )) s"
