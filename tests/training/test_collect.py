"""Trace collection on the embedded tiny-s model: resumable, lossless, checksummed, rank-parallel."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from inference.config import load_config
from inference.decoding.generate import generate
from inference.prompts import render_prompt
from rescue import commands
from training.arith import arith_problems
from training.collect import HiddenRecorder, TraceSetWriter
from training.traces import MANIFEST, Manifest, TraceSet, TraceSetError

SMALL = {"sampling.budget": 48, "sampling.batch_size": 2, "capture.shard_size": 2, "capture.stride": 4,
         "capture.window": 2, "probe.layers": [2, -1], "wandb.mode": "disabled", "model.device": "cpu"}


def config(**overrides):
    return load_config("tiny-s", {**SMALL, **overrides})


def collect(out, **overrides):
    return commands.collect(config(**overrides), split="val", limit=5, out=str(out), precision="fp16")


def shard_digests(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    return [(s["index"], s["rows"], s["sha256"]) for s in manifest["shards"]]


def contents(folder):
    """Everything a trace set holds except timings (wall time differs from run to run)."""
    rows = []
    for trace in TraceSet(folder):
        fields = {k: v for k, v in trace.fields().items() if k != "wall_seconds"}
        rows.append((fields, trace.prompt_ids, trace.generated_ids, trace.positions.tolist(), trace.hidden,
                     trace.top_prob))
    return rows


def assert_same_trace_set(a, b, exact=True):
    left, right = contents(a), contents(b)
    assert [r[0]["id"] for r in left] == [r[0]["id"] for r in right]
    for x, y in zip(left, right):
        assert x[:4] == y[:4]
        for left_tensor, right_tensor in zip(x[4:], y[4:]):
            if exact:
                assert torch.equal(left_tensor, right_tensor)
            else:  # other processes may use other CPU thread counts, so float sums round differently
                torch.testing.assert_close(left_tensor, right_tensor, rtol=1e-2, atol=1e-2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "traces"
    summary = collect(out)
    return out, summary


def test_trace_set_holds_every_problem_once_with_hidden_states(reference):
    out, summary = reference
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["planned_shards"] == 3 and summary["traces"] == 5
    assert manifest["capture"]["stride"] == 4 and manifest["layers"] == [2, -1]
    traces = list(TraceSet(out))
    assert [t.problem_id for t in traces] == [f"arith/val/{i:06d}" for i in range(5)]
    for trace in traces:
        length = len(trace.generated_ids)
        assert 1 <= length <= 48 and trace.finish_reason in ("eos", "budget")
        assert trace.hidden.shape == (len(trace.positions), 2, 128) and trace.hidden.dtype == torch.float16
        assert set(range(0, length, 4)) <= set(trace.positions.tolist())
        assert length - 1 in trace.positions.tolist()
    assert summary["bytes_per_generated_token"] > 0


def test_top_prob_of_every_generated_token_is_stored_and_read_back(reference):
    """What the trace set holds is the model's own top-token probability at the forward pass that
    produced each token, recomputed here in one unbatched pass over prompt + generated ids."""
    out, _ = reference
    model, _ = commands._load_for_precision(config(), "fp16")
    for trace in TraceSet(out):
        assert trace.top_prob.dtype == torch.float32 and trace.top_prob.shape == (len(trace.generated_ids),)
        ids = torch.tensor([trace.prompt_ids + trace.generated_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(trace.prompt_ids) - 1 : -1]
        expected = torch.softmax(logits.float(), dim=-1).amax(dim=-1)
        torch.testing.assert_close(trace.top_prob, expected, rtol=0, atol=1e-4)


def test_recorder_keeps_what_each_step_showed_on_both_decode_paths():
    """At every generated position of every row (rows stopping at different steps), the recorder's
    buffers hold bit for bit what a hook storing the live rows' `view.hidden` and the softmax of their
    logits stores, on the dynamic and the static path; the two paths agree up to rounding."""
    model, tokenizer = commands._load_for_precision(config(), "fp16")
    prompts = [render_prompt(tokenizer, p.question) for p in arith_problems("val", limit=4)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    layers, budget, dtype = [2, -1], 24, torch.float16
    kept = {}
    for decode in ("dynamic", "static"):
        recorder = HiddenRecorder(layers, 4, budget, dtype)
        states = torch.zeros(4, budget, len(layers), model.config.hidden_size, dtype=dtype)
        top_prob = torch.zeros(4, budget)

        def hook(view):
            recorder(view)
            states[view.rows, view.step] = torch.stack([view.hidden[layer] for layer in layers], dim=1).to(dtype)
            top_prob[view.rows, view.step] = torch.softmax(view.outputs.logits[view.rows].float(), dim=-1).amax(dim=-1)
            return view.step == 4 * view.rows + 3

        result = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=budget, eos_token_ids=[],
                          pad_token_id=tokenizer.pad_token_id, layers=layers, hook=hook, top_prob=True,
                          stack_dtype=dtype, decode=decode)
        lengths = [len(ids) for ids in result.generated_ids]
        assert lengths == [4, 8, 12, 16]
        for row, length in enumerate(lengths):
            assert torch.equal(recorder.buffer[row, :length], states[row, :length])
            assert torch.equal(recorder.top_prob[row, :length], top_prob[row, :length])
        kept[decode] = result.generated_ids, [(recorder.buffer[row, :n], recorder.top_prob[row, :n])
                                              for row, n in enumerate(lengths)]
    assert kept["dynamic"][0] == kept["static"][0]
    for (dynamic_states, dynamic_prob), (static_states, static_prob) in zip(kept["dynamic"][1], kept["static"][1]):
        torch.testing.assert_close(static_states, dynamic_states, rtol=4e-3, atol=1e-3)
        torch.testing.assert_close(static_prob, dynamic_prob, rtol=1e-4, atol=1e-5)


def test_resume_after_kill_equals_uninterrupted_run(reference, tmp_path, monkeypatch):
    out = tmp_path / "traces"
    import training.collect as collect_module

    real_write = collect_module.write_shard
    calls = {"n": 0}

    def dying_write(folder, index, traces, dtype):
        calls["n"] += 1
        if calls["n"] == 2:
            (folder / "shard-00001.safetensors.tmp").write_bytes(b"half a shard")  # killed mid-write
            raise KeyboardInterrupt
        return real_write(folder, index, traces, dtype)

    monkeypatch.setattr(collect_module, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        collect(out)
    assert len(shard_digests(out)) == 1
    monkeypatch.setattr(collect_module, "write_shard", real_write)
    summary = collect(out)
    assert [d[:2] for d in shard_digests(out)] == [d[:2] for d in shard_digests(reference[0])]
    assert_same_trace_set(out, reference[0])
    assert summary["traces"] == 5 and not list(out.glob("*.tmp"))


def test_resume_with_other_settings_is_refused_naming_the_fields(reference, tmp_path):
    out = tmp_path / "traces"
    collect(out)
    with pytest.raises(TraceSetError, match=r"refusing to resume.*sampling\.temperature \(0\.6 -> 0\.9\)"):
        collect(out, **{"sampling.temperature": 0.9})


def test_schema_1_trace_set_is_read_without_top_prob_but_not_resumed(reference, tmp_path):
    import shutil

    out = tmp_path / "traces"
    shutil.copytree(reference[0], out)
    manifest = Manifest.from_file(out / MANIFEST)
    manifest.schema_version = 1  # the shards still hold top_prob; readers go by what a shard holds
    (out / MANIFEST).write_text(manifest.to_json())
    assert not TraceSet(out).stores_top_prob and len(list(TraceSet(out))) == 5
    with pytest.raises(TraceSetError, match="refusing to resume a trace set of schema version 1"):
        TraceSetWriter(out, manifest.identity, manifest.planned_shards, rank=0, world=1)


def test_corrupt_or_truncated_shard_is_named_when_read(reference, tmp_path):
    import shutil

    out = tmp_path / "traces"
    shutil.copytree(reference[0], out)
    shard = out / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(TraceSetError, match="shard-00001.safetensors: shard is corrupt or truncated"):
        list(TraceSet(out))


def _rank_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    collect(out)
    import torch.distributed as dist

    dist.destroy_process_group()


def test_two_processes_write_the_union_of_a_single_process_run(reference, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "traces"
    mp.start_processes(_rank_worker, args=(2, port, str(out)), nprocs=2, start_method="fork")
    assert [d[:2] for d in shard_digests(out)] == [d[:2] for d in shard_digests(reference[0])]
    assert_same_trace_set(out, reference[0], exact=False)
    assert not list(out.glob("manifest.rank*.json"))


def test_budget_past_the_model_context_is_refused_before_any_generation(tmp_path):
    from inference.errors import ConfigError

    with pytest.raises(ConfigError, match=r"sampling.budget 1600 .* past the 1536-position context .* at most \d+"):
        collect(tmp_path / "traces", **{"sampling.budget": 1600})
    assert not (tmp_path / "traces").exists()


def test_batch_is_sized_from_free_memory_and_shown_in_the_progress_bar(tmp_path, monkeypatch, capsys):
    import training.collect as collect_module
    from inference.decoding.memory import row_bytes

    settings = config(**{"sampling.batch_size": 2})
    model, tokenizer = commands._load_for_precision(settings, "fp16")
    units = collect_module.plan_units(arith_problems("val", limit=3), 1)
    one_row = row_bytes(model.config, max(collect_module.prompt_lengths(tokenizer, units)), 48, torch.float32, 2)
    monkeypatch.setattr(collect_module, "available_bytes", lambda device: int(1.5 * one_row))
    batches = []
    real_generate = collect_module.generate

    def counting_generate(model, input_ids, *args, **kwargs):
        batches.append(input_ids.shape[0])
        return real_generate(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(collect_module, "generate", counting_generate)
    summary = commands.collect(settings, split="val", limit=3, out=str(tmp_path / "traces"), precision="fp16")
    assert summary["traces"] == 3 and batches == [1, 1, 1]
    assert "batch=1 (memory:" in capsys.readouterr().err

    monkeypatch.setattr(collect_module, "available_bytes", lambda device: one_row // 4)
    from inference.errors import ConfigError

    with pytest.raises(ConfigError, match="sampling.budget 48: one row needs"):
        commands.collect(settings, split="val", limit=3, out=str(tmp_path / "none"), precision="fp16")
    assert not (tmp_path / "none" / "manifest.json").exists()
