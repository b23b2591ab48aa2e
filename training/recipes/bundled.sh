#!/usr/bin/env bash
# The recipe of the bundled x4 models of one architecture (ARCH: srresnet, carn, elan_light):
# full precision, then, from it, quantization-aware runs side by side: DDTB-8, DDTB-4,
# DDTB-RefQSR 8-4 and (ABLATION=1) the Table V "w/o RefER" ablation (the query path's last blocks
# at 8 bits instead of RefER). QUANT_RUNS picks a subset, e.g. QUANT_RUNS="ddtb8 refqsr84"; more runs:
# pams8, pams4, pams_refqsr84 (PAMS), cadyq (per-patch, per-layer bits) and cadyq_refqsr3 (δ-3).
# Stage cabm (after quant's cadyq run): CABM (CADyQ's choices as an edge-score table, fine-tuned)
# and CABM-RefQSR δ-3, both from $RUNS/cadyq/best.pt; CABM_RUNS picks a subset.
#
#   ARCH=carn training/recipes/bundled.sh fp      # stage 1
#   ARCH=carn training/recipes/bundled.sh quant   # stage 2 (needs $RUNS/fp/best.pt or $TEACHER)
#   QUANT_RUNS=cadyq training/recipes/bundled.sh quant && training/recipes/bundled.sh cabm
#   ARCH=carn training/recipes/bundled.sh all
#   Q_INIT_DIR=core/data/models training/recipes/bundled.sh quant   # re-teach the bundled models
#
# Every run is resumable: run the same stage again and it continues from its last.pt. The
# *_TIME variables cap the training of one invocation (seconds, for machines held for a fixed
# time); the step counts and the halving schedule are what a run converges to when given the time.
# Then: python -m refqsr_engine.training.bundle RUN/best.pt NAME --val DATA/val
set -euo pipefail

ARCH=${ARCH:-srresnet}
DATA=${DATA:-data/sr}                 # python -m refqsr_engine.training.prepare --out data/sr
RUNS=${RUNS:-runs/bundled/$ARCH}
DEVICE=${DEVICE:-cuda}
AMP=${AMP:-bf16}                      # the FP stage
# The quantized stages run in fp32: under bf16 the KD teacher's output loses 0.6 dB and an 8-bit
# grid does not survive the cast (H100 DDTB-8 runs under bf16 ended 0.2-0.8 dB under their FP start).
Q_AMP=${Q_AMP:-none}
Q_LR=${Q_LR:-1e-4}                    # the paper's; from a well-trained FP teacher 2e-5 kept DDTB-8 closer to it
Q_LR_QUANT=${Q_LR_QUANT:-1e-2}        # the quantizer bounds' (the paper's); 1e-3 for runs from trained models
WORKERS=${WORKERS:-6}
CLUST=${CLUST:-core/data/clustblock/textures47.pt}
FP_STEPS=${FP_STEPS:-60000}
FP_HALVE=${FP_HALVE:-8000}
FP_TIME=${FP_TIME:-}
FP_LR=${FP_LR:-1e-4}
FP_INIT=${FP_INIT:-}                  # a full-precision model file to continue from (e.g. a longer schedule)
FP_BATCH=${FP_BATCH:-}                # the FP run's batch (default: BATCH)
Q_STEPS=${Q_STEPS:-20000}
Q_HALVE=${Q_HALVE:-4000}
Q_TIME=${Q_TIME:-}
CABM_STEPS=${CABM_STEPS:-$Q_STEPS}
CABM_TIME=${CABM_TIME:-$Q_TIME}
CABM_RUNS=${CABM_RUNS:-cabm cabm_refqsr3}
VAL_EVERY=${VAL_EVERY:-1000}
Q_VAL_EVERY=${Q_VAL_EVERY:-250}
BATCH=${BATCH:-16}
WARMUP=${WARMUP:-0}                   # learning-rate ramp (steps): for runs that start from trained weights
ABLATION=${ABLATION:-1}
MATCHING=${MATCHING:-shared}          # RefER's flow for the RefQSR runs: shared (the bundled models) or paper
# A folder of earlier models (e.g. core/data/models) to re-teach with a better FP: run R starts from
# ${ARCH}_NAME.pt there (NAME: R, or ddtb_refqsr84 for refqsr84) when that file exists.
Q_INIT_DIR=${Q_INIT_DIR:-}
# 1: RefQSR runs keep the backbone they start from but start their RefER blocks afresh (--fresh-refer).
# The bundled SRResNet 8-4's RefERs were still at their random initialisation, and zeroing their
# refinement scored higher (see docs/experiments, RefER random refinement).
FRESH_REFER=${FRESH_REFER:-0}
QUANT_RUNS=${QUANT_RUNS:-ddtb8 ddtb4 refqsr84$( [ "$ABLATION" = 1 ] && echo " norefer84")}
PY=${PYTHON:-python}

limit() { [ -n "$1" ] && echo "--time-limit $1" || true; }
common="--arch $ARCH --data $DATA --device $DEVICE --workers $WORKERS --warmup $WARMUP --quiet"
quantized="$common --amp $Q_AMP --batch $BATCH --lr $Q_LR --lr-quant $Q_LR_QUANT"  # the quant and cabm stages

fp() {
    $PY -m refqsr_engine.training.train_fp $common --amp "$AMP" --batch "${FP_BATCH:-$BATCH}" --out "$RUNS/fp" \
        --steps "$FP_STEPS" --lr "$FP_LR" --halve-every "$FP_HALVE" --val-every "$VAL_EVERY" --ckpt-every 500 \
        $(limit "$FP_TIME") ${FP_INIT:+--init-from "$FP_INIT"}
}

quant() {
    local teacher=${TEACHER:-$RUNS/fp/best.pt}
    local q="$quantized --teacher $teacher --steps $Q_STEPS --halve-every $Q_HALVE --val-every $Q_VAL_EVERY --ckpt-every 250 $(limit "$Q_TIME")"
    local pids=() run
    for run in $QUANT_RUNS; do
        case $run in
            ddtb8) set -- qat --scheme ddtb --bits 8 ;;
            ddtb4) set -- qat --scheme ddtb --bits 4 ;;
            refqsr84) set -- refqsr --scheme ddtb --bits 8-4 --clustblock "$CLUST" --matching "$MATCHING" ;;
            norefer84) set -- refqsr --scheme ddtb --bits 8-4 --clustblock "$CLUST" --tail highbit ;;
            pams8) set -- qat --scheme pams --bits 8 ;;
            pams4) set -- qat --scheme pams --bits 4 ;;
            pams_refqsr84) set -- refqsr --scheme pams --bits 8-4 --clustblock "$CLUST" --matching "$MATCHING" ;;
            cadyq) set -- qat --scheme cadyq --bits delta ;;
            cadyq_refqsr3) set -- refqsr --scheme cadyq --bits delta-3 --clustblock "$CLUST" --matching "$MATCHING" ;;
            *) echo "unknown run $run (ddtb8 ddtb4 refqsr84 norefer84 pams8 pams4 pams_refqsr84 cadyq cadyq_refqsr3)" >&2
               return 2 ;;
        esac
        local start="$Q_INIT_DIR/${ARCH}_$( [ "$run" = refqsr84 ] && echo ddtb_refqsr84 || echo "$run" ).pt"
        [ -n "$Q_INIT_DIR" ] && [ -f "$start" ] && set -- "$@" --init-from "$start"
        [ "$FRESH_REFER" = 1 ] && [ "$1" = refqsr ] && [ "$run" != norefer84 ] && set -- "$@" --fresh-refer
        $PY -m refqsr_engine.training.train_qat "$1" $q --out "$RUNS/$run" "${@:2}" > "$RUNS/$run.out" 2>&1 & pids+=($!)
    done
    wait_all "$QUANT_RUNS" "${pids[@]}"
}

cabm() {
    local q="$quantized --teacher ${TEACHER:-$RUNS/fp/best.pt} --init-from $RUNS/cadyq/best.pt --steps $CABM_STEPS"
    q="$q --halve-every $Q_HALVE --val-every $Q_VAL_EVERY --ckpt-every 250 $(limit "$CABM_TIME")"
    local pids=() run
    for run in $CABM_RUNS; do
        case $run in
            cabm) set -- qat --scheme cabm --bits delta ;;
            cabm_refqsr3) set -- refqsr --scheme cabm --bits delta-3 --clustblock "$CLUST" --matching "$MATCHING" ;;
            *) echo "unknown run $run (cabm cabm_refqsr3)" >&2; return 2 ;;
        esac
        $PY -m refqsr_engine.training.train_qat "$1" $q --out "$RUNS/$run" "${@:2}" > "$RUNS/$run.out" 2>&1 & pids+=($!)
    done
    wait_all "$CABM_RUNS" "${pids[@]}"
}

# wait_all "RUNS" PID...: wait for every run, print the end of each one's output, fail if one failed.
wait_all() {
    local runs=$1 failed=0 p run; shift
    for p in "$@"; do wait "$p" || failed=1; done
    for run in $runs; do echo "== $run"; tail -n 3 "$RUNS/$run.out"; done
    return $failed
}

mkdir -p "$RUNS"
case "${1:-all}" in
    fp) fp ;;
    quant) quant ;;
    cabm) cabm ;;
    all) fp && quant ;;
    *) echo "usage: $0 fp|quant|cabm|all" >&2; exit 2 ;;
esac
