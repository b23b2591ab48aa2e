#!/usr/bin/env bash
# The recipe of the bundled x4 models of one architecture (ARCH: srresnet, carn, elan_light):
# full precision, then, from it, quantization-aware runs side by side: DDTB-8, DDTB-4,
# DDTB-RefQSR 8-4 and (ABLATION=1) the Table V "w/o RefER" ablation (the query path's last blocks
# at 8 bits instead of RefER). QUANT_RUNS picks a subset, e.g. QUANT_RUNS="ddtb8 refqsr84".
#
#   ARCH=carn training/recipes/bundled.sh fp      # stage 1
#   ARCH=carn training/recipes/bundled.sh quant   # stage 2 (needs $RUNS/fp/best.pt or $TEACHER)
#   ARCH=carn training/recipes/bundled.sh all
#
# Every run is resumable: run the same stage again and it continues from its last.pt. The
# *_TIME variables cap one session's training (seconds, for leases of fixed length); the step
# counts and the halving schedule are what a run converges to when given the time.
# Then: python -m refqsr_engine.training.bundle RUN/best.pt NAME --val DATA/val
set -euo pipefail

ARCH=${ARCH:-srresnet}
DATA=${DATA:-data/sr}                 # python -m refqsr_engine.training.prepare --out data/sr
RUNS=${RUNS:-runs/bundled/$ARCH}
DEVICE=${DEVICE:-cuda}
AMP=${AMP:-bf16}
WORKERS=${WORKERS:-6}
CLUST=${CLUST:-core/data/clustblock/textures47.pt}
FP_STEPS=${FP_STEPS:-60000}
FP_HALVE=${FP_HALVE:-8000}
FP_TIME=${FP_TIME:-}
FP_LR=${FP_LR:-1e-4}
Q_STEPS=${Q_STEPS:-20000}
Q_HALVE=${Q_HALVE:-4000}
Q_TIME=${Q_TIME:-}
VAL_EVERY=${VAL_EVERY:-1000}
Q_VAL_EVERY=${Q_VAL_EVERY:-250}
BATCH=${BATCH:-16}
ABLATION=${ABLATION:-1}
QUANT_RUNS=${QUANT_RUNS:-ddtb8 ddtb4 refqsr84$( [ "$ABLATION" = 1 ] && echo " norefer84")}
PY=${PYTHON:-python}

limit() { [ -n "$1" ] && echo "--time-limit $1" || true; }
common="--arch $ARCH --data $DATA --device $DEVICE --amp $AMP --workers $WORKERS --batch $BATCH --quiet"

fp() {
    $PY -m refqsr_engine.training.train_fp $common --out "$RUNS/fp" --steps "$FP_STEPS" --lr "$FP_LR" \
        --halve-every "$FP_HALVE" --val-every "$VAL_EVERY" --ckpt-every 500 $(limit "$FP_TIME")
}

quant() {
    local teacher=${TEACHER:-$RUNS/fp/best.pt}
    local q="$common --teacher $teacher --steps $Q_STEPS --halve-every $Q_HALVE --val-every $Q_VAL_EVERY --ckpt-every 250 $(limit "$Q_TIME")"
    local pids=() run
    for run in $QUANT_RUNS; do
        case $run in
            ddtb8) set -- qat --scheme ddtb --bits 8 ;;
            ddtb4) set -- qat --scheme ddtb --bits 4 ;;
            refqsr84) set -- refqsr --scheme ddtb --bits 8-4 --clustblock "$CLUST" ;;
            norefer84) set -- refqsr --scheme ddtb --bits 8-4 --clustblock "$CLUST" --tail highbit ;;
            *) echo "unknown run $run (ddtb8 ddtb4 refqsr84 norefer84)" >&2; return 2 ;;
        esac
        $PY -m refqsr_engine.training.train_qat "$1" $q --out "$RUNS/$run" "${@:2}" > "$RUNS/$run.out" 2>&1 & pids+=($!)
    done
    local failed=0
    for p in "${pids[@]}"; do wait "$p" || failed=1; done
    for run in $QUANT_RUNS; do echo "== $run"; tail -n 3 "$RUNS/$run.out"; done
    return $failed
}

mkdir -p "$RUNS"
case "${1:-all}" in
    fp) fp ;;
    quant) quant ;;
    all) fp && quant ;;
    *) echo "usage: $0 fp|quant|all" >&2; exit 2 ;;
esac
