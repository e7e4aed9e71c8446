"""Rehearsal models: random-weight Qwen3 models of the public shapes, with a tokenizer trained here.

No real Qwen3 weights can be fetched on a machine without a model hub, but everything the pipeline
does at scale except the text's quality depends only on the shapes: cache and batch sizes, kernel
speed, bytes per trace, detector training speed. A rehearsal folder is a Hugging Face model folder
that every `rescue` command loads like the real model:

- the architecture of `Qwen/Qwen3-0.6B` / `Qwen/Qwen3-8B` (`inference.decoding.shapes.QWEN3_SHAPES`, their
  published config.json values, the real 151,936-row vocabulary and 40,960-position context), with
  random weights;
- a byte-level BPE tokenizer trained on the given texts (MATH-500 problems and solutions), Qwen3's
  pre-tokenizer split, its 26 added tokens (`<|endoftext|>` pad, `<|im_end|>` end of turn, `<think>`
  and `</think>` as plain added tokens) and its chat template's thinking semantics.

`write_gptq_v1_checkpoint` writes the 2-bit twin of a model folder as published 2-bit GPTQ
checkpoints are laid out (GPTQModel/AutoGPTQ "gptq" format: packed int32 codes, zero points stored
minus one, fp16 scales, `g_idx`, `quantize_config.json`), rounding each weight group to nearest. It
makes a twin of a model too large to run GPTQ on within a rehearsal, and the test checkpoint of
`load_quantized` for published folders.

    python -m training.rehearsal --shape qwen3-0.6b --texts ../shared/data/math500_test.jsonl --out runs/rehearsal/qwen3-0.6b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Sequence

import torch

from inference.decoding.shapes import QWEN3_SHAPES, qwen3_config
from inference.errors import RescueError
from inference.storage import folder_written_atomically
from training.tokenizer import CHAT_TEMPLATE, IM_END, PAD_TOKEN, THINK_CLOSE, THINK_OPEN

QWEN3_ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", THINK_OPEN, THINK_CLOSE,
]
"""Qwen3's added tokens in id order (151643 .. 151668 there). All but the last four are special
(dropped by `skip_special_tokens`); the tool and think markers stay in decoded text, as in Qwen3."""

_NOT_SPECIAL = {"<tool_response>", "</tool_response>", "<tool_call>", "</tool_call>", THINK_OPEN, THINK_CLOSE}

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
"""The pre-tokenizer split of Qwen2/Qwen3's tokenizer.json (digits one at a time)."""


def math500_texts(path: str | Path) -> list[str]:
    """Problem and solution texts of a MATH-500 JSONL file (the tokenizer's training corpus)."""
    path = Path(path)
    texts = []
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise RescueError(f"{path}: cannot read the tokenizer's training texts ({error.strerror})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise RescueError(f"{path}: line {number} is not JSON") from None
        texts += [str(row[key]) for key in ("problem", "solution") if row.get(key)]
    if not texts:
        raise RescueError(f"{path}: no 'problem' or 'solution' text to train a tokenizer on")
    return texts


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192):
    """A byte-level BPE tokenizer trained on `texts`, with Qwen3's split, added tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(QWEN3_ADDED_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=IM_END,
                                        bos_token=None, unk_token=None, padding_side="left",
                                        chat_template=CHAT_TEMPLATE, model_max_length=131072)
    for token in QWEN3_ADDED_TOKENS:
        if token in _NOT_SPECIAL:
            tokenizer.add_tokens([token])
        else:
            tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
    return tokenizer


def rehearsal_config(shape: str, tokenizer, **overrides):
    """The `Qwen3Config` of a public shape, with the tokenizer's pad and end-of-turn ids."""
    return qwen3_config(shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=None, **overrides)


def build_rehearsal_model(shape: str, out: str | Path, texts: Sequence[str], tokenizer_vocab: int = 8192,
                          seed: int = 0, device: str = "cpu", dtype: str = "bfloat16", **overrides) -> dict:
    """Write a random-weight Qwen3 of `shape` and a tokenizer trained on `texts` to the folder `out`.

    `overrides` replace config values (tests shrink the shape). `tokenizer_vocab` bounds the tokenizer's
    size (a small corpus yields fewer merges); the model keeps the shape's vocabulary rows. Weights are
    drawn on `device` (a GPU
    draws the 8B shape in seconds) with `Qwen3PreTrainedModel`'s own initialisation.
    """
    from transformers import Qwen3ForCausalLM

    if shape not in QWEN3_SHAPES:
        raise RescueError(f"--shape {shape!r} is not a Qwen3 shape (expected one of {', '.join(QWEN3_SHAPES)})")
    tokenizer = train_tokenizer(texts, tokenizer_vocab)
    config = rehearsal_config(shape, tokenizer, **overrides)
    if len(tokenizer) > config.vocab_size:
        raise RescueError(f"the rehearsal tokenizer has {len(tokenizer)} tokens, more than the "
                          f"{config.vocab_size} rows of {shape}'s vocabulary")
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    parameters = sum(p.numel() for p in model.parameters())
    record = {"shape": shape, "parameters": parameters, "vocab_size": config.vocab_size, "tokenizer_tokens": len(tokenizer),
              "seed": seed, "dtype": dtype, "overrides": overrides, "weights": "random (Qwen3 initialisation)"}
    with folder_written_atomically(Path(out)) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "rehearsal.json").write_text(json.dumps(record, indent=2) + "\n")
    return {**record, "out": str(out)}


# -- a 2-bit twin in the published GPTQ layout ------------------------------------------------------

DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def round_to_nearest(weight: torch.Tensor, group_size: int, bits: int = 2):
    """Symmetric round-to-nearest codes of `weight` [out, in] per group of `group_size` inputs, as
    published 2-bit GPTQ checkpoints store them (`sym: true`: every zero point is 2**(bits-1)).

    Returns (codes [in, out] int, zero points [in / G, out] int, scales [in / G, out] float16) with
    W[o, k] ~ (codes[k, o] - zeros[k // G, o]) * scales[k // G, o]: GPTQ's unpacked layout.
    """
    top, middle = (1 << bits) - 1, 1 << (bits - 1)
    out_features, in_features = weight.shape
    groups = weight.float().T.reshape(in_features // group_size, group_size, out_features)
    scales = (groups.abs().amax(dim=1) / middle).clamp(min=2.0**-14).half()
    codes = torch.round(groups / scales.float()[:, None] + middle).clamp(0, top)
    zeros = torch.full_like(scales, middle, dtype=torch.int32)
    return codes.reshape(in_features, out_features).int(), zeros, scales


def pack_rows(codes: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """int32 words packing 32 / bits consecutive rows of `codes` [K, N]: row i of a word in bits i*bits.."""
    per_word = 32 // bits
    K, N = codes.shape
    words = torch.zeros(K // per_word, N, dtype=torch.int64, device=codes.device)
    for i in range(per_word):
        words |= (codes[i::per_word].long() & ((1 << bits) - 1)) << (bits * i)
    words[words >= 2**31] -= 2**32  # the same 32 bits as a signed int32
    return words.to(torch.int32)


def pack_columns(codes: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """int32 words packing 32 / bits consecutive columns of `codes` [G, N] (qzeros' layout)."""
    return pack_rows(codes.T.contiguous(), bits).T.contiguous()


def write_gptq_v1_checkpoint(fp16_dir: str | Path, out: str | Path, group_size: int = 64, bits: int = 2,
                             device: str = "cpu") -> dict:
    """The 2-bit round-to-nearest twin of the model in `fp16_dir`, written to `out` as published GPTQ
    checkpoints are ("gptq" checkpoint format, v1 zero points: stored z - 1).

    Decoder linears become qweight/qzeros/scales/g_idx; embeddings, norms and the output head are copied
    in fp16 (bf16 values rounded). The tokenizer files travel with it, as in published folders.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    fp16_dir = Path(fp16_dir)
    config = json.loads((fp16_dir / "config.json").read_text())
    tensors = {}
    for path in sorted(fp16_dir.glob("*.safetensors")):
        tensors.update(load_file(path, device=device))
    quantize_config = {"bits": bits, "group_size": group_size, "desc_act": False, "sym": True, "lm_head": False,
                       "quant_method": "gptq", "checkpoint_format": "gptq", "pack_dtype": "int32",
                       "meta": {"quantizer": ["lowbit-rescue round-to-nearest"]}}
    packed = {}
    for name, tensor in tensors.items():
        stem = name.removesuffix(".weight")
        if name.endswith(".weight") and stem.split(".layers.", 1)[-1].split(".", 1)[-1] in DECODER_LINEARS:
            codes, zeros, scales = round_to_nearest(tensor, group_size, bits)
            in_features = codes.shape[0]
            packed[f"{stem}.qweight"] = pack_rows(codes, bits).cpu()
            packed[f"{stem}.qzeros"] = pack_columns(zeros - 1, bits).cpu()  # v1: zero points stored minus one
            packed[f"{stem}.scales"] = scales.cpu()
            packed[f"{stem}.g_idx"] = (torch.arange(in_features, dtype=torch.int32) // group_size)
        else:
            packed[name] = tensor.half().cpu().contiguous()
    config["quantization_config"] = quantize_config
    config["torch_dtype"] = config["dtype"] = "float16"
    with folder_written_atomically(Path(out)) as staging:
        save_file(packed, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "quantize_config.json").write_text(json.dumps(quantize_config, indent=2) + "\n")
        for extra in fp16_dir.iterdir():
            if extra.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
                shutil.copy2(extra, staging / extra.name)
    return {"out": str(out), "bits": bits, "group_size": group_size, "format": "gptq (v1 zero points)",
            "quantizer": "round to nearest"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.rehearsal", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen3-0.6b", choices=sorted(QWEN3_SHAPES))
    parser.add_argument("--texts", required=True, help="MATH-500 JSONL whose problems and solutions train the tokenizer")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary (added tokens included)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rtn-2bit", default=None, metavar="DIR",
                        help="also write a round-to-nearest 2-bit twin there, in the published GPTQ layout")
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        record = build_rehearsal_model(args.shape, args.out, math500_texts(args.texts), args.vocab_size, args.seed,
                                       args.device)
        print(json.dumps(record))
        if args.rtn_2bit:
            print(json.dumps(write_gptq_v1_checkpoint(args.out, args.rtn_2bit, args.group_size, device=args.device)))
    except RescueError as error:
        print(f"error: {error}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
