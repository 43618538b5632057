#!/usr/bin/env bash
# Continue training the shipped FPN on fresh events and derive its TWN, on a lent GPU machine, in one call.
#
# Stages: generate new training events (another seed than the shipped model's data, so every step sees
# events it has not seen), fine-tune the FPN from INIT (by default onto this config's anchor layout:
# run.init_anchors="config"), then TWN quantization-aware fine-tuning from the new FPN's best checkpoint.
# Returns fpn/relu/{best.pt,metrics.jsonl,loss.png} and twn/relu/… under OUT (8 files at most come back).
#
# Environment: OUT, INIT (checkpoint), N_TRAIN / N_VAL events per channel, SEED (training data),
# FPN_MINUTES, TWN_MINUTES, BATCH, FPN_LR, TWN_LR, WORKERS, POOL.
set -euo pipefail
OUT=${OUT:-out}
INIT=${INIT:-models/fpn-relu-h200/best.pt}
N_TRAIN=${N_TRAIN:-20000}
N_VAL=${N_VAL:-1000}
SEED=${SEED:-1101}
FPN_MINUTES=${FPN_MINUTES:-4}
TWN_MINUTES=${TWN_MINUTES:-1.5}
BATCH=${BATCH:-64}
FPN_LR=${FPN_LR:-1e-3}
TWN_LR=${TWN_LR:-5e-4}
WORKERS=${WORKERS:-16}
POOL=${POOL:-5000}
DATA=${DATA:-/tmp/jetssd-data}

export PYTHONPATH=$PWD
if ! python3 -c 'import pythia8mc, awkward' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  export PYTHIA8DATA=/tmp/site/share/Pythia8/xmldoc  # pip --target puts Pythia's xmldoc under share/
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT/fpn" "$OUT/twn"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

t0=$(date +%s)
python3 -m jetssd.cli generate --channels WW,ZZ,HH,tt,QCD --events "$N_TRAIN" --pileup 50 --seed "$SEED" \
  --format reference --no-baseline --workers "$WORKERS" --pool-size "$POOL" --out "$DATA/train" 2>&1 | tail -n 2
python3 -m jetssd.cli generate --channels WW,ZZ,HH,tt,QCD --events "$N_VAL" --pileup 50 --seed 2002 \
  --format reference --no-baseline --workers "$WORKERS" --pool-size "$POOL" --out "$DATA/val" 2>&1 | tail -n 2
echo "generation took $(( $(date +%s) - t0 )) s"

common=(--set "data.train=[\"$DATA/train/*.h5\"]" --set "data.validation=[\"$DATA/val/*.h5\"]"
        --set "data.workers=$(( WORKERS - 2 ))" --set optim.epochs=100 --set "optim.batch_size=$BATCH"
        --set optim.patience=100)
python3 -m jetssd.cli train "${common[@]}" --set "optim.lr=$FPN_LR" --set optim.warmup_steps=100 \
  --set "run.init=\"$INIT\"" --set 'run.init_anchors="config"' \
  --set "run.time_limit_minutes=$FPN_MINUTES" --set "run.out=\"$OUT/fpn/relu\"" > "$OUT/fpn/train.log" 2>&1
tail -n 3 "$OUT/fpn/train.log"
echo "fpn done at $(( $(date +%s) - t0 )) s"
python3 -m jetssd.cli train "${common[@]}" --set "optim.lr=$TWN_LR" --set optim.warmup_steps=50 \
  --set compress.twn=true --set "run.init=\"$OUT/fpn/relu/best.pt\"" \
  --set "run.time_limit_minutes=$TWN_MINUTES" --set "run.out=\"$OUT/twn/relu\"" > "$OUT/twn/train.log" 2>&1
tail -n 3 "$OUT/twn/train.log"
rm -f "$OUT"/*/relu/last.pt "$OUT"/*/relu/config.json
echo "total $(( $(date +%s) - t0 )) s"
