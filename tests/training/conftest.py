"""Fixtures of the training tests: a small byte-level BPE (as Qwen3's tokenizer is) trained here on
reasoning-like text, so labels meet multi-character tokens without a download."""

from __future__ import annotations

from pathlib import Path

import pytest

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
