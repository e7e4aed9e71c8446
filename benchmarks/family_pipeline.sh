#!/usr/bin/env bash
# Train one embedded size on the GPU, then evaluate FP16 and its 2-bit GPTQ twin on the test split.
# Usage (on the GPU machine, after `source benchmarks/device_setup.sh`): benchmarks/family_pipeline.sh tiny-s OUTDIR [extra flags]
set -euo pipefail
size=$1; out=$2; shift 2
rescue() { python3 -m rescue.cli "$@"; }
common=(--config "$size" --output_dir "$out/runs" --wandb disabled "$@")
model_dir="$out/$size"
rescue pretrain "${common[@]}" --out "$model_dir" 2>&1 | grep -v -E "Warning|warn\(|^\s*$" | tr '\r' '\n' | grep -E "pretraining|wrote|Error|error|Epoch [0-9]+: 100%" | tail -8
rescue evaluate "${common[@]}" --model.fp16 "$model_dir" --method fp16 --limit 500 --sampling.batch_size 250 2>&1 | grep -E "accuracy|error" 
rescue quantize "${common[@]}" --model.fp16 "$model_dir" --model.quantized "$out/$size-2bit" 2>&1 | grep -E "^wrote|error|Error"
rescue evaluate "${common[@]}" --model.fp16 "$model_dir" --model.quantized "$out/$size-2bit" --method 2bit --limit 500 --sampling.batch_size 250 2>&1 | grep -E "accuracy|error"
