"""`rescue detect-report`: the learned trigger against the rule on held-out traces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from inference.config import RescueConfig
from inference.errors import RescueError
from rescue.commands.common import EXCERPTS

if TYPE_CHECKING:
    from training.texts import TextFields


def detect_report(config: RescueConfig, test: str | None = None, detector: str | None = None, out: str | None = None,
                  texts: str | None = None, tokenizer: str | None = None, fields: TextFields | None = None,
                  text_only: bool = False,
                  target: float = 0.1) -> dict:
    """Replay held-out traces with the learned trigger and the rule, at the same false-alarm rate,
    and state the configured rule's false-alarm rate on the healthy ones.

    Text only (`texts`, another harness's JSONL read with `fields` and `tokenizer`; or `text_only`
    on a labeled trace set): no hidden states, so only the rule is replayed: as configured, as the
    paper-like default, and calibrated on these traces for `target` false alarms per healthy trace.
    """
    from training.replay import replay_report, rule_false_alarm_line, rule_outcomes, rule_setting

    if texts is None and test is None:
        raise RescueError("detect-report: give --test TRACE_SET or --texts FILE.jsonl")
    if not 0.0 <= target < 1.0:
        raise RescueError(f"detect-report: --target must be a false-alarm rate in [0, 1), got {target}")
    if texts is not None or text_only:
        from training.labels import loop_excerpt

        pairs, excerpts, notes = [], [], []
        if texts is not None:
            from training.texts import TextFields, label_texts, load_text_tokenizer, read_texts

            labeled = label_texts(read_texts(texts, fields or TextFields()),
                                  load_text_tokenizer(tokenizer or config.model.fp16), config.labels)
            for item in labeled:
                pairs.append((item.ids, item.labels))
                if item.labels.loop_onset is not None and len(excerpts) < EXCERPTS:
                    excerpts.append(loop_excerpt(item.text, item.token_ends, item.ids, item.labels, item.trace.id))
            notes.append(f"Tokenized with {tokenizer or config.model.fp16}; labeled with the config's `labels`.")
            source = str(texts)
        else:
            pairs = _labeled_ids(test)
            source = str(test)
        default = Path(config.output_dir) / config.model.name / "detect-report-text"
        summary = replay_report(pairs, rule_setting(config.rescue), target, source, out or default,
                                excerpts=excerpts, notes=notes)
    else:
        from training.fit import detect_report as compare_offline

        summary = compare_offline(config, test, detector=detector, out=out)
        configured = rule_outcomes(_labeled_ids(test), rule_setting(config.rescue))
        summary["configured_rule"] = {k: v for k, v in configured.items() if k != "alarms"}
        line = rule_false_alarm_line(configured)
        report = Path(summary["out"]) / "report.md"
        if report.is_file():
            report.write_text(report.read_text().rstrip("\n") + f"\n\nAs configured (`rescue.rule_*`), the {line}.\n")
        (Path(summary["out"]) / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = Path(summary["out"]) / "report.md"
    if report.is_file():
        print(report.read_text())
    print(f"detect report: {summary['out']}")
    return summary


def _labeled_ids(test: str) -> list[tuple[list[int], object]]:
    """(generated ids, labels) of every trace of a labeled trace set."""
    from training.datamodule import load_labels
    from training.traces import TraceSet, TraceSetError

    labels, _ = load_labels(test)
    pairs = []
    for trace in TraceSet(test).traces(with_hidden=False):
        if trace.id not in labels:
            raise TraceSetError(f"{test}: labels.json has no labels for trace {trace.id!r}; rerun `rescue label {test}`")
        pairs.append((list(trace.generated_ids), labels[trace.id]))
    return pairs
