#!/usr/bin/env bash
# `rescue run` (quantize, collect + label, train the detector, compare every method) for embedded sizes
# on the GPU, keeping each size's report. Usage (on the GPU machine, after `source benchmarks/device_setup.sh`):
#   benchmarks/rescue_family.sh OUT SIZE[=FP16_DIR] ...   e.g. benchmarks/rescue_family.sh $OUT tiny-s tiny-m=.models/tiny-m
# Env: TRAIN (default 300), VAL (150), TEST (200), BATCH (sampling.batch_size and capture.shard_size, default 200),
#      LIMIT_S (per size, 290), EXTRA (more flags for rescue run), PARALLEL=1 (all sizes at once on the one GPU:
#      their wall times then share the machine and are not comparable with a run alone).
set -uo pipefail
out=$1; shift; mkdir -p "$out"
one_size() {
  local spec=$1 size=${1%%=*} fp16=${1#*=}
  local flags=(--config "$size" --output_dir "$out/runs" --wandb disabled --sampling.batch_size "${BATCH:-200}"
               --capture.shard_size "${BATCH:-200}" ${EXTRA:-})
  [ "$fp16" != "$spec" ] && flags+=(--model.fp16 "$fp16")
  local began=$(date +%s)
  timeout "${LIMIT_S:-290}" python3 -m rescue.cli run "${flags[@]}" --train-limit "${TRAIN:-300}" \
    --val-limit "${VAL:-150}" --test-limit "${TEST:-200}" > "$out/run-$size.log" 2>&1
  echo "$size: exit $? after $(( $(date +%s) - began )) s" | tee -a "$out/run-$size.log"
  mkdir -p "$out/report-$size"
  cp -r "$out/runs/$size/report/." "$out/report-$size/" 2>/dev/null
  cp "$out/runs/$size/run-compare/comparison.json" "$out/report-$size/" 2>/dev/null
}
if [ "${PARALLEL:-0}" = 1 ]; then
  for spec in "$@"; do one_size "$spec" & done
  wait
else
  for spec in "$@"; do one_size "$spec"; done
fi
for spec in "$@"; do
  size=${spec%%=*}; echo "== $size"
  grep -E "^== |exit|error|Error|accuracy|^\| " "$out/run-$size.log" | tail -40
done
