import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rescue.cli import main


def pretrain_argv(tmp_path, **fields) -> list[str]:
    """`rescue pretrain` of tiny-s's config into tmp_path/tiny-x, with `--pretrain.<field> <value>` flags."""
    argv = ["pretrain", "--config", "tiny-s", "--out", str(tmp_path / "tiny-x"),
            "--output_dir", str(tmp_path / "runs"), "--wandb", "disabled"]
    for name, value in fields.items():
        argv += [f"--pretrain.{name}", str(value)]
    return argv


def test_pretrain_writes_a_loadable_model_folder_and_a_checkpoint_per_epoch(tmp_path):
    from inference.config import load_config

    out = tmp_path / "tiny-x"
    argv = pretrain_argv(tmp_path, hidden_size=32, num_layers=1, intermediate_size=64, train_problems=64,
                         val_problems=8, epochs=2, batch_size=32, warmup_steps=1)
    assert main(argv) == 0
    record = json.loads((out / "pretrain.json").read_text())
    assert record["steps"] == 4 and record["train_traces"] == 64
    assert record["recipe"]["batch_size"] == 32 and record["recipe"]["hidden_size"] == 32
    assert record["recipe"]["weight_decay"] == load_config("tiny-s").pretrain.weight_decay
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.hidden_size == 32 and len(tokenizer) <= model.config.vocab_size
    assert len(list((tmp_path / "runs" / "tiny-s" / "pretrain" / "checkpoints").glob("*.ckpt"))) == 2
    assert not out.with_name("tiny-x.partial").exists()


def test_pretrain_trace_style_fields_shape_the_training_traces_and_are_recorded(tmp_path):
    from inference.config import load_config
    from training.pretrain import ArithTraceData
    from training.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()

    def verification_passes(overrides):
        spec = load_config("tiny-s", overrides).pretrain
        data = ArithTraceData(tokenizer, spec)
        data.setup()
        texts = [tokenizer.decode(ids) for ids, _ in data.train_set.examples]
        return sum(text.count("Let me verify") for text in texts) / len(texts)

    small = {"pretrain.train_problems": 200, "pretrain.val_problems": 4}
    plain = verification_passes({**small, "pretrain.verify_rate": 0.5, "pretrain.final_slip_rate": 0.2,
                                 "pretrain.max_verification_passes": 4, "pretrain.max_trace_chars": 750})
    heavy = verification_passes({**small, "pretrain.verify_rate": 0.9, "pretrain.final_slip_rate": 0.35,
                                 "pretrain.max_verification_passes": 6, "pretrain.max_trace_chars": 1000})
    assert plain < 1.0 < 1.5 < heavy
    assert verification_passes({**small, "pretrain.verify_rate": 0.0}) == 0.0

    out = tmp_path / "tiny-x"
    argv = pretrain_argv(tmp_path, hidden_size=16, num_layers=1, intermediate_size=32, train_problems=32,
                         val_problems=4, epochs=1, batch_size=32, verify_rate=0.9)
    assert main(argv) == 0
    assert json.loads((out / "pretrain.json").read_text())["trace_style"]["verify_rate"] == 0.9


def test_pretrain_task_chooses_the_problems_it_learns_and_is_checked(tmp_path, capsys):
    from inference.config import load_config
    from training.arith import arith_problems
    from training.pretrain import ArithTraceData
    from training.tokenizer import build_tokenizer

    spec = load_config("tiny-s", {"pretrain.task": "arith-hard", "pretrain.train_problems": 20,
                                  "pretrain.val_problems": 3}).pretrain
    data = ArithTraceData(build_tokenizer(), spec)
    data.setup()
    text = data.tokenizer.decode(data.val_set.examples[0][0])
    assert arith_problems("val", limit=1, seed=spec.seed, task="arith-hard")[0].question in text

    assert main(pretrain_argv(tmp_path, task="arith-medium")) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "pretrain.task" in error[0] and "arith-hard" in error[0]
    assert not (tmp_path / "tiny-x").exists()


def test_pretrain_refuses_a_trace_style_no_problem_fits(tmp_path, capsys):
    out = tmp_path / "tiny-x"
    assert main(pretrain_argv(tmp_path, train_problems=8, max_trace_chars=60)) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "max_trace_chars=60" in error[0]
    assert not out.exists() and not out.with_name("tiny-x.partial").exists()
    assert main(pretrain_argv(tmp_path, verify_rate=1.5)) != 0 and "pretrain.verify_rate" in capsys.readouterr().err


def test_pretrain_resume_continues_from_the_newest_epoch_checkpoint(tmp_path, capsys):
    small = dict(hidden_size=16, num_layers=1, intermediate_size=32, train_problems=64, val_problems=4,
                 batch_size=32, warmup_steps=1)
    checkpoints = tmp_path / "runs" / "tiny-s" / "pretrain" / "checkpoints"
    # Nothing to resume from: one line, nothing written.
    assert main(pretrain_argv(tmp_path, epochs=1, **small) + ["--resume"]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no epoch checkpoint" in error[0] and str(checkpoints) in error[0]
    assert not (tmp_path / "tiny-x").exists()

    assert main(pretrain_argv(tmp_path, epochs=1, **small)) == 0
    assert [p.name for p in checkpoints.glob("*.ckpt")] == ["epoch=0-step=2.ckpt"]
    assert main(pretrain_argv(tmp_path, epochs=2, **small) + ["--resume"]) == 0
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"]
    record = json.loads((tmp_path / "tiny-x" / "pretrain.json").read_text())
    assert record["resumed_from"].endswith("epoch=0-step=2.ckpt") and record["steps"] == 4
    # Resuming a finished run trains nothing more; its record still carries a validation loss.
    assert main(pretrain_argv(tmp_path, epochs=2, **small) + ["--resume"]) == 0
    record = json.loads((tmp_path / "tiny-x" / "pretrain.json").read_text())
    assert record["resumed_from"].endswith("epoch=1-step=4.ckpt") and math.isfinite(record["val_loss"])
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"]

    # A checkpoint of another architecture is refused in one line, before training starts.
    capsys.readouterr()
    wider = {**small, "hidden_size": 32}
    assert main(pretrain_argv(tmp_path, epochs=3, **wider) + ["--resume"]) != 0
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and "does not fit the config's model" in error[0] and "(102, 16)" in error[0]
    assert "Epoch" not in captured.out + captured.err

    # A truncated checkpoint (the newest one) is refused in one line.
    (checkpoints / "epoch=5-step=12.ckpt").write_bytes((checkpoints / "epoch=1-step=4.ckpt").read_bytes()[:100])
    assert main(pretrain_argv(tmp_path, epochs=8, **small) + ["--resume"]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "cannot read" in error[0] and "epoch=5-step=12.ckpt" in error[0]


def test_pretrain_init_starts_from_saved_weights_and_refuses_another_architecture(tmp_path, capsys):
    small = dict(hidden_size=16, num_layers=1, intermediate_size=32, train_problems=64, val_problems=4,
                 batch_size=32, warmup_steps=1, epochs=1)

    def argv_to(folder, **fields):
        argv = pretrain_argv(tmp_path, **{**small, **fields})
        argv[argv.index("--out") + 1] = str(tmp_path / folder)
        return argv

    first = tmp_path / "first"
    assert main(argv_to("first")) == 0
    base = AutoModelForCausalLM.from_pretrained(first)

    # Continued training with a vanishing learning rate keeps the saved weights: they were loaded.
    assert main(argv_to("continued", seed=5, learning_rate=1e-12) + ["--init", str(first)]) == 0
    record = json.loads((tmp_path / "continued" / "pretrain.json").read_text())
    assert record["initialized_from"] == str(first) and record["seed"] == 5
    continued = AutoModelForCausalLM.from_pretrained(tmp_path / "continued")
    for (name, saved), (_, now) in zip(base.state_dict().items(), continued.state_dict().items()):
        assert torch.equal(saved, now), name
    # The same run without --init is another model.
    assert main(argv_to("fresh", seed=5, learning_rate=1e-12)) == 0
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "fresh")
    assert not torch.equal(fresh.model.embed_tokens.weight, base.model.embed_tokens.weight)

    # Another architecture, a missing folder, or --init with --resume: one line each, nothing written.
    capsys.readouterr()
    wider = argv_to("other", hidden_size=32)
    assert main(wider + ["--init", str(first)]) != 0
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()  # no weight-loading bar before it
    assert len(error) == 1 and error[0].startswith("error:")
    assert "does not fit the config's model" in error[0] and "(102, 16)" in error[0]
    assert "Epoch" not in captured.out + captured.err
    assert main(wider + ["--init", str(tmp_path / "nowhere")]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "nowhere" in error[0]
    assert main(wider + ["--init", str(first), "--resume"]) != 0
    assert "exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.partial").exists()
