"""Problems and the prompts built from them.

A `Problem` is what every benchmark loader yields and every runner consumes; the prompt is the
question plus the usual math instruction, rendered with the model's own chat template in thinking
mode (Qwen3's `enable_thinking=True`).
"""

from __future__ import annotations

from dataclasses import dataclass

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: a stable id (same across runs and machines), the question, the gold answer.

    `solution` is a worked solution where the benchmark has one (GPTQ calibrates on prompt + solution,
    so the activations it sees include reasoning, not only questions).
    """

    id: str
    question: str
    answer: str
    benchmark: str
    solution: str | None = None


def render_prompt(tokenizer, question: str, enable_thinking: bool = True) -> str:
    """The chat-formatted prompt text for one question, ending where the assistant starts to think."""
    messages = [{"role": "user", "content": f"{question}\n{MATH_INSTRUCTION}"}]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )
