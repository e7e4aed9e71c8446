"""W&B as the experiment tracker, read back from the offline run files that `wandb sync` would upload."""

import json
from pathlib import Path

import pytest

from inference.config import load_config
from inference.tracking import (check_wandb_mode, comparison_artifact, comparison_table, detector_artifact,
                                experiment, labels_artifact, method_metrics, stage_config, start_run,
                                trace_set_artifact, use_artifacts)

BLOCK = 32768  # wandb's transaction log: LevelDB-style 32 KiB blocks, 7-byte record headers


def read_records(path: Path):
    """The protobuf records of one offline `run-*.wandb` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, payload = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length:  # still being written
            return
        pos += 7 + length
        payload = chunk if kind in (1, 2) else payload + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(payload)
            yield record


def finished_run_files(folder: Path, timeout: float = 60.0) -> list[Path]:
    """The run files under `folder`, once each holds its exit record (W&B writes them after finish() returns)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        paths = sorted(folder.rglob("offline-run-*/run-*.wandb"))
        kinds = [{r.WhichOneof("record_type") for r in read_records(p)} for p in paths]
        if all("exit" in k for k in kinds) or time.monotonic() > deadline:
            return paths
        time.sleep(0.2)


def offline_runs(folder: Path) -> dict[str, dict]:
    """job type -> {group, config, logged, outputs, inputs} of every offline run under `folder`."""
    runs = {}
    for path in finished_run_files(folder):
        run = {"outputs": {}, "inputs": {}, "config": {}, "logged": {}}
        for record in read_records(path):
            kind = record.WhichOneof("record_type")
            if kind in ("run", "config"):
                if kind == "run":
                    run["group"], run["job_type"] = record.run.run_group, record.run.job_type
                items = record.run.config.update if kind == "run" else record.config.update
                run["config"].update({i.key: json.loads(i.value_json) for i in items if i.key != "_wandb"})
            elif kind == "history":
                run["logged"].update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                      for item in record.history.item})
            elif kind == "artifact":
                side = "inputs" if record.artifact.use_after_commit else "outputs"
                run[side][record.artifact.name] = (record.artifact.type, record.artifact.digest)
        runs[run["job_type"]] = run
    return runs


def fake_stage_folders(root: Path) -> dict[str, Path]:
    """The files each stage's artifact is made of, as the stages write them."""
    traces = root / "run-traces-train-4"
    traces.mkdir(parents=True)
    (traces / "manifest.json").write_text(json.dumps({"shards": [{"rows": 4}]}))
    (traces / "shard-00000.safetensors").write_bytes(b"\0" * 64)
    detector = root / "detector"
    detector.mkdir()
    (detector / "card.json").write_text("{}")
    (detector / "weights.safetensors").write_bytes(b"\1" * 32)
    compare = root / "run-compare"
    compare.mkdir()
    (compare / "comparison.json").write_text("{}")
    (compare / "comparison.md").write_text("# table\n")
    return {"traces": traces, "detector": detector, "compare": compare}


def test_a_rescue_run_is_one_group_whose_artifacts_chain_collect_label_train_compare(tmp_path):
    config = load_config("tiny-s", {"wandb.mode": "offline", "output_dir": str(tmp_path)})
    folders = fake_stage_folders(tmp_path / "tiny-s")
    summaries = {"2bit": {"accuracy": 0.5, "mean_tokens_fp16": 0.0}, "learned": {"accuracy": 0.75,
                                                                                "mean_tokens_fp16": 12.0}}

    def stage(job_type, inputs=(), outputs=(), log=None):
        run = start_run("offline", "p", f"tiny-s-{job_type}", job_type, stage_config(config, job_type), tmp_path)
        use_artifacts(run, inputs)
        if log:
            run.log(log)
        for artifact in outputs:
            run.log_artifact(artifact)
        run.finish()

    with experiment("tiny-s-run-1"):
        stage("collect", outputs=[trace_set_artifact(folders["traces"], "tiny-s")])
        (folders["traces"] / "labels.json").write_text("{}")  # rescue label writes it beside the traces
        stage("label", [trace_set_artifact(folders["traces"], "tiny-s")], [labels_artifact(folders["traces"], "tiny-s")])
        stage("train", [labels_artifact(folders["traces"], "tiny-s")], [detector_artifact(folders["detector"], "tiny-s")])
        stage("compare", [detector_artifact(folders["detector"], "tiny-s")],
              [comparison_artifact(folders["compare"], "tiny-s")],
              log={"comparison": comparison_table("tiny-s", summaries)})
        run = start_run("offline", "p", "tiny-s-report", "report", config.to_dict(), tmp_path)
        use_artifacts(run, [comparison_artifact(folders["compare"], "tiny-s")])
        run.finish()
    alone = start_run("offline", "p", "tiny-s-label", "detect-report", stage_config(config, "detect-report"),
                      tmp_path / "alone")
    alone.finish()

    runs = offline_runs(tmp_path)
    assert {name: run["group"] for name, run in runs.items() if name != "detect-report"} == {
        job: "tiny-s-run-1" for job in ("collect", "label", "train", "compare", "report")}
    assert runs["detect-report"]["group"] == ""
    # Lineage: what a stage read is what the stage before it wrote (same name, same digest).
    for producer, consumer in (("collect", "label"), ("label", "train"), ("train", "compare"), ("compare", "report")):
        assert runs[consumer]["inputs"], consumer
        for name, found in runs[consumer]["inputs"].items():
            assert runs[producer]["outputs"][name] == found, (producer, consumer, name)
    assert [kind for kind, _ in runs["collect"]["outputs"].values()] == ["trace-set"]
    assert [kind for kind, _ in runs["train"]["outputs"].values()] == ["detector"]
    # The whole config once (the report run); the stages their own sections; a stage alone all of it.
    assert {"quantization", "capture", "detector"} <= set(runs["report"]["config"])
    assert set(runs["label"]["config"]) == {"model_name", "labels"}
    assert "quantization" not in runs["compare"]["config"]
    assert "quantization" in runs["detect-report"]["config"]
    logged = runs["compare"]["logged"]
    assert logged["comparison/_type"] == "table-file"
    assert (logged["comparison/nrows"], logged["comparison/ncols"]) == (2, 4)  # model, method, 2 metrics


def test_a_trace_set_artifact_changes_version_with_its_manifest_only(tmp_path):
    folder = fake_stage_folders(tmp_path)["traces"]
    before = trace_set_artifact(folder, "m")
    (folder / "shard-00000.safetensors").write_bytes(b"\2" * 64)  # shards are not part of it
    assert trace_set_artifact(folder, "m").digest == before.digest
    (folder / "manifest.json").write_text(json.dumps({"shards": [{"rows": 5}]}))
    assert trace_set_artifact(folder, "m").digest != before.digest


def test_metric_names_are_the_same_for_every_method():
    summary = {"accuracy": 0.5, "method": "rule", "problems": 4, "finish_reasons": {"eos": 3, "budget": 1},
               "actions": {"commit": 2}, "accuracy_ci95": [0.1, 0.9]}
    assert method_metrics("rule", summary) == {"rule/accuracy": 0.5, "rule/problems": 4,
                                               "rule/finish_reasons/eos": 3, "rule/finish_reasons/budget": 1,
                                               "rule/actions/commit": 2}
    assert set(k.split("/", 1)[1] for k in method_metrics("fp16", summary)) == set(
        k.split("/", 1)[1] for k in method_metrics("rule", summary))


def test_online_without_a_login_falls_back_to_offline_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent-netrc"))
    settings = load_config("tiny-s", {"wandb.mode": "online"}).wandb
    check_wandb_mode(settings)
    err = capsys.readouterr().err.strip().splitlines()
    assert settings.mode == "offline"
    assert len(err) == 1 and "wandb login" in err[0] and "WANDB_API_KEY" in err[0] and "offline" in err[0]


def test_online_with_an_unreachable_server_falls_back_to_offline(monkeypatch, capsys):
    import socket

    with socket.socket() as closed:  # a local port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    settings = load_config("tiny-s", {"wandb.mode": "online"}).wandb
    check_wandb_mode(settings)
    err = capsys.readouterr().err.strip().splitlines()
    assert settings.mode == "offline"
    assert len(err) == 1 and "cannot be reached" in err[0]


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_other_modes_are_left_as_they_are(mode, capsys):
    settings = load_config("tiny-s", {"wandb.mode": mode}).wandb
    check_wandb_mode(settings)
    assert settings.mode == mode and capsys.readouterr().err == ""
