"""Detector artifact: save/load roundtrip, and refusals (wrong model, missing or corrupt files)."""

from __future__ import annotations

import json

import pytest
import torch

from detector.artifact import CARD, WEIGHTS, DetectorError, load_detector, save_detector
from detector.features import FeatureRecipe, NormalisationStats
from detector.probe import HEADS, Probe


@pytest.fixture()
def artifact(tmp_path):
    recipe = FeatureRecipe(layers=(2, 4, 5), hidden_size=8, mean_window=16)
    torch.manual_seed(0)
    probe = Probe(recipe.feature_dim, hidden_width=6, hidden_layers=2)
    stats = NormalisationStats(mean=torch.randn(3, 8), std=torch.rand(3, 8) + 0.5)
    calibration = {"stride": 8, "patience": 2, "target_false_alarm_rate": 0.05,
                   "heads": {head: {"threshold": 0.7, "false_alarm_rate": 0.04} for head in HEADS}}
    card = {"base_model": {"name": "tiny-s", "hidden_size": 8}, "calibration": calibration,
            "training_data": [{"path": "traces", "manifest_sha256": "ab" * 32}], "metrics": {"val": {"x": 1.0}}}
    folder = save_detector(tmp_path / "detector", probe, recipe, stats, card)
    return folder, probe, recipe, stats


def test_roundtrip_gives_the_same_scores_and_card(artifact):
    folder, probe, recipe, stats = artifact
    detector = load_detector(folder, model_name="tiny-s", hidden_size=8, layers=[2, 4, 5])
    hidden, positions = torch.randn(11, 3, 8), torch.arange(11) * 8
    from detector.features import trace_features

    expected = probe.eval()(trace_features(hidden, positions, recipe, stats)).sigmoid()
    assert torch.allclose(detector.score_trace(hidden, positions), expected)
    assert detector.recipe == recipe and detector.patience == 2
    assert detector.thresholds == {head: 0.7 for head in HEADS}
    card = json.loads((folder / CARD).read_text())
    assert card["layers"] == [2, 4, 5] and card["features"]["feature_dim"] == recipe.feature_dim
    assert card["training_data"][0]["manifest_sha256"] == "ab" * 32
    assert list(card["heads"]) == list(HEADS)


@pytest.mark.parametrize("check, message", [
    ({"hidden_size": 16}, "reads hidden size 8, but the model has hidden size 16"),
    ({"layers": [-1]}, r"reads layers \[2, 4, 5\], but the model is configured with layers \[-1\]"),
    ({"model_name": "tiny-m"}, "trained for model 'tiny-s', not 'tiny-m'"),
])
def test_wrong_model_refused(artifact, check, message):
    with pytest.raises(DetectorError, match=message):
        load_detector(artifact[0], **check)


def test_missing_or_corrupt_files_refused(artifact, tmp_path):
    folder = artifact[0]
    with pytest.raises(DetectorError, match="no detector artifact here"):
        load_detector(tmp_path / "nowhere")
    weights = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(weights[:-4] + b"\0\0\0\0")
    with pytest.raises(DetectorError, match="corrupt or replaced"):
        load_detector(folder)
    (folder / WEIGHTS).unlink()
    with pytest.raises(DetectorError, match="weights.safetensors is missing"):
        load_detector(folder)
    (folder / CARD).write_text("{not json")
    (folder / WEIGHTS).write_bytes(weights)
    with pytest.raises(DetectorError, match="not a readable detector card"):
        load_detector(folder)
