"""Reserved GPU memory of a static decode whose window grows through several CUDA graphs: the graphs in
one shared memory pool (`steps.SHARE_GRAPH_POOL`, the default) against a pool per graph, side by side in
one process on the rehearsal's Qwen3-0.6B 2-bit twin (random weights, `training.rehearsal`).

    python benchmarks/graph_pool.py --data ../shared/data/math500_test.jsonl --out /tmp/pool --results pool.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from rehearsal import reset_gpu, time_decode  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="MATH-500 JSONL (prompts and the tokenizer's text)")
    parser.add_argument("--out", required=True, help="work folder for the model and its twin")
    parser.add_argument("--results", default="graph-pool.json")
    parser.add_argument("--rows", type=int, default=86)
    parser.add_argument("--budget", type=int, default=8192, help="static cache past the prompt")
    parser.add_argument("--steps", type=int, default=3100, help="decode steps (3,100: windows up to 4,096)")
    parser.add_argument("--tiny", action="store_true", help="shrink the shape (CPU check of this script)")
    args = parser.parse_args(argv)
    import inference.decoding.steps as steps_module
    from inference.decoding.models import load_quantized
    from training.rehearsal import build_rehearsal_model, math500_texts, write_gptq_v1_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=8192) if args.tiny else {})
    work = Path(args.out)
    fp16_dir, twin_dir = work / "model", work / "model-2bit"
    build_rehearsal_model("qwen3-0.6b", fp16_dir, math500_texts(args.data), device=device, **overrides)
    write_gptq_v1_checkpoint(fp16_dir, twin_dir, 64, device=device)
    model, tokenizer = load_quantized(str(twin_dir), device, kernel="fused" if device == "cuda" else "gptq", bits=2)
    questions = [json.loads(line)["problem"] for line in Path(args.data).read_text().splitlines() if line.strip()]
    layers = [min(layer, model.config.num_hidden_layers - 1) for layer in (13, 20, 27)]
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "rows": args.rows, "budget": args.budget, "steps": args.steps, "runs": {}}
    for shared in (False, True):
        steps_module.SHARE_GRAPH_POOL = shared
        reset_gpu()
        row = time_decode(model, tokenizer, questions, args.budget, layers, args.steps, args.rows)
        report["runs"]["shared pool" if shared else "pool per graph"] = row
        print(json.dumps({"shared": shared, **row}), flush=True)
        Path(args.results).write_text(json.dumps(report, indent=2) + "\n")
    steps_module.SHARE_GRAPH_POOL = True
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
