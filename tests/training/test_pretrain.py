import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from rescue.cli import main


def test_pretrain_writes_a_loadable_model_folder_and_a_checkpoint_per_epoch(tmp_path):
    out = tmp_path / "tiny-x"
    argv = ["pretrain", "--config", "tiny-s", "--out", str(out), "--output_dir", str(tmp_path / "runs"),
            "--wandb", "disabled", "--pretrain.hidden_size", "32", "--pretrain.num_layers", "1",
            "--pretrain.intermediate_size", "64", "--pretrain.train_problems", "64", "--pretrain.val_problems", "8",
            "--pretrain.epochs", "2", "--pretrain.batch_size", "32", "--pretrain.warmup_steps", "1"]
    assert main(argv) == 0
    record = json.loads((out / "pretrain.json").read_text())
    assert record["steps"] == 4 and record["train_traces"] == 64
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.hidden_size == 32 and len(tokenizer) <= model.config.vocab_size
    assert len(list((tmp_path / "runs" / "tiny-s" / "pretrain" / "checkpoints").glob("*.ckpt"))) == 2
    assert not out.with_name("tiny-x.partial").exists()
