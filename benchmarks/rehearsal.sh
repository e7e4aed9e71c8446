#!/usr/bin/env bash
# Real-scale rehearsal on one GPU (benchmarks/rehearsal.py): the Qwen3-0.6B and 8B shapes with random
# weights, at budget 8,192 (decode also at 32,768), every stage measured; models and traces go to
# /tmp/rehearsal-work, the results to $1/rehearsal.json.
#   bash benchmarks/rehearsal.sh OUT [DATA] [SECONDS]
# DATA: MATH-500 JSONL (default ../shared/data/math500_test.jsonl); SECONDS: deadline of the run (540).
set -euo pipefail
out=${1:?usage: rehearsal.sh OUT [DATA] [SECONDS]}
data=${2:-../shared/data/math500_test.jsonl}
seconds=${3:-540}
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 benchmarks/rehearsal.py --data "$data" --out /tmp/rehearsal-work --results "$out/rehearsal.json" \
  --seconds "$seconds" \
  --shapes qwen3-0.6b,qwen3-8b --budget 8192 --batch-size 64 --collect-prompts 64 \
  --decode-budgets 8192,32768 --decode-steps 128 --detector-epochs 5 --gptq-seconds 120 --gptq-texts 16
