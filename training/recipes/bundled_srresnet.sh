#!/usr/bin/env bash
# The recipe of the bundled SRResNet x4 models (issue 3): full precision, then, from it, four
# quantization-aware runs side by side: DDTB-8, DDTB-4, DDTB-RefQSR 8-4 and the Table V
# "w/o RefER" ablation (query path's last two blocks at 8 bits instead of RefER).
#
#   training/recipes/bundled_srresnet.sh fp      # stage 1
#   training/recipes/bundled_srresnet.sh quant   # stage 2 (needs $RUNS/fp/best.pt or $TEACHER)
#   training/recipes/bundled_srresnet.sh all
#
# Every run is resumable: run the same stage again and it continues from its last.pt. The
# *_TIME variables cap one session's training (seconds, for leases of fixed length); the step
# counts and the halving schedule are what a run converges to when given the time.
# Then: python -m refqsr_engine.training.bundle RUN/best.pt NAME --val DATA/val
set -euo pipefail

DATA=${DATA:-data/sr}                 # python -m refqsr_engine.training.prepare --out data/sr
RUNS=${RUNS:-runs/bundled}
DEVICE=${DEVICE:-cuda}
AMP=${AMP:-bf16}
WORKERS=${WORKERS:-6}
CLUST=${CLUST:-core/data/clustblock/textures47.pt}
FP_STEPS=${FP_STEPS:-60000}
FP_HALVE=${FP_HALVE:-8000}
FP_TIME=${FP_TIME:-}
Q_STEPS=${Q_STEPS:-20000}
Q_HALVE=${Q_HALVE:-4000}
Q_TIME=${Q_TIME:-}
VAL_EVERY=${VAL_EVERY:-1000}
Q_VAL_EVERY=${Q_VAL_EVERY:-250}
PY=${PYTHON:-python}

limit() { [ -n "$1" ] && echo "--time-limit $1" || true; }
common="--data $DATA --device $DEVICE --amp $AMP --workers $WORKERS --quiet"

fp() {
    $PY -m refqsr_engine.training.train_fp $common --out "$RUNS/fp" --steps "$FP_STEPS" \
        --halve-every "$FP_HALVE" --val-every "$VAL_EVERY" --ckpt-every 500 $(limit "$FP_TIME")
}

quant() {
    local teacher=${TEACHER:-$RUNS/fp/best.pt}
    local q="$common --teacher $teacher --steps $Q_STEPS --halve-every $Q_HALVE --val-every $Q_VAL_EVERY --ckpt-every 250 $(limit "$Q_TIME")"
    local pids=()
    $PY -m refqsr_engine.training.train_qat qat $q --out "$RUNS/ddtb8" --scheme ddtb --bits 8 > "$RUNS/ddtb8.out" 2>&1 & pids+=($!)
    $PY -m refqsr_engine.training.train_qat qat $q --out "$RUNS/ddtb4" --scheme ddtb --bits 4 > "$RUNS/ddtb4.out" 2>&1 & pids+=($!)
    $PY -m refqsr_engine.training.train_qat refqsr $q --out "$RUNS/refqsr84" --scheme ddtb --bits 8-4 \
        --clustblock "$CLUST" > "$RUNS/refqsr84.out" 2>&1 & pids+=($!)
    $PY -m refqsr_engine.training.train_qat refqsr $q --out "$RUNS/norefer84" --scheme ddtb --bits 8-4 \
        --clustblock "$CLUST" --tail highbit > "$RUNS/norefer84.out" 2>&1 & pids+=($!)
    local failed=0
    for p in "${pids[@]}"; do wait "$p" || failed=1; done
    for f in ddtb8 ddtb4 refqsr84 norefer84; do echo "== $f"; tail -n 3 "$RUNS/$f.out"; done
    return $failed
}

mkdir -p "$RUNS"
case "${1:-all}" in
    fp) fp ;;
    quant) quant ;;
    all) fp && quant ;;
    *) echo "usage: $0 fp|quant|all" >&2; exit 2 ;;
esac
