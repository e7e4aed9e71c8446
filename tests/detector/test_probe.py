"""Probe and ProbeModule: shapes, class-imbalance weighting, learning a planted signal, FLOPs."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from detector.features import FeatureRecipe, StatsAccumulator, running_mean, trace_features
from detector.probe import HEADS, MAX_POS_WEIGHT, Probe, ProbeModule, flops_comparison, probe_flops_per_step


def test_linear_and_mlp_probes_give_one_logit_per_head():
    features = torch.randn(5, 12)
    for width, layers in ((0, 1), (8, 1), (8, 2)):
        assert Probe(12, width, layers)(features).shape == (5, len(HEADS))
    assert len(Probe(12, 0).body) == 0


def test_flops_per_step_counts_every_multiply_add():
    probe = Probe(40, hidden_width=8, hidden_layers=2)
    matmuls = 2 * (40 * 8 + 8 * 8 + 8 * len(HEADS))
    assert probe_flops_per_step(probe) == matmuls + 2 * 40
    assert probe_flops_per_step(probe, mean_window=16) == matmuls + 5 * 20
    record = flops_comparison(probe, 0, base_parameters=1_000_000)
    assert record["base_model_flops_per_token"] == 2_000_000
    assert record["probe_share_of_base"] == record["probe_flops_per_step"] / 2_000_000


def test_pos_weight_clipped_to_at_least_one_and_at_most_the_cap():
    module = ProbeModule(4, pos_weight=(0.5, 1e6))
    assert module.pos_weight.tolist() == [1.0, MAX_POS_WEIGHT]


def test_module_learns_planted_signal_and_logs_val_metrics():
    torch.manual_seed(0)
    features = torch.randn(2000, 10)
    targets = torch.stack([(features[:, 0] > 1.0), (features[:, 1] > 0.5), (features[:, 2] > 0.0),
                           (features[:, 3] > 0.0), (features[:, 5] > 0.3)], dim=1).float()
    targets[features[:, 4] > 0.5, 3] = float("nan")  # answer_correct has targets at some positions only
    targets[features[:, 6] < -0.2, 4] = float("nan")  # step_wrong: at step-closing tokens only
    loader = DataLoader(TensorDataset(features, targets), batch_size=200, shuffle=True)
    val = DataLoader(TensorDataset(features[:500], targets[:500]), batch_size=250)
    negatives = (1 - targets).nansum(0) / targets.nansum(0)
    module = ProbeModule(10, hidden_width=16, learning_rate=1e-2, pos_weight=negatives.tolist())
    trainer = L.Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, loader, val)
    for head in HEADS:
        assert trainer.callback_metrics[f"val/{head}/auroc"] > 0.95
        assert 0 < trainer.callback_metrics[f"val/{head}/auprc"] <= 1


def test_running_mean_averages_the_last_grid_states_only():
    # Stride 4: rows at 0, 4, 8 are on the grid; 9 and 10 (a dense window) are not.
    positions = torch.tensor([0, 4, 8, 9, 10, 12])
    states = torch.arange(6, dtype=torch.float32).reshape(6, 1, 1)
    means = running_mean(states, positions, stride=4, count=2).flatten().tolist()
    assert means == [0.0, 0.5, 1.5, 1.5, 1.5, 3.5]


def test_features_are_standardised_states_then_running_mean():
    recipe = FeatureRecipe(layers=(0, -1), hidden_size=3, mean_window=4, stride=2)
    hidden = torch.randn(7, 2, 3) * 5 + 2
    accumulator = StatsAccumulator(2, 3)
    accumulator.add(hidden[:3])
    accumulator.add(hidden[3:])
    stats = accumulator.stats()
    features = trace_features(hidden.half(), torch.arange(7) * 2, recipe, stats)
    assert features.shape == (7, recipe.feature_dim) == (7, 12)
    assert torch.allclose(features[:, :6].mean(0), torch.zeros(6), atol=1e-2)
    assert torch.allclose(features[:, 6:][0], features[:, :6][0])


def test_streaming_features_equal_trace_features_step_by_step():
    from detector.features import NormalisationStats, StreamingFeatures

    recipe = FeatureRecipe(layers=(1, 2), hidden_size=4, mean_window=12, stride=4)
    stats = NormalisationStats(mean=torch.randn(2, 4), std=torch.rand(2, 4) + 0.5)
    hidden = torch.randn(2, 30, 2, 4)  # two sequences decoded together, every position kept
    streaming = StreamingFeatures(recipe, stats)
    stepped = torch.stack([streaming.step(t, hidden[:, t]) for t in range(30)], dim=1)
    for row in range(2):
        expected = trace_features(hidden[row], torch.arange(30), recipe, stats)
        assert torch.allclose(stepped[row], expected, atol=1e-5)
