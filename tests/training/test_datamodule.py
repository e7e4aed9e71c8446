"""TraceDataModule: split by problem, targets, streaming batches, and the trace sets it refuses.

`write_planted_trace_set` (also used by test_fit.py) writes a labeled synthetic trace set whose hidden
states carry a planted signal: a direction in layer 1 while `loop_within_h` holds, another in layer 0
along every trace that fails to commit, a third in layer 0 along every trace that ends wrong, and a
fourth in layer 1, signed by the candidate's correctness, at the captured position after each trace's
one stated candidate answer; its top-token probabilities dip to 0.3 every 8 tokens until
4 tokens after a loop's onset, and stay >= 0.97 from there. `downgrade_to_schema_1` rewrites one as a schema-1 trace set (no `top_prob`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.probe import HEADS
from inference.config import load_config
from inference.storage import file_sha256
from training.datamodule import TraceDataModule
from training.labels import TraceLabels, position_targets
from training.traces import LABELS, MANIFEST, Manifest, Trace, TraceSetError, write_shard

HIDDEN = 16
LAYERS = [0, 1]
STRIDE = 4
HORIZON = 16


def synthetic_config(tmp_path: Path, **overrides):
    values = {"model.name": "synthetic", "model.fp16": str(tmp_path / "no-such-model"), "probe.layers": LAYERS,
              "labels.horizon": HORIZON, "wandb.mode": "disabled", "output_dir": str(tmp_path / "runs"),
              "detector.batch_size": 128, "detector.val_fraction": 0.25, **overrides}
    return load_config("tiny-s", values)


def write_planted_trace_set(folder: Path, problems: int = 40, samples: int = 2, seed: int = 0,
                            hidden_size: int = HIDDEN, signal: float = 2.0, loops: bool = True,
                            name: str = "synthetic", labels: bool = True, fails: bool = True,
                            wrong: bool = True, steps: bool = True) -> Path:
    """A labeled trace set: ~30% of traces loop (onset at a random position), ~20% fail to commit, and
    (with `wrong`) ~40% of those that commit end wrong; each states one candidate, correct iff the trace is."""
    rng = np.random.default_rng(seed)
    fails_allowed, steps_allowed = fails, steps
    # A second generator for top_prob, so the rest of the planted data does not depend on it.
    confidence_rng = np.random.default_rng(seed + 10_000)
    folder.mkdir(parents=True, exist_ok=True)
    # The same "model" for every seed: the planted directions do not depend on it.
    directions = np.random.default_rng(1234).standard_normal((5, hidden_size)).astype(np.float32)
    loop_direction, commit_direction, wrong_direction, answer_direction, step_direction = directions
    step_rng = np.random.default_rng(seed + 30_000)  # the arithmetic steps' data, also from its own generator
    # The correctness heads' data from a generator of their own, so the rest does not depend on it.
    answer_rng = np.random.default_rng(seed + 20_000)
    traces, records = [], {}
    for index in range(problems * samples):
        length = int(rng.integers(100, 200))
        loop_onset = int(rng.integers(20, length - 20)) if loops and rng.random() < 0.3 else None
        fails = bool(rng.random() < 0.2) and fails_allowed
        correct = not fails and (bool(answer_rng.random() < 0.6) or not wrong)
        candidate = int(answer_rng.integers(10, length - 10))
        # Three arithmetic steps closing on captured positions, each wrong with probability 0.3.
        closing = sorted(STRIDE * step_rng.choice(np.arange(2, (length - 1) // STRIDE), 3, replace=False))
        steps = tuple((int(token), bool(step_rng.random() < 0.3), int(token) - 2) for token in closing)
        steps = steps if steps_allowed else ()
        trace_labels = TraceLabels(length=length, loop_onset=loop_onset, loop_period=None if loop_onset is None else 10,
                                   budget_exhausted=fails, unclosed_think=fails, committed=not fails,
                                   first_candidate_pos=None, delayed_commitment=False, correct=correct,
                                   fails_to_commit=fails, candidates=((candidate, correct),),
                                   steps=steps)
        positions = np.arange(0, length, STRIDE)
        hidden = rng.standard_normal((len(positions), len(LAYERS), hidden_size)).astype(np.float32)
        looping, _ = position_targets(trace_labels, HORIZON)
        hidden[:, 1] += signal * looping[positions, None] * loop_direction
        hidden[:, 0] += signal * fails * commit_direction
        hidden[:, 0] += signal * (not correct) * wrong_direction
        hidden[np.searchsorted(positions, candidate), 1] += signal * (1 if correct else -1) * answer_direction
        for token, step_wrong, _ in steps:
            hidden[np.searchsorted(positions, token), 1] += signal * (1 if step_wrong else -1) * step_direction
        # Confident text with an uncertain token every 8 (a computed digit), until a loop sets in.
        top_prob = confidence_rng.uniform(0.5, 1.0, length)
        top_prob[::8] = 0.3
        if loop_onset is not None:
            top_prob[loop_onset + 4 :] = confidence_rng.uniform(0.97, 1.0, length - loop_onset - 4)
        trace_id = f"p{index // samples}#{index % samples}"
        traces.append(Trace(id=trace_id, problem_id=f"p{index // samples}", sample=index % samples,
                            prompt_ids=[1, 2, 3], generated_ids=rng.integers(3, 50, length).tolist(),
                            finish_reason="budget" if fails else "eos", answer=None if fails else "1", gold="1",
                            correct=correct, wall_seconds=0.0, text="", positions=torch.from_numpy(positions),
                            hidden=torch.from_numpy(hidden), top_prob=torch.from_numpy(top_prob).float()))
        records[trace_id] = trace_labels.to_dict()
    entries = [write_shard(folder, shard, traces[start : start + 16], torch.float16)
               for shard, start in enumerate(range(0, len(traces), 16))]
    identity = {"kind": "lowbit-rescue trace set",
                "model": {"name": name, "fp16": "synthetic", "quantized": None, "precision": "2bit",
                          "hidden_size": hidden_size},
                "tokenizer_hash": "synthetic", "layers": LAYERS, "sampling": {"budget": 256},
                "capture": {"stride": STRIDE, "window": 0}}
    manifest = Manifest(identity=identity, shards=entries, planned_shards=len(entries), complete=True)
    (folder / MANIFEST).write_text(manifest.to_json())
    if labels:
        (folder / LABELS).write_text(json.dumps({"params": {"horizon": HORIZON}, "traces": records}))
    return folder


def downgrade_to_schema_1(folder: Path) -> Path:
    """Rewrite a trace set as schema version 1 wrote it: shards without `top_prob`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    manifest = Manifest.from_file(folder / MANIFEST)
    for entry in manifest.shards:
        path = folder / entry.file
        with safe_open(str(path), framework="pt") as handle:
            metadata = {**handle.metadata(), "schema_version": "1"}
            tensors = {name: handle.get_tensor(name) for name in handle.keys() if name != "top_prob"}
        save_file(tensors, str(path), metadata=metadata)
        entry.sha256, entry.bytes = file_sha256(path), path.stat().st_size
    manifest.schema_version = 1
    (folder / MANIFEST).write_text(manifest.to_json())
    return folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return write_planted_trace_set(tmp_path_factory.mktemp("planted"))


def test_split_by_problem_keeps_every_problem_on_one_side(planted, tmp_path):
    data = TraceDataModule(synthetic_config(tmp_path), planted)
    data.setup()
    train, val = data.problem_ids("train"), data.problem_ids("val")
    assert train and val and not train & val
    assert len(train | val) == 40
    assert data.counts["train"]["traces"] + data.counts["val"]["traces"] == 80
    assert data.counts["val"]["traces"] == 2 * len(val)  # both samples of a held-out problem


def test_batches_cover_every_position_once_with_position_targets(planted, tmp_path):
    data = TraceDataModule(synthetic_config(tmp_path), planted)
    data.setup()
    for split, loader in (("train", data.train_dataloader()), ("val", data.val_dataloader())):
        batches = list(loader)
        assert all(f.shape[1] == data.recipe.feature_dim == 2 * len(LAYERS) * HIDDEN for f, _ in batches)
        targets = torch.cat([t for _, t in batches])
        assert targets.shape == (data.counts[split]["positions"], len(HEADS))
        for index, head in enumerate(HEADS):
            defined = ~targets[:, index].isnan()  # answer_correct: only where a candidate was just stated
            assert int(defined.sum()) == data.counts[split][f"{head}_positions"]
            assert int(targets[defined, index].sum()) == data.counts[split][f"{head}_positives"]
        assert data.counts[split]["answer_correct_positions"] == data.counts[split]["traces"]
    example = next(data.traces("val"))
    looping, fails = position_targets(example.labels, HORIZON)
    assert torch.equal(example.targets[:, 0].bool(), torch.from_numpy(looping[example.positions.numpy()]))
    assert bool(example.targets[0, 1]) == fails


def test_validation_batches_are_the_traces_features_in_trace_order(planted, tmp_path):
    """The loaders write a shard's features into one buffer; the values are bit for bit those of
    `trace_features` on each trace, the examples calibration reads."""
    data = TraceDataModule(synthetic_config(tmp_path), planted)
    data.setup()
    batched = torch.cat([f for f, _ in data.val_dataloader()])
    examples = list(data.traces("val"))
    assert torch.equal(batched, torch.cat([e.features for e in examples]))
    assert torch.equal(torch.cat([t for _, t in data.val_dataloader()]).nan_to_num(-1),
                       torch.cat([e.targets for e in examples]).nan_to_num(-1))


def test_normalisation_statistics_fitted_on_training_split_only(planted, tmp_path):
    data = TraceDataModule(synthetic_config(tmp_path), planted)
    data.setup()
    train = torch.cat([e.features for e in data.traces("train")])
    raw = train[:, : len(LAYERS) * HIDDEN]
    assert raw.mean(dim=0).abs().max() < 1e-2
    assert (raw.std(dim=0) - 1).abs().max() < 1e-2


def test_top_prob_reaches_the_examples_and_schema_1_sets_still_train(planted, tmp_path):
    data = TraceDataModule(synthetic_config(tmp_path), planted)
    data.setup()
    example = next(data.traces("val"))
    assert example.top_prob.dtype == torch.float32 and example.top_prob.shape == example.generated_ids.shape
    old = downgrade_to_schema_1(write_planted_trace_set(tmp_path / "old", problems=8))
    data = TraceDataModule(synthetic_config(tmp_path), old)
    data.setup()
    assert all(e.top_prob is None for e in data.traces("val"))


def test_separate_validation_set(planted, tmp_path):
    val = write_planted_trace_set(tmp_path / "val", problems=20, seed=1)
    data = TraceDataModule(synthetic_config(tmp_path), planted, val)
    data.setup()
    assert data.counts["train"]["traces"] == 80 and data.counts["val"]["traces"] == 40
    assert [s["role"] for s in data.sources] == ["train", "val"]


def test_mismatched_hidden_size_refused(tmp_path):
    # tiny-s (hidden size 128) is the config's model; these traces claim to be tiny-s at 16.
    traces = write_planted_trace_set(tmp_path / "traces", problems=4, name="tiny-s")
    config = load_config("tiny-s", {"probe.layers": LAYERS, "wandb.mode": "disabled"})
    with pytest.raises(TraceSetError, match="hidden size 16, but tiny-s has hidden size 128"):
        TraceDataModule(config, traces).setup()


def test_other_model_or_layers_refused(planted, tmp_path):
    with pytest.raises(TraceSetError, match="collected with model 'synthetic'"):
        TraceDataModule(synthetic_config(tmp_path, **{"model.name": "tiny-m"}), planted).setup()
    with pytest.raises(TraceSetError, match=r"captured layers \[0, 1\]"):
        TraceDataModule(synthetic_config(tmp_path, **{"probe.layers": [-1]}), planted).setup()


def test_no_positive_labels_refused(tmp_path):
    traces = write_planted_trace_set(tmp_path / "traces", problems=8, loops=False, fails=False, wrong=False,
                                     steps=False)
    with pytest.raises(TraceSetError, match="no positive labels for loop_within_h"):
        TraceDataModule(synthetic_config(tmp_path), traces).setup()


def test_a_head_without_positives_is_left_untrained(tmp_path):
    traces = write_planted_trace_set(tmp_path / "traces", problems=40, loops=False)
    data = TraceDataModule(synthetic_config(tmp_path), traces)
    data.setup()
    assert list(data.untrained_heads) == ["loop_within_h"]
    assert "no positive labels for loop_within_h" in data.untrained_heads["loop_within_h"]
    assert data.pos_weight[0] == 1.0 and data.pos_weight[1] > 1.0


def test_missing_labels_refused(tmp_path):
    traces = write_planted_trace_set(tmp_path / "traces", problems=4, labels=False)
    with pytest.raises(TraceSetError, match="no labels.json; label the trace set first"):
        TraceDataModule(synthetic_config(tmp_path), traces).setup()


def test_corrupt_shard_refused(tmp_path):
    traces = write_planted_trace_set(tmp_path / "traces", problems=8)
    shard = traces / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(TraceSetError, match="corrupt or truncated"):
        TraceDataModule(synthetic_config(tmp_path), traces).setup()


def test_running_mean_window_zero_halves_the_features(planted, tmp_path):
    data = TraceDataModule(synthetic_config(tmp_path, **{"detector.mean_window": 0}), planted)
    data.setup()
    features, _ = next(iter(data.val_dataloader()))
    assert features.shape[1] == len(LAYERS) * HIDDEN


def test_worker_processes_read_disjoint_shards(planted, tmp_path):
    data = TraceDataModule(synthetic_config(tmp_path, **{"detector.num_workers": 2}), planted)
    data.setup()
    single = TraceDataModule(synthetic_config(tmp_path), planted)
    single.setup()
    for split, loader in (("train", data.train_dataloader()), ("val", data.val_dataloader())):
        targets = torch.cat([t for _, t in loader])
        assert targets.shape[0] == single.counts[split]["positions"]
        assert int(targets[:, 0].sum()) == single.counts[split]["loop_within_h_positives"]


def test_more_workers_than_shards_split_the_shards_and_cover_every_position_once(planted, tmp_path):
    """5 shards, 8 workers: each shard becomes two runs of traces, and each worker reads its own."""
    single = TraceDataModule(synthetic_config(tmp_path), planted)
    single.setup()
    data = TraceDataModule(synthetic_config(tmp_path, **{"detector.num_workers": 8}), planted)
    data.setup()
    loader = data.train_dataloader()
    assert loader.num_workers == 8 and len(loader.dataset.plans) == 2 * len(data.train_plans)
    val = torch.cat([f for f, _ in data.val_dataloader()])
    assert val.shape[0] == single.counts["val"]["positions"]
    # Validation comes in trace order per worker; as a set of rows it is the single process's.
    expected = torch.cat([f for f, _ in single.val_dataloader()])
    torch.testing.assert_close(val.sum(0), expected.sum(0), rtol=1e-5, atol=1e-3)
    assert torch.equal(torch.sort(val[:, 0]).values, torch.sort(expected[:, 0]).values)
    targets = torch.cat([t for _, t in loader])
    assert targets.shape[0] == single.counts["train"]["positions"]
    assert int(targets[:, 0].sum()) == single.counts["train"]["loop_within_h_positives"]


def test_runs_of_traces_within_a_byte_limit_give_the_same_batches(planted, tmp_path):
    """The GPU feature path reads a shard in runs of traces whose features fit `GPU_PLAN_BYTES`: every
    run stays under the limit (unless one trace exceeds it), and the runs give the same validation
    batches, in the same order, and the same training positions as whole shards."""
    from training.datamodule import _PositionStream, _split_plans_by_bytes

    data = TraceDataModule(synthetic_config(tmp_path), planted)
    data.setup()
    row_bytes = 4 * data.recipe.feature_dim
    limit = 40 * row_bytes  # a few traces per run
    for plans in (data.val_plans, data.train_plans):
        runs = _split_plans_by_bytes(plans, data.recipe.feature_dim, limit)
        assert len(runs) > len(plans)
        assert [(r.path, row) for r in runs for row in r.rows] == [(p.path, row) for p in plans for row in p.rows]
        for run in runs:
            features = torch.cat([f for f, _ in _PositionStream([run], data.recipe, data.stats, HORIZON, 10**6,
                                                                False)])
            assert len(run.rows) == 1 or features.numel() * 4 <= limit
    runs = _split_plans_by_bytes(data.val_plans, data.recipe.feature_dim, limit)
    stream = _PositionStream(runs, data.recipe, data.stats, HORIZON, 128, shuffle=False, device="cpu")
    assert torch.equal(torch.cat([f for f, _ in stream]), torch.cat([f for f, _ in data.val_dataloader()]))
    runs = _split_plans_by_bytes(data.train_plans, data.recipe.feature_dim, limit)
    shuffled = list(_PositionStream(runs, data.recipe, data.stats, HORIZON, 128, shuffle=True, device="cpu"))
    targets = torch.cat([t for _, t in shuffled])
    assert targets.shape[0] == data.counts["train"]["positions"]
    assert int(targets[:, 0].sum()) == data.counts["train"]["loop_within_h_positives"]


def test_feature_device_is_the_cpu_without_a_gpu_or_when_asked(planted, tmp_path, monkeypatch):
    data = TraceDataModule(synthetic_config(tmp_path, **{"detector.feature_device": "cpu"}), planted)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert data.feature_device.type == "cpu"
    with pytest.raises(Exception, match="feature_device"):
        synthetic_config(tmp_path, **{"detector.feature_device": "tpu"})
