"""Shared fixtures: a tiny random Qwen3 with the embedded tokenizer, built once per session, no downloads."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def benchmark_script(name: str):
    """A script of benchmarks/ as a module (the folder is not a package), e.g. benchmark_script("rehearsal")."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_tiny_qwen3(folder: Path, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """Save a random Qwen3ForCausalLM plus the embedded tokenizer into `folder`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from training.tokenizer import save_tokenizer

    tokenizer = save_tokenizer(folder)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory) -> Path:
    """A second random model with the same tokenizer and shape (a stand-in for the other precision)."""
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3-other"), seed=1)


@pytest.fixture(scope="session")
def arith_jsonl(tmp_path_factory) -> Path:
    """A 4-problem local benchmark file in GSM8K's format."""
    path = tmp_path_factory.mktemp("bench") / "four.jsonl"
    rows = [
        {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
        {"question": "What is 7 * 6?", "answer": "7 * 6 = 42\n#### 42"},
        {"question": "What is 10 - 4?", "answer": "10 - 4 = 6\n#### 6"},
        {"question": "What is 9 + 9?", "answer": "9 + 9 = 18\n#### 18"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# A small byte-level BPE (as Qwen3's tokenizer is) trained here on reasoning-like text, so labels meet
# multi-character tokens without a download.
EOS = "<|im_end|>"
CORPUS = [
    "<think>\nOkay, so I need to find the remainder. Let me try to break it down step by step.\n",
    "Wait, let me check that again. So, the equation is (a -3)^2 + (b +3)^2 + c^2 = R^2.\n",
    "Therefore, the ratio is 2:3:3.0, which is 200:240:300. Thus, the answer is 25.\n",
    "Differentiating with respect to x gives 2x - 2 = 0, so x = 1. Hmm, that seems right.\n",
    "</think>\n\nThe answer is \\boxed{25}.",
]


def train_bpe(folder: Path | None = None):
    """A byte-level BPE with a few hundred merges over `CORPUS` and `<|im_end|>` as EOS; saved to
    `folder` (loadable with `AutoTokenizer.from_pretrained`) when one is given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[EOS])
    backend.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="session")
def bpe():
    return train_bpe()


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bpe-tokenizer")
    train_bpe(folder)
    return folder


@contextlib.contextmanager
def _interpreted_copy(name: str, kernel: str):
    """A private copy of module `name` whose Triton kernels run in Triton's CPU interpreter.

    @triton.jit reads TRITON_INTERPRET when it wraps a kernel, not when triton is imported, so
    executing the module with the variable set works even after other tests imported triton; a
    separate module object leaves the module as other tests see it untouched. The variable stays set
    while the tests run because the interpreter consults it at launch too. `kernel` names one of the
    module's kernels, checked to be interpreted.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        spec = importlib.util.find_spec(name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert type(getattr(module, kernel)).__name__ == "InterpretedFunction"
        yield module


@pytest.fixture(scope="session")
def interpreted_copy():
    """The context manager `_interpreted_copy(name, kernel)`: the project's Triton modules in Triton's CPU
    interpreter, for module-scoped fixtures of the kernel tests."""
    return _interpreted_copy
