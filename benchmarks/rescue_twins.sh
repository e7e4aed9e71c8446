#!/usr/bin/env bash
# `rescue run` for several 2-bit twins of one embedded size at once on one GPU, so that no rescue figure is a
# property of one GPTQ draw: each twin is quantized on another number of calibration problems, then collects,
# trains its own detector and compares every method (ceilings and the learned budget curve included).
# Usage (on the device, after `source benchmarks/device_setup.sh`):
#   benchmarks/rescue_twins.sh OUT SIZE[=FP16_DIR] CAL_SIZE...     e.g. benchmarks/rescue_twins.sh $OUT tiny-s 96 128 160
# Env: TRAIN (1000), VAL (500), TEST (500), BATCH (250), LIMIT_S (per twin, 540), EXTRA (more flags),
#      SMOKE (1: a small run of the whole pipeline first, stopping the script if it fails),
#      TWIN (a folder pattern with %s for the calibration size, e.g. runs/twins/tiny-m-cal%s: where that folder
#      holds a twin it is used as it is, `--model.quantized`, instead of quantizing afresh on this machine).
# Writes OUT/twins-SIZE.tar.gz (each twin's report folder and comparison.json) and OUT/twins-SIZE.md (the
# goals and accuracies of every twin in one table), plus each twin's log.
set -uo pipefail
out=$1 spec=$2; shift 2
size=${spec%%=*} fp16=${spec#*=}
mkdir -p "$out/keep"
if [ "${SMOKE:-1}" = 1 ]; then  # a small run first, so a broken pipeline costs a minute, not the whole call
  timeout 240 python3 -m rescue.cli run --config "$size" --output_dir "$out/smoke/runs" --wandb disabled \
    --sampling.decode static --sampling.batch_size 64 --train-limit 64 --val-limit 48 --test-limit 16 \
    > "$out/keep/log-smoke.txt" 2>&1 || { echo "smoke run failed:"; tail -40 "$out/keep/log-smoke.txt"; exit 1; }
  echo "smoke run passed"
fi
one_twin() {
  local cal=$1 dir=$out/twin-$cal
  local flags=(--config "$size" --output_dir "$dir/runs" --wandb disabled --sampling.batch_size "${BATCH:-250}"
               --capture.shard_size "${BATCH:-250}" --sampling.decode static --quantization.calibration.size "$cal"
               ${EXTRA:-})
  [ "$fp16" != "$spec" ] && flags+=(--model.fp16 "$fp16")
  local twin
  [ -n "${TWIN:-}" ] && twin=$(printf "$TWIN" "$cal") && [ -f "$twin/rescue_quantize.json" ] && flags+=(--model.quantized "$twin")
  local began=$(date +%s)
  timeout "${LIMIT_S:-540}" python3 -m rescue.cli run "${flags[@]}" --train-limit "${TRAIN:-1000}" \
    --val-limit "${VAL:-500}" --test-limit "${TEST:-500}" > "$out/keep/log-$size-cal$cal.txt" 2>&1
  echo "twin cal=$cal: exit $? after $(( $(date +%s) - began )) s" | tee -a "$out/keep/log-$size-cal$cal.txt"
  mkdir -p "$out/keep/$size-cal$cal"
  cp -r "$dir/runs/$size/report/." "$out/keep/$size-cal$cal/" 2>/dev/null
  cp "$dir/runs/$size/run-compare/comparison.json" "$out/keep/$size-cal$cal/" 2>/dev/null
}
for cal in "$@"; do one_twin "$cal" & done
wait
python3 - "$out" "$size" "$@" <<'EOF'
import json, sys
from pathlib import Path
out, size, cals = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
lines = [f"# {size}: rescue run on {len(cals)} 2-bit twins", "",
         "| twin (calibration problems) | fp16 | 2bit | rule | learned | learned curve | ceilings | goals met |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for cal in cals:
    report = out / "keep" / f"{size}-cal{cal}" / "report.json"
    if not report.is_file():
        lines.append(f"| {cal} | (no report) | | | | | | |")
        continue
    r = json.loads(report.read_text())
    m = r["comparison"]
    acc = lambda k: f"{m[k]['accuracy']:.1%}" if k in m else "-"
    curve = ", ".join(f"{k.split('@')[1]}: {v['accuracy']:.1%}" for k, v in m.items() if k.startswith("learned@"))
    ceilings = ", ".join(f"{c['ceiling']} {c['accuracy']:.1%}" for c in r.get("ceilings", []))
    met = sum(g["met"] for g in r["goals"])
    lines.append(f"| {cal} | {acc('fp16')} | {acc('2bit')} | {acc('rule')} | {acc('learned')} | {curve} | {ceilings} "
                 f"| {met} of {len(r['goals'])} |")
(out / f"twins-{size}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
tar -czf "$out/twins-$size.tar.gz" -C "$out/keep" .
