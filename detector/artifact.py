"""The detector artifact: a folder with `weights.safetensors` and `card.json`, readable without this code.

weights.safetensors  the probe's state dict (`body.*`, `heads.weight` [heads, width], `heads.bias` [heads];
                     head rows in `card.probe.heads` order) and the feature normalisation statistics
                     `features.mean`, `features.std` [n_layers, hidden_size] float32.
card.json            {
                       "kind": "lowbit-rescue detector", "schema_version": 1,
                       "base_model": {name, fp16, quantized, precision, hidden_size, tokenizer_hash},
                       "layers": [...],                  configured decoder layers, stored order
                       "features": FeatureRecipe.to_dict() + "stats": where the statistics are,
                       "probe": {in_features, hidden_width, hidden_layers, heads, flops...},
                       "heads": {head: what it predicts}, "horizon": H,
                       "calibration": {"stride", "patience", "target_false_alarm_rate",
                                       "heads": {head: HeadCalibration},
                                       "policy": learned action selection (detector.policy),
                                       "rules": {"ngram": {ngram, window, min_repeats, ...},
                                                 "confidence": {window, threshold, ...} or
                                                               {window, skipped: reason}}},
                       "training_data": [{path, role, manifest_sha256, traces}],
                       "metrics": {...}, "weights_sha256": "..."
                     }

`load_detector` checks the files, their checksum, and, when given, the model the detector is meant
for (name, hidden size, layers); any problem is one line of `DetectorError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from detector.features import FeatureRecipe, NormalisationStats, StreamingFeatures, trace_features
from detector.probe import DECISION_HEADS, HEADS, Probe
from inference.errors import RescueError
from inference.storage import file_sha256, replace_atomically

WEIGHTS = "weights.safetensors"
CARD = "card.json"
KIND = "lowbit-rescue detector"
SCHEMA_VERSION = 1
HEAD_MEANINGS = {
    "loop_within_h": "the trace is inside a loop or its onset comes within the next H generated tokens",
    "fails_to_commit": "the trace will end without a committed final answer (budget, unclosed think, no answer)",
    "ends_wrong": "the trace will not end with a correct final answer",
    "answer_correct": "the candidate answer stated just before this position is correct",
    "step_wrong": "the arithmetic step this token closes has a wrong result",
}


class DetectorError(RescueError):
    """A detector artifact is missing, corrupt, or made for another model."""


@dataclass
class Detector:
    """A loaded detector: the probe, its feature recipe and statistics, and the card."""

    probe: Probe
    recipe: FeatureRecipe
    stats: NormalisationStats
    card: dict[str, Any]

    @property
    def heads(self) -> tuple[str, ...]:
        """The probe's heads, in output order (two-head detectors predate `DECISION_HEADS`)."""
        return self.probe.head_names

    @property
    def has_decision_heads(self) -> bool:
        """Whether learned action selection can run: both decision heads and a calibrated policy."""
        policy = self.card["calibration"].get("policy") or {}
        return all(h in self.heads for h in DECISION_HEADS) and bool(policy.get("budgets"))

    @property
    def thresholds(self) -> dict[str, float]:
        return {head: entry["threshold"] for head, entry in self.card["calibration"]["heads"].items()}

    @property
    def patience(self) -> int:
        return int(self.card["calibration"]["patience"])

    def streaming(self) -> StreamingFeatures:
        """Step-by-step features for one batch of sequences decoded together (see `StreamingFeatures`)."""
        return StreamingFeatures(self.recipe, self.stats)

    @torch.no_grad()
    def score_trace(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Probabilities [captured, heads] (`heads` order) for one trace's states [captured, n_layers, hidden_size]."""
        self.probe.eval()
        return self.probe(trace_features(hidden, positions, self.recipe, self.stats)).sigmoid()


def save_detector(folder: str | Path, probe: Probe, recipe: FeatureRecipe, stats: NormalisationStats,
                  card: dict[str, Any]) -> Path:
    """Write weights and card (each atomically; the card last, so a folder with a card is complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().cpu().contiguous() for name, value in probe.state_dict().items()}
    tensors["features.mean"] = stats.mean.contiguous()
    tensors["features.std"] = stats.std.contiguous()
    temporary = folder / (WEIGHTS + ".tmp")
    save_file(tensors, str(temporary), metadata={"kind": KIND})
    replace_atomically(temporary, folder / WEIGHTS)
    full_card = {
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        **card,
        "layers": list(recipe.layers),
        "features": {**recipe.to_dict(), "stats": {"file": WEIGHTS, "mean": "features.mean", "std": "features.std"}},
        "probe": {**card.get("probe", {}), **probe.architecture()},
        "heads": {head: HEAD_MEANINGS[head] for head in probe.head_names},
        "weights_sha256": file_sha256(folder / WEIGHTS),
    }
    temporary = folder / (CARD + ".tmp")
    temporary.write_text(json.dumps(full_card, indent=2) + "\n")
    replace_atomically(temporary, folder / CARD)
    return folder


def load_detector(folder: str | Path, model_name: str | None = None, hidden_size: int | None = None,
                  layers: Sequence[int] | None = None) -> Detector:
    """Read a detector artifact, refusing one that is incomplete, corrupt, or for another model."""
    folder = Path(folder)
    card_path, weights_path = folder / CARD, folder / WEIGHTS
    if not folder.is_dir():
        raise DetectorError(f"{folder}: no detector artifact here; train one with `rescue train`")
    for path in (card_path, weights_path):
        if not path.is_file():
            raise DetectorError(f"{folder}: detector artifact is incomplete ({path.name} is missing)")
    try:
        card = json.loads(card_path.read_text())
        if card.get("kind") != KIND:
            raise KeyError("kind")
        recipe = FeatureRecipe.from_dict(card["features"])
        architecture = card["probe"]
        calibration = card["calibration"]
        base = card["base_model"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise DetectorError(f"{card_path}: not a readable detector card ({type(error).__name__}: {error})") from None
    if card.get("schema_version") != SCHEMA_VERSION:
        raise DetectorError(f"{card_path}: schema version {card.get('schema_version')}, this code reads {SCHEMA_VERSION}")
    if file_sha256(weights_path) != card.get("weights_sha256"):
        raise DetectorError(f"{weights_path}: corrupt or replaced (checksum does not match the card)")

    if model_name is not None and base.get("name") != model_name:
        raise DetectorError(f"{folder}: detector trained for model {base.get('name')!r}, not {model_name!r}")
    if hidden_size is not None and recipe.hidden_size != hidden_size:
        raise DetectorError(f"{folder}: detector reads hidden size {recipe.hidden_size}, but the model has "
                            f"hidden size {hidden_size}")
    if layers is not None and list(recipe.layers) != list(layers):
        raise DetectorError(f"{folder}: detector reads layers {list(recipe.layers)}, but the model is configured "
                            f"with layers {list(layers)}")

    try:
        tensors = load_file(str(weights_path))
        stats = NormalisationStats(mean=tensors.pop("features.mean"), std=tensors.pop("features.std"))
        probe = Probe(int(architecture["in_features"]), int(architecture["hidden_width"]),
                      max(1, int(architecture["hidden_layers"])), heads=architecture.get("heads", HEADS[:2]))
        probe.load_state_dict(tensors)
    except (SafetensorError, KeyError, RuntimeError, ValueError, OSError) as error:
        raise DetectorError(f"{weights_path}: weights do not match the card ({type(error).__name__})") from None
    expected = (len(recipe.layers), recipe.hidden_size)
    if tuple(stats.mean.shape) != expected or probe.in_features != recipe.feature_dim:
        raise DetectorError(f"{folder}: card and weights disagree on the feature shape")
    if sorted(calibration.get("heads", {})) != sorted(probe.head_names):
        raise DetectorError(f"{card_path}: calibration lacks thresholds for heads {list(probe.head_names)}")
    probe.eval()
    return Detector(probe=probe, recipe=recipe, stats=stats, card=card)
