"""Loop labels and the rule's loop check on real reasoning traces (../shared/data/real_traces_dev.jsonl:
11 looping, 10 healthy, judged by reading): loops caught, healthy traces flagged, and whether the
labeled onset (the rule: its first alarm) comes no later than the third occurrence of the repeated
paragraph (the file's `paragraph_loop_char` plus two paragraphs).

Tokens come from a byte-level BPE trained on the file's texts (vocabulary 8,000; Qwen3's tokenizer is
byte-level BPE too, with a far larger vocabulary), or from --tokenizer. Uses only `find_loop`,
`training.fit.ngram_repeats` and the config, so the same script measures an older checkout:

    python benchmarks/real_text_labels.py [--config qwen3-8b] [--tokenizer FOLDER] [--rule N,WINDOW,COUNT ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEV = REPO.parent / "shared" / "data" / "real_traces_dev.jsonl"


def byte_level_bpe(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def third_repetition_char(row: dict) -> int | None:
    """Where the repeated paragraph begins its third occurrence (None for healthy traces)."""
    start = row.get("paragraph_loop_char")
    if start is None:
        return None
    paragraph = row["text"][start:].split("\n\n")[0] + "\n\n"
    return start + 2 * len(paragraph)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default=str(DEV))
    parser.add_argument("--config", default="qwen3-8b")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: a BPE trained on the file)")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--rule", action="append", default=[], help="extra loop-check setting n,window,count")
    parser.add_argument("--details", action="store_true", help="also print one line per trace")
    args = parser.parse_args()

    from inference.config import load_config
    from training.fit import ngram_repeats
    from training.labels import find_loop

    rows = [json.loads(line) for line in Path(args.file).read_text().splitlines() if line.strip()]
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer, source = AutoTokenizer.from_pretrained(args.tokenizer), args.tokenizer
    else:
        tokenizer, source = byte_level_bpe([row["text"] for row in rows], args.vocab), f"byte-level BPE {args.vocab}"
    config = load_config(args.config)
    control = config.rescue
    rules = {f"rule as configured ({control.rule_ngram}-gram {control.rule_count}x within {control.rule_window})":
             (control.rule_ngram, control.rule_window, control.rule_count)}
    if (control.rule_ngram, control.rule_window, control.rule_count) != (16, 256, 3):
        rules["paper-like rule (16-gram 3x within 256)"] = (16, 256, 3)
    for extra in args.rule:
        n, window, count = (int(v) for v in extra.split(","))
        rules[f"rule {n}-gram {count}x within {window}"] = (n, window, count)

    results = {"labels (find_loop)": []}
    results.update({name: [] for name in rules})
    seconds = 0.0
    for row in rows:
        ids = tokenizer.encode(row["text"], add_special_tokens=False)
        began = time.perf_counter()
        loop = find_loop(ids, config.labels)
        seconds += time.perf_counter() - began
        char = lambda token: len(tokenizer.decode(ids[:token]))  # noqa: E731
        found = {"labels (find_loop)": None if loop is None else loop[0]}
        for name, (n, window, count) in rules.items():
            fired = np.flatnonzero(ngram_repeats(ids, n, window) >= count)
            found[name] = int(fired[0]) if len(fired) else None
        third = third_repetition_char(row)
        for name, position in found.items():
            at = None if position is None else char(position)
            results[name].append((row["looping"], at, third))
        if args.details:
            print(row["id"], row["looping"], len(ids), {k: v for k, v in found.items()}, third)

    loops = sum(row["looping"] for row in rows)
    healthy = len(rows) - loops
    print(f"{args.file}: {len(rows)} traces ({loops} loop, {healthy} healthy), tokens from {source}, "
          f"labels {config.labels.max_period}/{config.labels.min_repeats}/{config.labels.min_span} (P/R/L), "
          f"find_loop {seconds:.1f} s in all\n")
    print("| check | loops caught | healthy traces flagged | loops flagged by the 3rd repetition |")
    print("| --- | ---: | ---: | ---: |")
    for name, outcome in results.items():
        caught = sum(looping and at is not None for looping, at, _ in outcome)
        flagged = sum(not looping and at is not None for looping, at, _ in outcome)
        early = sum(looping and at is not None and at <= third for looping, at, third in outcome)
        print(f"| {name} | {caught} of {loops} | {flagged} of {healthy} | {early} of {loops} |")


if __name__ == "__main__":
    main()
