#!/usr/bin/env bash
# Quantize one embedded size, collect 2-bit traces of its test split and label them; prints the label report.
# Usage: LIMIT=500 benchmarks/collect_and_label.sh tiny-s WORKDIR [extra config flags, e.g. --model.fp16 DIR]
set -euo pipefail
size=$1; work=$2; shift 2
rescue() { python3 -m rescue.cli "$@"; }
common=(--config "$size" --output_dir "$work/runs" --wandb disabled "$@")
rescue quantize "${common[@]}" --model.quantized "$work/$size-2bit" 2>&1 | grep -E "^wrote|error"
rescue collect "${common[@]}" --model.quantized "$work/$size-2bit" --split test --limit "${LIMIT:-500}" \
  --out "$work/$size-traces" 2>&1 | tr '\r' '\n' | grep -E "trace set|error" 
rescue label "$work/$size-traces" "${common[@]}" 2>&1 | grep -v -E "^\s*$"
