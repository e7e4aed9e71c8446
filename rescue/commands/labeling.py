"""`rescue label`: where the traces of a trace set go wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from inference.config import RescueConfig
from inference.errors import RescueError
from rescue.commands.common import EXCERPTS

if TYPE_CHECKING:
    from training.texts import TextFields


def label(config: RescueConfig, traces: str | None = None, report: str | None = None, texts: str | None = None,
          tokenizer: str | None = None, fields: TextFields | None = None, echo: bool = True) -> dict:
    """Label every trace of a trace set (from token ids and text alone) and write the label report.

    Labels go to `<traces>/labels.json` together with the parameters used, so relabeling with other
    parameters rewrites that file and never needs a new collection. With `texts` (a JSONL file that
    another harness wrote, its fields named by `fields`, a `training.texts.TextFields`) the traces
    are tokenized with `tokenizer` (a folder or id; default the config's FP16 model's) and get every
    text-level label; labels.json and the report go to `report` (default
    `<output_dir>/<file stem>-labels`). Without `echo` (inside `rescue run`) the report is not printed,
    only where it went.
    """
    from dataclasses import asdict

    from inference.storage import write_atomically
    from inference.tracking import labels_artifact, stage_config, start_run, trace_set_artifact, use_artifacts
    from training.labels import label_report, label_trace, loop_excerpt, token_char_ends
    from training.traces import LABELS, TraceSet, TraceSetError

    if (traces is None) == (texts is None):
        raise RescueError("label: give either a trace set folder or --texts FILE.jsonl")
    notes: list[str] = []
    excerpts: list[str] = []
    if texts is not None:
        from training.texts import TextFields, label_texts, load_text_tokenizer, read_texts

        fields = fields or TextFields()
        foreign = read_texts(texts, fields)
        text_tokenizer = load_text_tokenizer(tokenizer or config.model.fp16)
        labeled = label_texts(foreign, text_tokenizer, config.labels)
        labels = {item.trace.id: item.labels for item in labeled}
        for item in labeled:
            if item.labels.loop_onset is not None and len(excerpts) < EXCERPTS:
                excerpts.append(loop_excerpt(item.text, item.token_ends, item.ids, item.labels, item.trace.id))
        inferred = sum(item.trace.finish_inferred for item in labeled)
        graded = sum(item.trace.gold is not None for item in labeled)
        notes = [f"Traces: {texts}, tokenized with {tokenizer or config.model.fp16}.",
                 f"Finish reason inferred for {inferred} of {len(labeled)} traces (no `{fields.finish_reason}` "
                 "field: budget where `</think>` never came, else EOS)." if inferred else "",
                 f"Correctness graded against `{fields.gold}` for {graded} traces"
                 + (f", taken from `{fields.correct}` for {len(labeled) - graded} (null counts as not correct)."
                    if graded < len(labeled) else ".")]
        notes = [line for line in notes if line]
        out = Path(report or Path(config.output_dir) / f"{Path(texts).stem}-labels")
        labels_path, report_dir, name, source = out / LABELS, out, Path(texts).stem, str(texts)
        out.mkdir(parents=True, exist_ok=True)
    else:
        from inference.decoding.models import load_tokenizer, resolve_model_source
        from training.collect import tokenizer_hash

        trace_set = TraceSet(traces)
        identity = trace_set.identity
        trace_tokenizer = load_tokenizer(resolve_model_source(identity["model"]["fp16"], "model"))
        if tokenizer_hash(trace_tokenizer) != identity["tokenizer_hash"]:
            raise TraceSetError(f"{traces}: collected with another tokenizer than {identity['model']['fp16']}'s")
        labels = {}
        for trace in trace_set.traces(with_hidden=False):
            ends = token_char_ends(trace_tokenizer, trace.generated_ids)
            labels[trace.id] = label_trace(trace.generated_ids, trace.text, ends, trace.finish_reason, trace.gold,
                                           config.labels)
            if labels[trace.id].loop_onset is not None and len(excerpts) < EXCERPTS:
                excerpts.append(loop_excerpt(trace.text, ends, trace.generated_ids, labels[trace.id], str(trace.id)))
        if not labels:
            raise TraceSetError(f"{traces}: the trace set holds no traces")
        labels_path = Path(traces) / LABELS
        report_dir = Path(report or Path(traces) / "label-report")
        name, source = identity["model"]["name"], str(traces)
    record = {"params": asdict(config.labels), "traces": {k: v.to_dict() for k, v in labels.items()}}
    if texts is not None:
        record["texts"] = {"file": str(texts), "tokenizer": tokenizer or config.model.fp16, "fields": asdict(fields)}
    write_atomically(labels_path, json.dumps(record).encode())
    summary = label_report(list(labels.values()), report_dir, excerpts=excerpts, notes=notes)
    run = start_run(config.wandb.mode, config.wandb.project, f"{name}-label", "label",
                    stage_config(config, "label", traces=source), labels_path.parent.parent)
    if run is not None:
        import wandb

        if traces is not None:  # a trace set's lineage; foreign texts have no trace set artifact
            use_artifacts(run, [trace_set_artifact(traces, name)])
        run.summary.update({k: v for k, v in _flatten(summary).items() if isinstance(v, (int, float, str))})
        run.log({png.stem: wandb.Image(str(png)) for png in sorted(report_dir.glob("*.png"))})
        if traces is not None:
            run.log_artifact(labels_artifact(traces, name))
        run.finish()
    if echo:
        print((report_dir / "label-report.md").read_text())
    print(f"labels: {labels_path}; report: {report_dir}")
    return summary


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
