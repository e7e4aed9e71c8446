"""Training an embedded family model (tiny-s/m/l) on synthetic reasoning traces, with Lightning.

The model is a plain `Qwen3ForCausalLM` built from a `Qwen3Config` (so every tool that serves real
Qwen3 checkpoints serves these too), trained on the chat-formatted arithmetic traces of
`training.arith` with the loss on the assistant's part only (the prompt is context, not target).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Qwen3Config, Qwen3ForCausalLM

from inference.config import PretrainConfig
from inference.prompts import render_prompt

IGNORE_INDEX = -100


def family_config(spec: PretrainConfig, tokenizer) -> Qwen3Config:
    """The Qwen3 architecture of one family size."""
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_length,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


class TraceDataset(Dataset):
    """Tokenized (prompt + trace + <|im_end|>) examples with labels masked over the prompt."""

    def __init__(self, questions, traces, tokenizer, max_length: int):
        self.examples = []
        for question, trace in zip(questions, traces):
            prompt_ids = tokenizer(render_prompt(tokenizer, question)).input_ids
            completion_ids = tokenizer(trace + tokenizer.eos_token).input_ids
            ids = (prompt_ids + completion_ids)[:max_length]
            labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
            self.examples.append((torch.tensor(ids), torch.tensor(labels)))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


def collate(pad_token_id: int):
    def pad(batch):
        longest = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, (ids, target) in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            labels[row, : len(ids)] = target
            mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    return pad


class ArithTraceData(L.LightningDataModule):
    """Train/val traces of the synthetic task (disjoint splits by construction)."""

    def __init__(self, tokenizer, spec: PretrainConfig, num_workers: int = 0):
        super().__init__()
        self.tokenizer = tokenizer
        self.spec = spec
        self.num_workers = num_workers

    def setup(self, stage: str | None = None) -> None:
        from training.arith import arith_dataset, task_spec

        if hasattr(self, "train_set"):
            return
        name = self.spec.task
        task = task_spec(name, self.spec.trace_style())
        train = arith_dataset("train", self.spec.train_problems, seed=self.spec.seed, spec=task, task=name)
        val = arith_dataset("val", self.spec.val_problems, seed=self.spec.seed, spec=task, task=name)
        self.train_set = TraceDataset(train["question"], train["trace"], self.tokenizer, self.spec.max_length)
        self.val_set = TraceDataset(val["question"], val["trace"], self.tokenizer, self.spec.max_length)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.spec.batch_size, shuffle=True, drop_last=True,
                          collate_fn=collate(self.tokenizer.pad_token_id), num_workers=self.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.spec.batch_size,
                          collate_fn=collate(self.tokenizer.pad_token_id), num_workers=self.num_workers)


class ReasonerLM(L.LightningModule):
    """Next-token training of a Qwen3ForCausalLM with AdamW, warm-up and cosine decay."""

    def __init__(self, config: Qwen3Config, spec: PretrainConfig, total_steps: int):
        super().__init__()
        self.model = Qwen3ForCausalLM(config)
        self.spec = spec
        self.total_steps = total_steps

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.spec.learning_rate, betas=(0.9, 0.95),
        )
        warmup, total = self.spec.warmup_steps, max(self.total_steps, 1)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / max(warmup, 1)
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
