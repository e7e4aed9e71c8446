"""`rescue run`, the main job, end to end on the embedded tiny-s (small limits, CPU, no downloads)."""

import json

from inference.config import load_config
from rescue.cli import main
from rescue.commands import RUN_LEAVES_OUT, default_methods, run_methods


def test_rescue_run_writes_a_report_then_skips_what_is_up_to_date(tmp_path, capsys):
    # tiny-s's FP16 traces run about 310 tokens: a budget below that cuts every trace, so no val trace ends
    # correct and the action policy has nothing to fit on.
    argv = ["run", "--config", "tiny-s", "--output_dir", str(tmp_path / "runs"), "--wandb", "disabled",
            "--budget", "512", "--sampling.batch_size", "48", "--train-limit", "48", "--val-limit", "32",
            "--test-limit", "6"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = tmp_path / "runs" / "tiny-s" / "report"
    assert f"report: {report}" in out
    # It ends with the comparison table, the goals and the paths of the report and its plot.
    tail = out.rstrip().splitlines()
    assert tail[-2:] == [f"report: {report / 'summary.md'}", f"plot: {report / 'accuracy-vs-cost.png'}"]
    assert any(line.startswith("| learned |") for line in tail[-50:])
    assert not any(line.startswith(("INFO", "Kernel:")) for line in out.splitlines())
    summary = json.loads((report / "report.json").read_text())
    # The main job's methods (compare's default less the slow extras), a learned curve point and the
    # ceilings, on the same problems; the report says what it left out and how to run it.
    config = load_config("tiny-s")
    assert list(summary["comparison"]) == list(run_methods(config))
    assert {"learned", "learned@0.1", "ceiling-step"} <= set(summary["comparison"])
    assert not set(RUN_LEAVES_OUT) & set(summary["comparison"]) and "learned@0.4" not in summary["comparison"]
    assert set(default_methods(config)) - set(run_methods(config)) == {*RUN_LEAVES_OUT, "learned@0.4", "rule@0.2"}
    assert [c["ceiling"] for c in summary["ceilings"]] == ["commit-oracle", "ceiling-step", "fp16"]
    assert all(s["problems"] == 6 for s in summary["comparison"].values())
    assert not any(stage["skipped"] for stage in summary["stages"])
    for name in ("summary.md", "accuracy-vs-cost.png", "tokens.png"):
        assert (report / name).stat().st_size > 0
    text = (report / "summary.md").read_text()
    assert "| learned |" in text and "## Goals" in text and "## Ceilings" in text
    assert "## What 2-bit breaks in this model" in text
    assert "learned beats the rule by at least 10 points" in text
    card = json.loads((tmp_path / "runs" / "tiny-s" / "detector" / "card.json").read_text())
    assert card["base_model"]["name"] == "tiny-s"

    # Same settings again, on fewer test problems: the 2-bit model and the detector are up to date; only the
    # comparison reruns.
    assert main(argv[:-1] + ["2"]) == 0
    again = json.loads((report / "report.json").read_text())
    skipped = {stage["stage"].split()[0]: stage["skipped"] for stage in again["stages"]}
    assert skipped["quantize"] and skipped["train"] and not skipped["compare"]
    assert all(s["problems"] == 2 for s in again["comparison"].values())


def test_the_report_says_whether_the_model_shows_the_papers_failures():
    from rescue.commands.running import _failure_kinds

    def summary(loops, wrong_steps):
        return {"labels": {"train": {"rates": {"loop_or_fails_to_commit": loops, "wrong_step": wrong_steps,
                                               "correct": 0.2}}}}

    arithmetic = "\n".join(_failure_kinds(summary(0.10, 0.88)))
    assert "Loop or fail to commit (the paper's process failures): 10.0%" in arithmetic
    assert "wrong arithmetic steps" in arithmetic and "tiny-m" in arithmetic
    regime = "\n".join(_failure_kinds(summary(0.26, 0.20)))
    assert "shows the paper's phenomenon" in regime and "tiny-m" not in regime
    assert "still hold a wrong arithmetic step" not in regime
    mixed = "\n".join(_failure_kinds(summary(0.16, 0.88)))
    assert "shows the paper's phenomenon" in mixed and "still hold a wrong arithmetic step (88.0%)" in mixed
    assert _failure_kinds({"labels": {"train": {"rates": {}}}}) == []  # labels written before the rate existed
    own = "\n".join(_failure_kinds({**summary(0.13, 0.54), "model": "tiny-m"}))  # tiny-m's own run points nowhere else
    assert "on them this twin's failures are mostly not the paper's" in own and "rescue run --config tiny-m" not in own
