#!/usr/bin/env bash
# The learned detector on larger trace sets, on the GPU: `rescue run` with more train/val traces and more
# test problems, then 2-bit test traces collected, labeled and replayed by `rescue detect-report` (the
# learned trigger against the n-gram and confidence rules). Everything a person reads is packed into
# OUT/detector-scale-SIZE.tar.gz (one file to copy back from the GPU machine).
# Usage (on the GPU machine, after `source benchmarks/device_setup.sh`):
#   benchmarks/detector_scale.sh OUT SIZE[=FP16_DIR]      e.g. benchmarks/detector_scale.sh $OUT tiny-m=.models/tiny-m
# Env: TRAIN (2000), VAL (500), TEST (500 compared problems), TEST_TRACES (1000 replayed test traces),
#      BATCH (250), LIMIT_S (for the whole script, 560), EXTRA (more flags for every command).
set -uo pipefail
out=$1 spec=$2
size=${spec%%=*} fp16=${spec#*=}
mkdir -p "$out/runs" "$out/keep"
flags=(--config "$size" --output_dir "$out/runs" --wandb disabled --sampling.batch_size "${BATCH:-250}"
       --capture.shard_size "${BATCH:-250}" --sampling.decode static ${EXTRA:-})
[ "$fp16" != "$spec" ] && flags+=(--model.fp16 "$fp16")
deadline=$(( $(date +%s) + ${LIMIT_S:-560} ))
left() { echo $(( deadline - $(date +%s) )); }
log=$out/keep/log-$size.txt
step() {  # step NAME COMMAND...: run with what is left of the time limit, log it, time it
  local name=$1 began=$(date +%s); shift
  echo "== $name" >> "$log"
  timeout "$(left)" "$@" >> "$log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - began )) s" | tee -a "$log"
  return $rc
}
tests=$out/runs/$size/traces-test-${TEST_TRACES:-1000}
step "rescue run" python3 -m rescue.cli run "${flags[@]}" --train-limit "${TRAIN:-2000}" \
  --val-limit "${VAL:-500}" --test-limit "${TEST:-500}" &&
step "collect test traces" python3 -m rescue.cli collect "${flags[@]}" --split test \
  --limit "${TEST_TRACES:-1000}" --out "$tests" &&
step "label test traces" python3 -m rescue.cli label "$tests" "${flags[@]}" &&
step "detect-report" python3 -m rescue.cli detect-report "${flags[@]}" --test "$tests" \
  --out "$out/runs/$size/detect-report"
cp -r "$out/runs/$size/report" "$out/keep/report" 2>/dev/null
cp -r "$out/runs/$size/detect-report" "$out/keep/detect-report" 2>/dev/null
mkdir -p "$out/keep/detector" && cp "$out/runs/$size"/detector/* "$out/keep/detector/" 2>/dev/null
cp "$out/runs/$size/run-compare/comparison.json" "$out/keep/" 2>/dev/null
for set in "$out"/runs/"$size"/*traces*; do  # label reports and manifests, not the shards
  [ -d "$set" ] || continue
  mkdir -p "$out/keep/$(basename "$set")"
  find "$set" -maxdepth 1 -type f -name '*.json' -exec cp {} "$out/keep/$(basename "$set")/" \;
  cp -r "$set/label-report" "$out/keep/$(basename "$set")/" 2>/dev/null
done
tar czf "$out/detector-scale-$size.tar.gz" -C "$out/keep" .
rm -rf "$out/runs" "$out/keep"
