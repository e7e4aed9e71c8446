import pytest

from inference.config import load_config, resolve_config_path
from inference.errors import ConfigError

MINIMAL = "model:\n  name: tiny\n  fp16: some/folder\n"


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_config_fills_qwen3_thinking_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert (config.sampling.temperature, config.sampling.top_p, config.sampling.top_k) == (0.6, 0.95, 20)
    assert config.quantization.bits == 2
    assert config.quantized_path.endswith("tiny-2bit")


@pytest.mark.parametrize(
    "text, message",
    [
        (MINIMAL + "sampling:\n  budget: 0\n", "field 'sampling.budget' must be a positive integer, got 0"),
        (MINIMAL + "sampling:\n  budget: many\n", "field 'sampling.budget' must be an integer, got str 'many'"),
        (MINIMAL + "sampling:\n  temperature: warm\n", "field 'sampling.temperature' must be a number, got str 'warm'"),
        (MINIMAL + "sampling:\n  temperature: 1e\n", "field 'sampling.temperature' must be a number, got str '1e'"),
        (MINIMAL + "sampling:\n  temprature: 0.5\n", "unknown field 'sampling.temprature'"),
        (MINIMAL + "extra: 1\n", "unknown field 'extra'"),
        ("model:\n  name: tiny\n", "missing required field 'model.fp16'"),
        ("sampling:\n  budget: 5\n", "missing required section 'model'"),
        (MINIMAL + "probe:\n  layers: [1, x]\n", "field 'probe.layers[1]' must be an integer"),
        (MINIMAL + "quantization:\n  bits: 5\n", "field 'quantization.bits' must be one of 2, 3, 4, 8, got 5"),
        (MINIMAL + "wandb:\n  mode: maybe\n", "field 'wandb.mode' must be one of offline, online, disabled"),
        (MINIMAL + "quantization:\n  desc_act: 1\n", "field 'quantization.desc_act' must be true or false"),
        (MINIMAL + "quantization:\n  keep_fp16: mlp\n", "field 'quantization.keep_fp16' must be a list of str"),
        (MINIMAL + "quantization:\n  keep_fp16: [mlp, '(self_attn']\n",
         "field 'quantization.keep_fp16[1]' must be a regular expression, got '(self_attn' (missing ), "),
        ("- just\n- a list\n", "expected a mapping of config sections"),
        ("model: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_configs_name_the_file_and_the_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(str(path))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_overrides_replace_fields_and_are_validated(tmp_path):
    path = write(tmp_path, MINIMAL)
    config = load_config(path, {"sampling.budget": 32, "benchmark.name": "arith"})
    assert config.sampling.budget == 32 and config.benchmark.name == "arith"
    with pytest.raises(ConfigError, match="'sampling.top_k' must be >= 0"):
        load_config(path, {"sampling.top_k": -1})


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as a string; a user writing it in a config or a flag means a number.
    config = load_config(write(tmp_path, MINIMAL + "pretrain:\n  learning_rate: 1e-3\n"), {"sampling.top_p": "9.5E-1"})
    assert config.pretrain.learning_rate == 0.001 and config.sampling.top_p == 0.95


def test_keep_fp16_defaults_to_quantizing_everything_and_takes_regex_lists(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert load_config(path).quantization.keep_fp16 == []
    config = load_config(path, {"quantization.keep_fp16": ["mlp", r"^model\.layers\.0\."]})
    assert config.quantization.keep_fp16 == ["mlp", r"^model\.layers\.0\."]


def test_missing_config_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="config file not found .*qwen3-8b.*tiny-s"):
        resolve_config_path("no-such-size")


@pytest.mark.parametrize("name", ["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b"])
def test_shipped_qwen3_configs_name_real_ids_and_thinking_sampling(name):
    config = load_config(name)
    assert config.model.fp16 == "Qwen/Qwen3-" + name.split("-")[1].upper().replace("B", "B")
    assert (config.sampling.temperature, config.sampling.top_p, config.sampling.top_k) == (0.6, 0.95, 20)
    assert config.quantization.bits == 2 and config.probe.layers


@pytest.mark.parametrize("name", ["tiny-s", "tiny-m", "tiny-l"])
def test_shipped_family_configs_validate(name):
    config = load_config(name)
    assert config.model.name == name and config.benchmark.name == "arith"


@pytest.mark.parametrize("overrides, message", [
    ({"rescue.fp16_budget": 1.5}, "field 'rescue.fp16_budget' must be <= 1.0, got 1.5"),
    ({"rescue.fp16_budget": -0.1}, "field 'rescue.fp16_budget' must be >= 0.0, got -0.1"),
    ({"rescue.curve_budgets": [0.1, 2.0]}, "field 'rescue.curve_budgets[1]' must be <= 1.0, got 2.0"),
])
def test_an_fp16_budget_outside_zero_to_one_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config("tiny-s", overrides)
