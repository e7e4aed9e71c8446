"""The probe: a small network over one position's features with its heads, and its LightningModule.

Heads (logits; `HEADS` order):
- `loop_within_h`: the trace is inside a loop, or its onset comes within the next H tokens;
- `fails_to_commit`: the trace will not commit to a final answer (a trace-level outcome);
- `ends_wrong`: the trace will not end with a correct final answer (a trace-level outcome, known at
  every position): the risk the learned trigger acts on when nothing loops;
- `answer_correct`: the candidate answer stated just before this position will be correct; a target
  only at the capture position that follows a stated candidate (NaN elsewhere: no loss, no metric);
- `step_wrong`: the arithmetic step this token closes has a wrong result; a target only at the tokens
  closing a step (`training.labels`, `steps`), NaN elsewhere.

Detectors trained before the later heads existed (`DECISION_HEADS`, `step_wrong`) keep the heads they
have: the probe is built with the heads its card names.

Class imbalance: both targets are rare at the position level (loops are a minority of traces and
cover only their tails). Each head's BCE-with-logits loss weighs its positive positions by
`pos_weight = negatives / positives`, counted on the training split (`TraceDataModule` counts them
while fitting the normalisation statistics), clipped to [1, MAX_POS_WEIGHT]: the loss then treats
both classes as equally frequent, without resampling (which a streaming reader cannot do cheaply).
Model selection and thresholds use ranking metrics (AUPRC, and calibrated false-alarm rates), which
the weighting does not bias.
"""

from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision

HEADS = ("loop_within_h", "fails_to_commit", "ends_wrong", "answer_correct", "step_wrong")
ALARM_HEADS = ("loop_within_h", "fails_to_commit", "ends_wrong")
"""Heads whose sustained score raises an alarm; `answer_correct` only ranks candidates, `step_wrong` only
judges the arithmetic step just closed."""
DECISION_HEADS = ("ends_wrong", "answer_correct")
"""The heads learned action selection needs (absent from two-head detectors)."""
MAX_POS_WEIGHT = 100.0


class Probe(nn.Module):
    """Features [batch, in_features] -> logits [batch, len(heads)] (`heads` order, default `HEADS`).

    `hidden_width` 0 makes the body the identity (linear heads); otherwise the body is
    `hidden_layers` (1 or 2) Linear + GELU + Dropout layers of that width.
    """

    def __init__(self, in_features: int, hidden_width: int = 64, hidden_layers: int = 1, dropout: float = 0.0,
                 heads: Sequence[str] = HEADS):
        super().__init__()
        unknown = [head for head in heads if head not in HEADS]
        if unknown:
            raise ValueError(f"unknown probe heads {unknown}; known: {list(HEADS)}")
        self.head_names = tuple(heads)
        if hidden_layers not in (1, 2):
            raise ValueError(f"hidden_layers must be 1 or 2, got {hidden_layers}")
        self.in_features, self.hidden_width, self.hidden_layers = in_features, hidden_width, hidden_layers
        layers: list[nn.Module] = []
        width = in_features
        if hidden_width:
            for _ in range(hidden_layers):
                layers += [nn.Linear(width, hidden_width), nn.GELU(), nn.Dropout(dropout)]
                width = hidden_width
        self.body = nn.Sequential(*layers)
        self.heads = nn.Linear(width, len(self.head_names))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.heads(self.body(features))

    def architecture(self) -> dict:
        return {"in_features": self.in_features, "hidden_width": self.hidden_width,
                "hidden_layers": self.hidden_layers if self.hidden_width else 0, "heads": list(self.head_names)}


def probe_flops_per_step(probe: Probe, mean_window: int = 0) -> int:
    """Floating-point operations to score one decoding step: 2 per multiply-add of every linear layer,
    plus standardising the new states (2 per value) and, with a running mean, updating it (about 3
    per value: add the newest state, subtract the one leaving the window, scale)."""
    matmuls = sum(2 * m.in_features * m.out_features for m in probe.modules() if isinstance(m, nn.Linear))
    raw_values = probe.in_features // (2 if mean_window else 1)
    return matmuls + 2 * raw_values + (3 * raw_values if mean_window else 0)


def base_model_flops_per_token(parameters: int) -> int:
    """The usual estimate of a decoder's forward cost per generated token: 2 x parameters
    (attention over the context comes on top and grows with its length)."""
    return 2 * parameters


def flops_comparison(probe: Probe, mean_window: int, base_parameters: int | None) -> dict:
    """The probe's FLOPs per step next to the base model's per token, and their ratio."""
    probe_flops = probe_flops_per_step(probe, mean_window)
    record = {"probe_parameters": sum(p.numel() for p in probe.parameters()), "probe_flops_per_step": probe_flops}
    if base_parameters:
        base = base_model_flops_per_token(base_parameters)
        record.update(base_model_parameters=base_parameters, base_model_flops_per_token=base,
                      probe_share_of_base=probe_flops / base)
    return record


class ProbeModule(L.LightningModule):
    """Trains a `Probe` on batches `(features [B, F] float32, targets [B, len(HEADS)] float32)`.

    Loss: the sum over heads of BCE-with-logits with per-head `pos_weight` (module docstring), each the
    mean over the positions where that head has a target (NaN targets are skipped).
    Logged: `train/loss`, `val/loss`, per-head losses, and per head `val/<head>/auroc` and
    `val/<head>/auprc` (torchmetrics AUROC and average precision, over the whole validation epoch).
    """

    def __init__(self, in_features: int, hidden_width: int = 64, hidden_layers: int = 1, dropout: float = 0.1,
                 learning_rate: float = 1e-3, weight_decay: float = 1e-4,
                 pos_weight: Sequence[float] = (1.0,) * len(HEADS), untrained: Sequence[str] = ()):
        super().__init__()
        self.save_hyperparameters()
        self.probe = Probe(in_features, hidden_width, hidden_layers, dropout)
        clipped = [min(max(float(w), 1.0), MAX_POS_WEIGHT) for w in pos_weight]
        self.register_buffer("pos_weight", torch.tensor(clipped, dtype=torch.float32))
        # Heads without both classes (see TraceDataModule.untrained_heads) get no loss and no metrics.
        self.register_buffer("head_mask", torch.tensor([0.0 if h in untrained else 1.0 for h in HEADS]))
        self.judged = [index for index, head in enumerate(HEADS) if head not in untrained]
        self.val_auroc = nn.ModuleList([BinaryAUROC() for _ in HEADS])
        self.val_auprc = nn.ModuleList([BinaryAveragePrecision() for _ in HEADS])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.probe(features)

    def _losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-head mean losses [len(HEADS)] over the positions with a target."""
        defined = ~targets.isnan()
        per_element = nn.functional.binary_cross_entropy_with_logits(
            logits, targets.nan_to_num(0.0), pos_weight=self.pos_weight, reduction="none") * defined
        return per_element.sum(dim=0) / defined.sum(dim=0).clamp(min=1) * self.head_mask

    def training_step(self, batch, batch_index):
        features, targets = batch
        losses = self._losses(self(features), targets)
        loss = losses.sum()
        size = features.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for head, value in zip(HEADS, losses):
            self.log(f"train/{head}/loss", value, batch_size=size)
        return loss

    def validation_step(self, batch, batch_index):
        features, targets = batch
        logits = self(features)
        losses = self._losses(logits, targets)
        size = features.shape[0]
        self.log("val/loss", losses.sum(), prog_bar=True, batch_size=size)
        # Probabilities, not logits: torchmetrics decides per batch whether to apply a sigmoid.
        scores = logits.sigmoid()
        for index, head in enumerate(HEADS):
            self.log(f"val/{head}/loss", losses[index], batch_size=size)
            defined = ~targets[:, index].isnan()
            if index not in self.judged or not defined.any():
                continue
            self.val_auroc[index].update(scores[defined, index], targets[defined, index].long())
            self.val_auprc[index].update(scores[defined, index], targets[defined, index].long())

    def on_validation_epoch_end(self):
        for index, head in enumerate(HEADS):
            if index not in self.judged:
                continue
            self.log(f"val/{head}/auroc", self.val_auroc[index].compute(), prog_bar=index == 0)
            self.log(f"val/{head}/auprc", self.val_auprc[index].compute(), prog_bar=index == 0)
            self.val_auroc[index].reset()
            self.val_auprc[index].reset()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.learning_rate,
                                 weight_decay=self.hparams.weight_decay)
