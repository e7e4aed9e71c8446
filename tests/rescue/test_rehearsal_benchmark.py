"""benchmarks/rehearsal.py's measurements on a tiny random model (the GPU run's code path, on the CPU)."""

import json

from conftest import benchmark_script


def test_time_decode_stops_after_the_steps_asked_with_the_full_budget_allocated(tiny_model_dir, monkeypatch):
    from inference.decoding.models import load_full_precision

    script = benchmark_script("rehearsal")
    model, tokenizer = load_full_precision(str(tiny_model_dir), dtype="float32", device="cpu")
    budgets = []
    real_generate = __import__("inference.decoding.generate", fromlist=["generate"]).generate

    def watched(*args, **kwargs):
        budgets.append(kwargs["max_new_tokens"])
        result = real_generate(*args, **kwargs)
        assert {len(ids) for ids in result.generated_ids} == {12}
        return result

    import training.collect  # noqa: F401  imported before the patch, so that it keeps the real generate

    monkeypatch.setattr("inference.decoding.generate.generate", watched)
    row = script.time_decode(model, tokenizer, ["What is 1 + 1?", "What is 2 + 2?", "What is 3 + 3?"], budget=200,
                             layers=[-1], steps=12, batch_size=2, warm=4)
    assert budgets == [200]
    assert row["batch"] == 2 and row["batch_limit"] == "cpu" and row["steps_timed"] == 7
    assert row["tokens_per_s"] > 0 and row["step_ms"] > 0


def test_timing_labels_give_the_detector_both_classes(tmp_path):
    script = benchmark_script("rehearsal")
    labels = {"length": 100, "loop_onset": None, "loop_period": None, "budget_exhausted": True,
              "unclosed_think": True, "committed": False, "first_candidate_pos": None, "delayed_commitment": False,
              "correct": False, "fails_to_commit": True}
    (tmp_path / "labels.json").write_text(json.dumps({"params": {}, "traces": {f"t{i}": dict(labels) for i in range(4)}}))
    script.timing_labels(tmp_path)
    traces = json.loads((tmp_path / "labels.json").read_text())["traces"]
    assert [t["loop_onset"] for t in traces.values()] == [50, None, 50, None]
    assert [t["fails_to_commit"] for t in traces.values()] == [True, False, True, False]
    assert [t["correct"] for t in traces.values()] == [False, True, False, True]  # ends_wrong has both classes
    assert all(t["length"] == 100 for t in traces.values())  # the traces themselves are untouched


def test_the_bf16_comparison_collects_as_many_prompts_as_one_batch_holds(tiny_model_dir, tmp_path, monkeypatch):
    """With room for three rows past the bf16 weights and the 1 GB margin, three of eight prompts are collected."""
    import torch
    from transformers import AutoConfig

    from inference.config import load_config
    from inference.decoding.memory import row_bytes
    from inference.decoding.models import load_tokenizer
    from inference.prompts import render_prompt

    script = benchmark_script("rehearsal")
    rows = [{"unique_id": f"p{i}", "problem": f"What is {i} + {i}?" + " Think." * i, "answer": str(2 * i)}
            for i in range(8)]
    bench = tmp_path / "math500.jsonl"
    bench.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = load_config("qwen3-0.6b", {"benchmark.name": "math500", "benchmark.path": str(bench),
                                        "sampling.budget": 100, "sampling.batch_size": 8, "probe.layers": [-1]})
    tokenizer = load_tokenizer(tiny_model_dir)
    longest = max(len(ids) for ids in tokenizer([render_prompt(tokenizer, r["problem"]) for r in rows]).input_ids)
    per_row = row_bytes(AutoConfig.from_pretrained(tiny_model_dir), longest, 100, torch.bfloat16, 1,
                        getattr(torch, config.capture.dtype))
    weights = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("inference.decoding.memory.available_bytes", lambda device: weights + 10**9 + 3.5 * per_row)
    planned = script.bf16_rows(config, tiny_model_dir, 8)
    assert planned["prompts"] == 3 and planned["of"] == 8 and planned["batch"].startswith("3 (memory")
    monkeypatch.setattr("inference.decoding.memory.available_bytes", lambda device: weights + 10**9 + 20 * per_row)
    assert script.bf16_rows(config, tiny_model_dir, 8)["prompts"] == 8


def test_the_rehearsal_runs_every_stage_of_the_large_shape_with_the_bf16_comparison(tmp_path):
    """The GPU run's whole path on the CPU: tiny 8B-named shape, no decode stages, 2-bit then bf16 collection
    of the same prompts, labels and the detector; every stage recorded without an error."""
    rows = [{"unique_id": f"p{i}", "problem": f"Compute {i} + {2 * i} and then {i} times {i + 3}.",
             "solution": f"We add {i} and {2 * i} to get {3 * i}, and {i} times {i + 3} is {i * (i + 3)}.",
             "answer": str(3 * i)} for i in range(12)]
    data = tmp_path / "math500.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = tmp_path / "rehearsal.json"
    script = benchmark_script("rehearsal")
    assert script.main(["--data", str(data), "--out", str(tmp_path / "work"), "--results", str(results), "--tiny",
                        "--shapes", "qwen3-8b", "--collect-large", "--collect-bf16", "--budget", "64",
                        "--batch-size", "8", "--collect-prompts", "8", "--decode-budgets", "",
                        "--detector-epochs", "1"]) == 0
    record = json.loads(results.read_text())["qwen3-8b"]
    stages = record["stages"]
    assert not any(name.startswith("decode") for name in stages)
    assert list(stages) == ["build", "twin (round to nearest, published GPTQ layout)", "collect 2-bit", "label",
                            "labels for timing", "train detector", "collect bf16 (the same prompts, one batch)"]
    assert all("error" not in stage and "skipped" not in stage for stage in stages.values()), stages
    two_bit, bf16 = stages["collect 2-bit"], stages["collect bf16 (the same prompts, one batch)"]
    assert two_bit["traces"] == bf16["traces"] == 8 and two_bit["complete"] and bf16["complete"]
    assert bf16["prompts"] == 8 and bf16["batch"] == "8 (cpu)" and bf16["budget"] == 64
    # Marks every 256 steps and at the last: steps 0 and 63 of the one batch of 8.
    assert [m for m, _ in two_bit["batches"][0]["marks"]] == [0, 63] and two_bit["batches"][0]["rows"] == 8
    same = bf16["same_steps"]
    assert same["steps"] == 63 and same["bf16_rows"] == same["two_bit_rows"] == 8
    assert record["collect_2bit_over_bf16_tokens_per_s"] == same["two_bit_over_bf16"] > 0
    assert stages["train detector"]["positions_per_s"] > 0


def test_the_collection_takes_the_tile_the_linears_stage_found_faster_at_its_batch():
    script = benchmark_script("rehearsal")
    timed = {"us_per_layer": {"16": {"bf16": 130.0, "fused, tiles of 64": 99.0, "fused, tiles of 16": 99.5},
                              "64": {"bf16": 150.0, "fused, tiles of 64": 210.0, "fused, tiles of 16": 380.0},
                              "86": {"bf16": 160.0, "fused, tiles of 64": 400.0, "fused, tiles of 16": 390.0}}}
    assert script.choose_tile(timed, 64) == 64
    assert script.choose_tile(timed, 90) == 16  # nearest timed rows: 86
    assert script.choose_tile(timed, 12) == 64
    assert script.choose_tile({}, 64) is None  # the stage did not run: the kernel's default stays
    assert script.choose_tile({"us_per_layer": {"64": {"bf16": 1.0}}}, 64) is None


def test_the_bf16_collection_runs_the_steps_the_time_left_holds():
    script = benchmark_script("rehearsal")
    marks = [(step, step * 0.03) for step in range(0, 8192, 256)] + [(8191, 8191 * 0.03)]  # 30 ms a step
    assert script.seconds_to_step(marks, 4096) == 4096 * 0.03
    assert script.seconds_to_step(marks, 100) is None  # not a marked step
    assert script.bf16_budget(marks, 8192, 400.0) == 8192  # 1.05 x 245.7 s + 30 s fits
    assert script.bf16_budget(marks, 8192, 200.0) == 5120  # 1.05 x 153.6 + 30 = 191.3 s; 5,632 steps need 207.4
    assert script.bf16_budget(marks, 8192, 40.0) == 0  # not even 512 steps
