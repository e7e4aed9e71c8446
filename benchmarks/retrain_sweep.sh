#!/usr/bin/env bash
# Retrain embedded family sizes with other recipes (trace style, epochs) and measure each one's regime:
# every variant runs `rescue pretrain`, then `benchmarks/family_regime.py` (FP16 and the BITS twins on
# LIMIT test problems). All variants run at once; on a machine with several GPUs they are spread
# over them (variant i on GPU i mod the GPU count); variants that share a GPU share its wall time.
# Usage (on the GPU machine, after `source benchmarks/device_setup.sh`):
#   benchmarks/retrain_sweep.sh OUT NAME:SIZE[:--pretrain.field=VALUE,...] ...
#   e.g. benchmarks/retrain_sweep.sh $OUT s-v9:tiny-s:--pretrain.verify_rate=0.9,--pretrain.epochs=2
# The same flags go to the regime run, so its record holds the recipe. Env: BITS (default 2), LIMIT (500),
# BATCH (sampling.batch_size, 500), LIMIT_S (per variant, 540), EXTRA (more flags for the regime run),
# REGIME=0 (train only: measure the regime elsewhere, e.g. on a CPU with the same family_regime.py),
# SWEEP (space-separated benchmarks/quant_sweep.py recipes, e.g. "g128:quantization.group_size=128":
# swept after the regime run, into OUT/sweep-NAME; its quantized models are large, so bring back only
# the *.json and *.md files of OUT).
# RESUME=1: a variant whose training was stopped (LIMIT_S) continues from its newest epoch checkpoint;
# rerun the same command with the same OUT (the checkpoints stay there). A variant whose
# model folder is already written is not trained again (its pretrain.json, with the training time, stays).
# Writes OUT/NAME.log, OUT/models/NAME (FP16 weights, tokenizer, pretrain.json), OUT/regime-NAME/,
# OUT/sweep-NAME/ (with SWEEP), OUT/pretrain-runs/NAME/ (Lightning logs and one checkpoint per epoch:
# large, leave them out of what comes back).
set -uo pipefail
out=$1; shift; mkdir -p "$out/models"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$gpus" -gt 0 ] || gpus=1
one_variant() {
  local name size flags=()
  export CUDA_VISIBLE_DEVICES=$2
  IFS=: read -r name size rest <<< "$1"
  [ -n "${rest:-}" ] && IFS=, read -ra flags <<< "$rest"
  local began=$(date +%s)
  timeout "${LIMIT_S:-540}" bash -c '
    resume=(); [ "${RESUME:-0}" = 1 ] && compgen -G "$2/pretrain-runs/$3/*/pretrain/checkpoints/*.ckpt" > /dev/null \
      && resume=(--resume)
    if [ "${RESUME:-0}" = 1 ] && [ -f "$2/models/$3/pretrain.json" ]; then
      echo "$3: trained in an earlier call ($2/models/$3), not training again"  # keeps its pretrain.json
    else
      python3 -m rescue.cli pretrain --config "$1" --out "$2/models/$3" --output_dir "$2/pretrain-runs/$3" \
        --wandb disabled "${@:4}" "${resume[@]}" || exit
    fi
    if [ "${REGIME:-1}" = 1 ]; then
      python3 benchmarks/family_regime.py --config "$1" --model.fp16 "$2/models/$3" --out "$2/regime-$3" \
        --bits "${BITS:-2}" --limit "${LIMIT:-500}" --sampling.batch_size "${BATCH:-500}" --wandb disabled \
        ${EXTRA:-} "${@:4}" || exit
    fi
    [ -n "${SWEEP:-}" ] || exit 0
    recipes=(); for recipe in $SWEEP; do recipes+=(--recipe "$recipe"); done
    [ "${REGIME:-1}" = 1 ] && recipes+=(--no-fp16)  # the regime run measured FP16 already
    python3 benchmarks/quant_sweep.py --config "$1" --model.fp16 "$2/models/$3" --out "$2/sweep-$3" \
      --limit "${LIMIT:-500}" --sampling.batch_size "${BATCH:-500}" --wandb disabled ${EXTRA:-} "${@:4}" "${recipes[@]}"
    ' _ "$size" "$out" "$name" ${flags[@]+"${flags[@]}"} > "$out/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - began )) s on GPU $2" | tee -a "$out/$name.log"
}
i=0
for spec in "$@"; do one_variant "$spec" $(( i % gpus )) & i=$(( i + 1 )); done
wait
for spec in "$@"; do
  name=${spec%%:*}; echo "== $name"
  grep -E "^(pretraining|wrote $out/models|[^ ]+: exit|fp16 on|[0-9]+bit on|- (met|MISSED)|[A-Za-z]*Error)" "$out/$name.log" | tail -12
  cat "$out/regime-$name"/regime-*.md "$out/sweep-$name"/sweep-*.md 2>/dev/null | grep -E "^\|"
done
