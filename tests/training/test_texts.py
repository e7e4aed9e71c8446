"""Traces from another harness: reading the JSONL, labeling it (`rescue label --texts`) and the
text-only detect report, tokenized with a small byte-level BPE trained in the test."""

import json
from pathlib import Path

import pytest

from inference.config import LabelsConfig, load_config
from inference.decoding.generate import FINISH_BUDGET, FINISH_EOS
from inference.errors import RescueError
from rescue import commands
from rescue.cli import main
from training.labels import find_loop
from training.texts import FINISH_REASONS, TextFields, TextsError, label_texts, read_texts

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

LOOP_BLOCK = "Wait, but in the code, the answer is 5.0. So the final answer should be $\\boxed{5}$.\n"
HEALTHY = ("<think>\nOkay, so I need to find the remainder. Let me check that again.\n</think>\n\n"
           "The answer is \\boxed{25}.")
LOOPING = "<think>\nOkay, so I need to find the remainder.\n" + LOOP_BLOCK * 6


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_finish_reasons_map_to_the_decoding_loops():
    assert FINISH_REASONS["stop"] == FINISH_EOS and FINISH_REASONS["length"] == FINISH_BUDGET


def test_read_texts_with_renamed_fields_and_inferred_finish(tmp_path):
    path = write_jsonl(tmp_path / "out.jsonl", [
        {"uid": "a", "response": HEALTHY, "answer": "25"},
        {"uid": "b", "response": LOOPING, "answer": "5", "stop": "length"},
        {"uid": "c", "response": LOOPING, "answer": 5},
    ])
    traces = read_texts(path, TextFields(text="response", id="uid", gold="answer", finish_reason="stop"))
    assert [t.id for t in traces] == ["a", "b", "c"]
    assert [(t.finish_reason, t.finish_inferred) for t in traces] == [
        (FINISH_EOS, True), (FINISH_BUDGET, False), (FINISH_BUDGET, True)]
    assert traces[2].gold == "5"


@pytest.mark.parametrize("rows, fields, message", [
    ([{"id": 1, "gold": "5"}], TextFields(), "out.jsonl:1: field 'text' must hold the trace text"),
    ([{"id": 1, "text": HEALTHY}], TextFields(), "out.jsonl:1: field 'gold' (the gold answer) is missing"),
    ([{"id": 1, "text": HEALTHY, "ok": "yes"}], TextFields(gold="", correct="ok"), "field 'ok' must be true, false or null"),
    ([{"id": 1, "text": HEALTHY, "gold": "5", "finish_reason": "abort"}], TextFields(), "field 'finish_reason' must be one of"),
    ([{"id": 1, "text": HEALTHY, "gold": "5"}, {"id": 1, "text": HEALTHY, "gold": "5"}], TextFields(),
     "out.jsonl:2: field 'id' repeats the id '1'"),
])
def test_bad_rows_name_the_line_and_field(tmp_path, rows, fields, message):
    path = write_jsonl(tmp_path / "out.jsonl", rows)
    with pytest.raises(TextsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_texts(path, fields)


def test_a_line_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"text": HEALTHY, "gold": "25"}) + "\n{not json\n")
    with pytest.raises(TextsError, match="out.jsonl:2: not a JSON object"):
        read_texts(path)


def test_label_texts_gives_every_text_level_label(tmp_path, bpe):
    path = write_jsonl(tmp_path / "out.jsonl", [
        {"id": "healthy", "text": HEALTHY, "gold": "25", "finish_reason": "stop"},
        {"id": "looping", "text": LOOPING, "correct": None},
    ])
    healthy, looping = label_texts(read_texts(path, TextFields(correct="correct")), bpe, LabelsConfig())
    assert healthy.ids[-1] == bpe.eos_token_id and healthy.text == HEALTHY
    assert healthy.labels.correct and healthy.labels.committed and not healthy.labels.unclosed_think
    assert healthy.labels.loop_onset is None and healthy.labels.first_candidate_pos is not None
    assert looping.labels.loop_onset is not None and looping.labels.budget_exhausted
    assert looping.labels.unclosed_think and looping.labels.fails_to_commit and not looping.labels.correct
    onset_char = looping.token_ends[looping.labels.loop_onset - 1]
    assert LOOPING.index(LOOP_BLOCK) - 2 <= onset_char <= LOOPING.index(LOOP_BLOCK)


def test_rescue_label_texts_writes_labels_and_a_report_with_the_loop_marked(tmp_path, bpe_dir, capsys):
    path = write_jsonl(tmp_path / "vllm.jsonl", [
        {"id": "healthy", "text": HEALTHY, "gold": "25", "finish_reason": "stop"},
        {"id": "looping", "text": LOOPING, "gold": "5", "finish_reason": "length"},
    ])
    code = main(["label", "--config", "qwen3-0.6b", "--texts", str(path), "--tokenizer", str(bpe_dir),
                 "--output_dir", str(tmp_path / "runs"), "--wandb", "disabled"])
    assert code == 0
    out = tmp_path / "runs" / "vllm-labels"
    record = json.loads((out / "labels.json").read_text())
    assert record["traces"]["looping"]["loop_onset"] is not None and record["traces"]["healthy"]["loop_onset"] is None
    assert record["texts"]["fields"]["text"] == "text"
    report = (out / "label-report.md").read_text()
    assert "### looping" in report and "⟦1⟧" in report and "⟦3⟧" in report
    assert report.count(LOOP_BLOCK.strip()[:30]) >= 3
    assert "| loop | 1 | 50.0% |" in capsys.readouterr().out


def test_rescue_label_needs_traces_or_texts(tmp_path):
    with pytest.raises(RescueError, match="either a trace set folder or --texts"):
        commands.label(load_config("qwen3-0.6b"))


def test_text_only_detect_report_states_the_rules_false_alarms(tmp_path, bpe_dir):
    # A healthy trace that repeats a 16-token phrase 3 times in 256 tokens (a legitimate re-check)
    # is a false alarm of the paper-like rule, not of the one calibrated for 0 false alarms.
    steps = "".join(f"Step {k}: so, (a -3)^2 + (b +3)^2 + c^2 = R^2 holds for k = {k}.\n" for k in range(1, 5))
    rows = [{"id": f"h{n}", "text": f"<think>\nOkay, so {n}.\n{steps}</think>\n\nThe answer is \\boxed{{{n}}}.",
             "gold": str(n)} for n in range(3)]
    rows += [{"id": f"l{n}", "text": f"<think>\nHmm {n}.\n" + LOOP_BLOCK * 12, "gold": "5"} for n in range(2)]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    config = load_config("qwen3-0.6b", {"output_dir": str(tmp_path / "runs"), "wandb.mode": "disabled",
                                        "rescue.rule_count": 3})
    summary = commands.detect_report(config, texts=str(path), tokenizer=str(bpe_dir), target=0.0)
    configured = summary["rules"]["configured rule (16-gram 3x within 256 tokens)"]
    assert configured["false_alarms"] == 3 and configured["healthy"] == 3
    assert configured["loops_caught_count"] == 2
    assert summary["calibrated"]["false_alarms"] == 0 and summary["calibrated"]["loops_caught"] == 2
    report = (tmp_path / "runs" / "qwen3-0.6b" / "detect-report-text" / "report.md").read_text()
    assert "| 3 of 3 |" in report and "rule_count:" in report and "⟦2⟧" in report


def dev_rows():
    path = SHARED_DATA / "real_traces_dev.jsonl"
    if not path.is_file():
        pytest.skip(f"dev file {path} is absent (shared/data beside the checkout)")
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


# junsu-kv3_math-11 writes one congruence three times with two edits: a short loop by the definition.
@pytest.mark.parametrize("trace_id", ["junsu-sq_aime-38"])
def test_healthy_dev_traces_that_enumerate_are_not_loops(bpe, trace_id):
    text = dev_rows()[trace_id]["text"]
    assert find_loop(bpe.encode(text, add_special_tokens=False), LabelsConfig()) is None


@pytest.mark.parametrize("trace_id", ["junsu-gptq3-math-500-272", "junsu-awq3-aime-90-12", "issue-vllm-25977"])
def test_looping_dev_traces_loop_by_the_third_repetition(bpe, trace_id):
    row = dev_rows()[trace_id]
    start = row["paragraph_loop_char"]
    paragraph = row["text"][start:].split("\n\n")[0] + "\n\n"
    third = start + 2 * len(paragraph)  # where the repeated paragraph begins its third occurrence
    text = row["text"][: third + 3 * len(paragraph)]
    ids = bpe.encode(text, add_special_tokens=False)
    onset, _ = find_loop(ids, LabelsConfig())
    assert len(bpe.decode(ids[:onset])) <= third
