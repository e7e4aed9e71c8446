"""Benchmark: what capturing hidden states costs trace collection, and what it stores per token.

For each model, the same left-padded batch is decoded for a fixed number of steps (no early stop,
so every variant does the same work) three ways, timed side by side in one process:
  plain    - the decoding loop with no hook;
  capture  - plus the collection hook that copies the configured layers' states into a buffer;
  collect  - plus what collection does after a batch: labeling, position selection, copy to host.
Bytes per generated token are computed for several capture policies on the traces generated.

    python benchmarks/collect_throughput.py --models tiny-s qwen3-0.6b --batch 16 --steps 256 --out results.json
    python benchmarks/collect_throughput.py --models tiny-l=DIR qwen3-0.6b --decode static   # a trained size, GPU

`qwen3-0.6b` is a random-weight model built from the public Qwen3-0.6B config (no download). Its
prompts use the embedded character tokenizer; the tokens it generates are random ids of its 151,936
vocabulary, so for labeling (which needs text) they are folded into the tokenizer's range: the
labeler's cost is kept, its verdicts on random text mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import Qwen3ForCausalLM

from inference.config import LabelsConfig, load_config
from inference.decoding.generate import Sampler, generate
from inference.decoding.models import load_full_precision
from inference.decoding.shapes import qwen3_config
from inference.prompts import render_prompt
from training.arith import arith_problems
from training.collect import HiddenRecorder, capture_positions
from training.labels import label_trace, token_char_ends
from training.tokenizer import build_tokenizer

POLICIES = {"dense (stride 1)": (1, 0), "stride 4": (4, 0), "stride 8 + window 32": (8, 32), "stride 16": (16, 0)}


def load(name: str, device: torch.device):
    if name == "qwen3-0.6b":
        tokenizer = build_tokenizer()
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(qwen3_config("qwen3-0.6b")).to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
        layers = [13, 20, 27]
        return model, tokenizer, layers
    name, _, folder = name.partition("=")  # tiny-l=DIR: a size's config with its FP16 model from DIR
    config = load_config(name)
    model, tokenizer = load_full_precision(folder or config.model.fp16, "auto", str(device))
    return model, tokenizer, list(config.probe.layers)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def label_ids(ids, tokenizer, labels_config):
    """Labels of generated ids (folded into the tokenizer's vocabulary for random-vocabulary models)."""
    ids = [i % len(tokenizer) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return label_trace(ids, text, token_char_ends(tokenizer, ids), "budget", "0", labels_config)


def measure(model, tokenizer, layers, batch: int, steps: int, device, repeats: int = 3,
            decode: str = "dynamic") -> dict:
    problems = arith_problems("test", limit=batch)
    prompts = [render_prompt(tokenizer, p.question) for p in problems]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
    sampler = Sampler(0.6, 20, 0.95)
    labels_config = LabelsConfig()

    def run(variant: str):
        generator = torch.Generator(device=device).manual_seed(0)
        recorder = HiddenRecorder(layers, batch, steps, torch.float16) if variant != "plain" else None
        sync(device)
        began = time.perf_counter()
        out = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=steps, eos_token_ids=[],
                       pad_token_id=tokenizer.pad_token_id, sampler=sampler, generator=generator,
                       layers=layers if recorder else (), hook=recorder, top_prob=recorder is not None,
                       stack_dtype=torch.float16 if recorder else None, decode=decode)
        kept = []
        if variant == "collect":
            for row, ids in enumerate(out.generated_ids):
                labels = label_ids(ids, tokenizer, labels_config)
                keep = capture_positions(len(ids), labels, None, 8, 32)
                kept.append(recorder.buffer[row, keep].cpu())
        sync(device)
        return time.perf_counter() - began, out

    results = {}
    run("capture")  # warm-up
    for variant in ("plain", "capture", "collect"):
        times = [run(variant)[0] for _ in range(repeats)]
        results[variant] = {"seconds": statistics.median(times), "tokens_per_s": batch * steps / statistics.median(times)}
    _, out = run("plain")
    hidden = model.config.hidden_size
    stored = {}
    for name, (stride, window) in POLICIES.items():
        positions = 0
        for ids in out.generated_ids:
            labels = label_ids(ids, tokenizer, labels_config)
            positions += len(capture_positions(len(ids), labels, None, stride, window))
        stored[name] = positions * len(layers) * hidden * 2 / (batch * steps)
    results["capture_cost"] = 1 - results["capture"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
    results["collect_cost"] = 1 - results["collect"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
    results["bytes_per_generated_token"] = stored
    results["layers"] = layers
    results["hidden_size"] = hidden
    return results


def capture_agreement(model, tokenizer, layers, batch: int, steps: int, device) -> dict:
    """Greedy decoding with the collection hook on the dynamic and the static path (on a GPU: CUDA-graph
    replays): the share of rows whose tokens agree, and how far the stored states and top-token
    probabilities of the agreeing rows' generated positions are apart."""
    problems = arith_problems("test", limit=batch)
    enc = tokenizer([render_prompt(tokenizer, p.question) for p in problems], return_tensors="pt",
                    padding=True, padding_side="left").to(device)
    runs = {}
    for decode in ("dynamic", "static"):
        recorder = HiddenRecorder(layers, batch, steps, torch.float16)
        out = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=steps, eos_token_ids=[],
                       pad_token_id=tokenizer.pad_token_id, sampler=Sampler(0.0), layers=layers, hook=recorder,
                       top_prob=True, stack_dtype=torch.float16, decode=decode)
        runs[decode] = (out.generated_ids, recorder.buffer.float(), recorder.top_prob)
    (ids_d, states_d, top_d), (ids_s, states_s, top_s) = runs["dynamic"], runs["static"]
    same = [row for row in range(batch) if ids_d[row] == ids_s[row]]
    # A row's states agree up to its first differing token; compare the rows that agree throughout.
    scale = states_d[same].abs().amax().item() if same else 0.0
    return {"rows_agreeing": len(same), "rows": batch,
            "max_state_diff": (states_d[same] - states_s[same]).abs().amax().item() if same else None,
            "state_scale": scale,
            "max_top_prob_diff": (top_d[same] - top_s[same]).abs().amax().item() if same else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-s", "qwen3-0.6b"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--out", default=None)
    parser.add_argument("--decode", default="dynamic", choices=("dynamic", "static"),
                        help="decoding path (static: CUDA-graph steps on a GPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"
    report = {"machine": machine, "batch": args.batch, "steps": args.steps, "decode": args.decode, "models": {}}
    print(f"collection throughput on {machine}, batch {args.batch}, {args.steps} steps")
    print("| model | plain tok/s | capture tok/s | collect tok/s | capture cost | collect cost | bytes/token: " +
          " / ".join(POLICIES) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for name in args.models:
        model, tokenizer, layers = load(name, device)
        r = report["models"][name] = measure(model, tokenizer, layers, args.batch, args.steps, device,
                                             decode=args.decode)
        if args.decode == "static":
            r["capture_agreement"] = capture_agreement(model, tokenizer, layers, args.batch, min(args.steps, 128),
                                                       device)
            print(f"  static vs dynamic capture, greedy: {r['capture_agreement']}", flush=True)
        del model
        sizes = " / ".join(f"{r['bytes_per_generated_token'][p]:.0f}" for p in POLICIES)
        print(f"| {name} | {r['plain']['tokens_per_s']:.0f} | {r['capture']['tokens_per_s']:.0f} | "
              f"{r['collect']['tokens_per_s']:.0f} | {r['capture_cost']:.1%} | {r['collect_cost']:.1%} | {sizes} |",
              flush=True)
        if args.out:  # after every model, so a run cut short keeps what it measured
            with open(args.out, "w") as handle:
                json.dump(report, handle, indent=2)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
