"""The embedded family's tokenizer: one token per character, plus Qwen3's chat and thinking markup.

Character tokens keep the vocabulary tiny (about 100 entries) so the embedded models stay small,
while `<|im_start|>`, `<|im_end|>`, `<think>` and `</think>` are single tokens exactly as in Qwen3,
so prompts, stop conditions and label code are shared with the real models.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
MARKUP_TOKENS = [PAD_TOKEN, IM_START, IM_END, THINK_OPEN, THINK_CLOSE]
CHARACTERS = ["\n"] + [chr(code) for code in range(32, 127)]

# Qwen3's chat template semantics: ChatML turns; the generation prompt opens the assistant turn,
# and with enable_thinking=False an empty think block is inserted so the model answers directly.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with Qwen3's markup tokens and chat template."""
    vocab = {token: index for index, token in enumerate(MARKUP_TOKENS + ["<unk>"] + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        bos_token=None,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    # As in Qwen3: the chat markers are special (skipped when decoding with skip_special_tokens),
    # the think markers are ordinary added tokens (kept in decoded text).
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.add_tokens([THINK_OPEN, THINK_CLOSE])
    return tokenizer


def save_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """Build the tokenizer and save it so `AutoTokenizer.from_pretrained(folder)` loads it."""
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(folder))
    return tokenizer
