"""The typed configuration every `rescue` command reads: one YAML file per model size.

Plain dataclasses are the schema: each field has a type, a default (or none, if required) and a help
text that becomes the `--section.field` command-line flag. `load_config` validates a YAML file
strictly against them (unknown keys, wrong types, missing required fields and out-of-range values
are errors that name the file and the field), then applies command-line overrides with the same
checks.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from inference.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = "tiny-m"
"""The main job's model: the embedded tiny-m with its shipped 2-bit twin, in the paper's failure regime
(MODEL_CARD.md). tiny-s, five times smaller, is the fast model of the tests."""


def _help(text: str, **checks: Any) -> dict[str, Any]:
    return {"help": text, **checks}


@dataclass
class ModelConfig:
    """Which model pair to run: the full-precision model and its 2-bit GPTQ twin."""

    name: str = field(metadata=_help("short name used in run folders and W&B (e.g. qwen3-8b)"))
    fp16: str = field(metadata=_help("full-precision model: Hugging Face id or local folder"))
    quantized: str | None = field(
        default=None,
        metadata=_help(
            "2-bit GPTQ model: local folder or published checkpoint id; "
            "default: <output_dir>/<name>-2bit, where `rescue quantize` writes it"
        ),
    )
    dtype: str = field(
        default="auto",
        metadata=_help(
            "compute dtype of the full-precision model: auto (bfloat16 on GPU, float32 on CPU), "
            "float16, bfloat16 or float32",
            choices=("auto", "float16", "bfloat16", "float32"),
        ),
    )
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:N"))
    kernel: str = field(
        default="dequantized",
        metadata=_help(
            "how the 2-bit model runs: dequantized (its 2-bit weights unpacked once into plain linears: "
            "same traces, fast for small models and CPUs), gptq (GPTQModel's packed kernels), fused "
            "(packed 2-bit weights through our fused Triton decode kernel, inference/decoding/kernels.py; CUDA only) "
            "or fused-grouped (fused, with each layer's q/k/v and gate/up projections one kernel call each: "
            "faster decode steps for 0.7x more 2-bit weight memory)",
            choices=("dequantized", "gptq", "fused", "fused-grouped"),
        ),
    )
    fp16_grouped: bool = field(
        default=False,
        metadata=_help(
            "the full-precision model runs each layer's q/k/v projections as one matmul and gate/up as another "
            "(no memory added; a compiled Qwen3-8B bf16 decode step in 0.93x the time on one H100, no gain on a CPU)"
        ),
    )


@dataclass
class SamplingConfig:
    """How tokens are drawn (Qwen3 thinking-mode defaults) and how many may be generated."""

    temperature: float = field(default=0.6, metadata=_help("0 means greedy decoding", min=0.0))
    top_p: float = field(default=0.95, metadata=_help("nucleus sampling mass", min=0.0, max=1.0))
    top_k: int = field(default=20, metadata=_help("keep the k most likely tokens; 0 disables", min=0))
    budget: int = field(default=2048, metadata=_help("maximum generated tokens per trace", min=1))
    seed: int = field(default=0, metadata=_help("random seed of sampling"))
    batch_size: int = field(default=8, metadata=_help("sequences decoded together", min=1))
    decode: str = field(default="dynamic", metadata=_help(
        "decoding path: dynamic (growing KV cache), static (static KV cache; on a GPU every decode step "
        "is one CUDA-graph replay) or compiled (static, the step through torch.compile first: one to three "
        "minutes of compilation per model, batch size and window size, reused by later calls of the process); "
        "all choose the same greedy tokens",
        choices=("dynamic", "static", "compiled")))


@dataclass
class CalibrationConfig:
    """Problems GPTQ calibrates on (the benchmark's train split)."""

    benchmark: str = field(default="gsm8k", metadata=_help(
        "benchmark name (math500, gsm8k, aime24, arith, arith-hard, arith-xhard)"))
    split: str = field(default="train", metadata=_help("split to draw calibration problems from"))
    path: str | None = field(default=None, metadata=_help("local JSONL/Parquet file instead of the hub"))
    size: int = field(default=128, metadata=_help("number of calibration problems", min=1))
    text: str = field(
        default="solution",
        metadata=_help("what one calibration text holds: the prompt and its worked solution (solution), or the prompt "
                       "alone (question), as when a reasoning model is calibrated on text with no thinking traces",
                       choices=("solution", "question")),
    )


@dataclass
class QuantizationConfig:
    """GPTQ settings of the low-bit twin."""

    bits: int = field(default=2, metadata=_help("weight bits", choices=(2, 3, 4, 8)))
    group_size: int = field(default=64, metadata=_help("columns sharing one scale; -1 for per-channel"))
    desc_act: bool = field(default=False, metadata=_help("GPTQ act-order (quantize columns by activation size)"))
    damp_percent: float = field(default=0.05, metadata=_help("Hessian dampening", min=0.0, max=1.0))
    keep_fp16: list[str] = field(
        default_factory=list,
        metadata=_help("regular expressions of module names (as in model.layers.0.self_attn.q_proj) whose linears "
                       "stay in full precision; a pattern matches anywhere in the name (mlp keeps every MLP, "
                       "^model\\.layers\\.0\\. the first layer); default: quantize every linear", regex=True),
    )
    wider: list[str] = field(
        default_factory=list,
        metadata=_help("regular expressions of module names whose linears are quantized to quantization.wider_bits "
                       "instead of quantization.bits (mixed precision: mlp gives every MLP more bits); matched as "
                       "keep_fp16 is, which wins where both match; default: none", regex=True),
    )
    wider_bits: int = field(default=4, metadata=_help("weight bits of the linears named by quantization.wider",
                                                      choices=(2, 3, 4, 8)))
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


@dataclass
class ProbeConfig:
    """What the learned detector reads."""

    layers: list[int] = field(
        default_factory=lambda: [-1],
        metadata=_help("decoder layers whose output hidden states are captured (negative counts from the end)"),
    )


@dataclass
class CaptureConfig:
    """Which generated positions keep their hidden states in a trace set."""

    stride: int = field(default=8, metadata=_help("keep every stride-th generated position", min=1))
    window: int = field(
        default=32, metadata=_help("also keep every position within this many tokens of a label event", min=0)
    )
    dtype: str = field(default="float16", metadata=_help("stored dtype", choices=("float16", "bfloat16")))
    shard_size: int = field(default=64, metadata=_help("traces per shard file", min=1))
    samples: int = field(default=1, metadata=_help("sampled traces per problem", min=1))


@dataclass
class LabelsConfig:
    """Label definitions (see training/labels.py): loops, commitment, and the probe's per-position targets."""

    max_period: int = field(default=128, metadata=_help("P: longest repeating block, in tokens", min=1))
    min_repeats: int = field(default=3, metadata=_help("R: consecutive occurrences that make a loop", min=2))
    min_span: int = field(default=48, metadata=_help("L: tokens a loop must cover at least", min=1))
    horizon: int = field(default=64, metadata=_help("H: loop_within_h is true this many tokens before onset", min=0))
    commit_delay: int = field(
        default=256, metadata=_help("D: tokens after the first candidate answer that make commitment delayed", min=0)
    )


@dataclass
class DetectorConfig:
    """The learned detector: probe architecture, features, training and threshold calibration."""

    hidden_width: int = field(
        default=64, metadata=_help("width of the probe's MLP body; 0 makes the probe linear", min=0)
    )
    hidden_layers: int = field(default=1, metadata=_help("hidden layers of the MLP body (1 or 2; unused when linear)",
                                                         min=1, max=2))
    dropout: float = field(default=0.1, metadata=_help("dropout after each hidden layer", min=0.0, max=1.0))
    mean_window: int = field(
        default=32,
        metadata=_help("also feed the running mean of the states on the capture grid within the last W generated "
                       "tokens (W // capture stride states); 0 disables", min=0),
    )
    learning_rate: float = field(default=1e-3, metadata=_help("AdamW learning rate", min=0.0))
    weight_decay: float = field(default=1e-4, metadata=_help("AdamW weight decay", min=0.0))
    max_epochs: int = field(default=30, metadata=_help("most passes over the training traces", min=1))
    batch_size: int = field(default=512, metadata=_help("captured positions per optimizer step", min=1))
    early_stopping_patience: int = field(
        default=4, metadata=_help("epochs without a better validation AUPRC of loop_within_h before stopping", min=1)
    )
    val_fraction: float = field(
        default=0.2, metadata=_help("share of problems held out for validation when no --val trace set is given",
                                    min=0.0, max=1.0)
    )
    patience: int = field(
        default=2, metadata=_help("k: an alarm needs k consecutive probe steps above the threshold", min=1)
    )
    target_false_alarm_rate: float = field(
        default=0.05,
        metadata=_help("calibrated share of healthy validation traces (no loop, committed) with an alarm",
                       min=0.0, max=1.0),
    )
    feature_device: str = field(default="auto", metadata=_help(
        "where training builds the probe's features from the stored states: 'auto' (the GPU when the probe trains "
        "on one, else the CPU) or 'cpu'", choices=("auto", "cpu")))
    num_workers: int = field(default=0, metadata=_help(
        "DataLoader worker processes reading shards (fewer shards than workers: each shard is split between them)",
        min=0))
    seed: int = field(default=0, metadata=_help("seed of initialisation, split and data order"))
    rule_ngram: int = field(
        default=16, metadata=_help("offline comparison: n of the repeated-n-gram rule (tokens)", min=1)
    )
    rule_window: int = field(
        default=256,
        metadata=_help("offline comparison: the n-gram rule counts the newest n-gram within this many tokens", min=2),
    )
    fallback_success: float = field(
        default=0.9,
        metadata=_help("learned action policy: modeled chance that an FP16 continuation ends correct, used only to "
                       "choose its thresholds on validation traces (FP16's own accuracy is the natural value)",
                       min=0.0, max=1.0),
    )
    step_action: str = field(
        default="check",
        metadata=_help("learned action policy: what FP16 does with an arithmetic step the step head flags: check (one "
                       "forward pass over the result; FP16 rewrites from the first token it rejects) or rewrite "
                       "(FP16 rewrites every flagged result)", choices=("check", "rewrite")),
    )
    rule_confidence_window: int = field(
        default=32,
        metadata=_help("offline comparison: W of the confidence rule, which alarms once the top-token probability "
                       "stays at or above its threshold (tuned like the probe's) for W consecutive tokens", min=1),
    )


METHODS = ("fp16", "2bit", "rule", "learned", "plan-only", "rescue-only")
"""What `rescue evaluate --method` and `rescue compare` run (see inference/evaluation/compare.py)."""


@dataclass
class ControlConfig:
    """Rescue at inference: the rule trigger, the learned trigger and the actions they take."""

    detector: str | None = field(
        default=None, metadata=_help("detector artifact of the learned trigger (default: <output_dir>/<model>/detector)")
    )
    rule_plan: bool = field(default=True, metadata=_help("the rule trigger has the FP16 model plan every trace"))
    rule_ngram: int = field(default=16, metadata=_help("n of the rule's repeated-n-gram loop check (tokens)", min=1))
    rule_window: int = field(
        default=256, metadata=_help("the loop check counts the newest n-gram within this many recent tokens", min=2)
    )
    rule_count: int = field(
        default=3, metadata=_help("the loop check fires when the newest n-gram occurs this often in the window", min=2)
    )
    rule_budget_fraction: float = field(
        default=0.75,
        metadata=_help("the rule also fires once a trace has used this share of the budget still thinking; "
                       "1 disables", min=0.0, max=1.0),
    )
    plan_tokens: int = field(
        default=64, metadata=_help("plan: the FP16 model writes at most this many tokens of outline", min=0)
    )
    plan_stop: str = field(
        default="\n", metadata=_help("plan: the outline ends at the first occurrence of this text after some content")
    )
    plan_probe_tokens: int = field(
        default=1,
        metadata=_help("learned trigger: 2-bit tokens generated before the planning decision (their states are "
                       "scored; 1 = the state after the prompt only)", min=1),
    )
    on_alarm: str = field(
        default="auto",
        metadata=_help("what an alarm does: commit, fallback, or auto (commit when an answer candidate exists "
                       "before the loop, else fall back to FP16)", choices=("auto", "commit", "fallback")),
    )
    commit_template: str = field(
        default="\n</think>\n\nThe answer is \\boxed{{{answer}}}.",
        metadata=_help("commit: text appended to close the thinking with the chosen candidate ({answer})"),
    )
    commit_open: str = field(
        default="\n</think>\n\n",
        metadata=_help("commit without a candidate: text appended to close the thinking; the model then answers"),
    )
    answer_tokens: int = field(
        default=32, metadata=_help("commit without a candidate: tokens the model may spend on its answer", min=1)
    )
    fallback_span: int = field(
        default=0,
        metadata=_help("fallback: FP16 tokens before handing back to the 2-bit model; 0 = FP16 finishes the trace",
                       min=0),
    )
    max_interventions: int = field(
        default=2, metadata=_help("alarms acted on per trace; later alarms are ignored", min=1)
    )
    max_step_rewrites: int = field(
        default=48, metadata=_help("learned trigger: arithmetic step results FP16 may check or rewrite per trace (not "
                                   "counted in max_interventions)", min=0)
    )
    step_check_min_prob: float = field(
        default=0.1,
        metadata=_help("step check: FP16 rejects the first result token whose probability under it (softmax at the "
                       "sampling temperature) is below this", min=0.0, max=1.0),
    )
    step_check_cache: bool = field(
        default=True,
        metadata=_help("step check: FP16 keeps each trace's KV cache between its checks, so a check reads only "
                       "the tokens written since the last one (memory: one FP16 cache per trace it has checked)"),
    )
    round_cache: bool = field(
        default=True,
        metadata=_help("each trace keeps each model's KV cache between its batches, so a batch prefills only the "
                       "tokens its cache lacks instead of prompt and trace so far (memory: see round_cache_gib)"),
    )
    round_cache_gib: float = field(
        default=16.0,
        metadata=_help("GiB that the kept KV caches of all traces (round_cache, step_check_cache) may hold "
                       "together; a trace whose cache would pass it keeps none (Qwen3-8B: 147 KB per token)",
                       min=0.0),
    )
    active_traces: int = field(
        default=0,
        metadata=_help("most traces the controller moves at once (a trace starts once another ends), so that "
                       "only theirs hold round caches; 0 = all of them from the start", min=0),
    )
    fp16_budget: float = field(
        default=0.2,
        metadata=_help("learned trigger: FP16 tokens allowed, as a share of all tokens of a trace, when its detector "
                       "card has a calibrated action policy (thresholds chosen for the largest calibrated budget "
                       "not above this)", min=0.0, max=1.0),
    )
    curve_budgets: list[float] = field(
        default_factory=lambda: [0.1, 0.4],
        metadata=_help("rescue compare: further FP16 budgets the learned trigger runs at (methods learned@B), "
                       "drawing its accuracy-against-cost curve; [] for none", min=0.0, max=1.0),
    )
    run_train_problems: int = field(default=128, metadata=_help("rescue run: training problems collected", min=1))
    run_val_problems: int = field(default=64, metadata=_help("rescue run: validation problems collected", min=1))
    run_test_problems: int = field(default=64, metadata=_help("rescue run: test problems compared", min=1))


@dataclass
class BenchmarkConfig:
    """Which problems are evaluated."""

    name: str = field(default="gsm8k", metadata=_help(
        "benchmark name (math500, gsm8k, aime24, arith, arith-hard, arith-xhard)"))
    split: str = field(default="test", metadata=_help("split to evaluate"))
    path: str | None = field(default=None, metadata=_help("local JSONL/Parquet file instead of the hub"))


@dataclass
class PretrainConfig:
    """Architecture and training recipe of an embedded family model (tiny-s/m/l); unused by real models."""

    task: str = field(default="arith", metadata=_help(
        "generated benchmark whose train split is learned (training.arith.TASKS); evaluate on the same name",
        choices=("arith", "arith-hard", "arith-xhard")))
    hidden_size: int = field(default=128, metadata=_help("model width", min=8))
    num_layers: int = field(default=6, metadata=_help("decoder layers", min=1))
    num_heads: int = field(default=4, metadata=_help("attention heads", min=1))
    num_kv_heads: int = field(default=2, metadata=_help("key/value heads (grouped-query attention)", min=1))
    intermediate_size: int = field(default=256, metadata=_help("MLP width", min=8))
    max_length: int = field(default=1024, metadata=_help("longest trained sequence and position limit", min=16))
    train_problems: int = field(default=40000, metadata=_help("synthetic training traces (one epoch)", min=1))
    val_problems: int = field(default=500, metadata=_help("validation traces", min=1))
    epochs: int = field(default=4, metadata=_help("passes over the training traces", min=1))
    batch_size: int = field(default=64, metadata=_help("traces per optimizer step", min=1))
    learning_rate: float = field(default=2e-3, metadata=_help("peak AdamW learning rate", min=0.0))
    warmup_steps: int = field(default=200, metadata=_help("linear warm-up steps", min=0))
    weight_decay: float = field(default=0.1, metadata=_help("AdamW weight decay", min=0.0))
    seed: int = field(default=0, metadata=_help("seed of initialisation, data order and task generation"))
    # Trace style of the synthetic data (training.arith.TraceStyle); the defaults are its verify-until-agree recipe.
    slip_rate: float = field(default=0.06, metadata=_help(
        "chance that a step is first written wrong and corrected on the next line", min=0.0, max=0.99))
    recheck_rate: float = field(default=0.25, metadata=_help(
        "chance of each further re-check of an earlier step", min=0.0, max=0.99))
    verify_rate: float = field(default=0.5, metadata=_help(
        "share of traces followed by verification passes", min=0.0, max=0.99))
    final_slip_rate: float = field(default=0.2, metadata=_help(
        "chance that a verification pass ends in a slip, so another pass is needed", min=0.0, max=0.99))
    max_verification_passes: int = field(default=4, metadata=_help(
        "most verification passes one trace may hold", min=1))
    max_trace_chars: int = field(default=750, metadata=_help(
        "longest trace in characters (longer draws are redrawn)", min=50))
    close_slips: bool = field(default=False, metadata=_help(
        "the slips verification must catch are off by one only (passes differ in one digit)"))
    verify_steps: int = field(default=0, metadata=_help(
        "steps a verification pass restates: 0 for the whole chain, n for its last n", min=0))

    def trace_style(self):
        """The `training.arith.TraceStyle` these fields describe (its fields not named here keep their defaults)."""
        from training.arith import TraceStyle

        named = {f.name for f in dataclasses.fields(TraceStyle)} & {f.name for f in dataclasses.fields(self)}
        return TraceStyle(**{name: getattr(self, name) for name in named})


@dataclass
class WandbConfig:
    """Tracking in Weights & Biases (offline unless asked otherwise)."""

    mode: str = field(
        default="offline",
        metadata=_help("offline (default, never touches the network), online or disabled",
                       choices=("offline", "online", "disabled")),
    )
    project: str = field(default="lowbit-rescue", metadata=_help("W&B project"))


@dataclass
class RescueConfig:
    """Everything one model size needs, for every stage."""

    model: ModelConfig
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    rescue: ControlConfig = field(default_factory=ControlConfig)
    output_dir: str = field(default="runs", metadata=_help("where run folders are written"))

    @property
    def quantized_path(self) -> str:
        """The 2-bit model's folder or id (config value, or the default folder of `rescue quantize`)."""
        return self.model.quantized or str(Path(self.output_dir) / f"{self.model.name}-2bit")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_config_path(config: str | Path | None) -> Path:
    """A config given as a path, or as the name of a shipped config (`tiny-s`, `qwen3-8b`)."""
    if config is None:
        config = DEFAULT_CONFIG
    path = Path(config)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        path = CONFIG_DIR / f"{config}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"{config}: config file not found (shipped configs: {shipped})")
    return path


def load_config(config: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RescueConfig:
    """Read and validate a YAML config, then apply `overrides` (dotted field -> value)."""
    path = resolve_config_path(config)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return _build(RescueConfig, raw, str(path), "")


def config_fields(cls: type = RescueConfig, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """Every leaf field as (dotted name, field, type), for building command-line flags."""
    leaves = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            leaves.extend(config_fields(kind, f"{prefix}{f.name}."))
        else:
            leaves.append((f"{prefix}{f.name}", f, kind))
    return leaves


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *sections, leaf = dotted.split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"command line: cannot set {dotted}: '{section}' is not a section")
    node[leaf] = value


def _build(cls: type, raw: Any, source: str, prefix: str):
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: field '{where}' must be a mapping, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(
            f"{source}: unknown field '{prefix}{unknown[0]}' (expected one of: {', '.join(known)})"
        )
    values = {}
    for name, f in known.items():
        dotted = f"{prefix}{name}"
        kind = hints[name]
        if name not in raw:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and dataclasses.is_dataclass(kind):
                raise ConfigError(f"{source}: missing required section '{dotted}'")
            if required:
                raise ConfigError(f"{source}: missing required field '{dotted}'")
            continue
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, raw[name] if raw[name] is not None else {}, source, dotted + ".")
        else:
            values[name] = _check_value(raw[name], kind, f, source, dotted)
    return cls(**values)


def _check_value(value: Any, kind: Any, f: dataclasses.Field, source: str, dotted: str) -> Any:
    value = _coerce(value, kind, source, dotted)
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        options = ", ".join(str(c) for c in meta["choices"])
        raise ConfigError(f"{source}: field '{dotted}' must be one of {options}, got {value!r}")
    # Bounds hold for a number and for every item of a list of numbers.
    items = [(f"{dotted}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(dotted, value)]
    for name, item in items if "min" in meta or "max" in meta else ():
        if item is not None and "min" in meta and item < meta["min"]:
            bound = meta["min"]
            expected = "a positive integer" if bound == 1 and isinstance(item, int) else f">= {bound}"
            raise ConfigError(f"{source}: field '{name}' must be {expected}, got {item!r}")
        if item is not None and "max" in meta and item > meta["max"]:
            raise ConfigError(f"{source}: field '{name}' must be <= {meta['max']}, got {item!r}")
    for i, pattern in enumerate(value if meta.get("regex") else ()):
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"{source}: field '{dotted}[{i}]' must be a regular expression, "
                              f"got {pattern!r} ({error})") from None
    return value


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, kind: Any, source: str, dotted: str) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, source, dotted)
    if origin is list:
        (item,) = args
        if not isinstance(value, list):
            raise ConfigError(f"{source}: field '{dotted}' must be a list of {item.__name__}, got {_describe(value)}")
        return [_coerce(v, item, source, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads 1e-3 as a string; Python and YAML 1.2 read a number
    elif kind is str:
        if isinstance(value, str):
            return value
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise ConfigError(f"{source}: field '{dotted}' must be {names.get(kind, kind)}, got {_describe(value)}")


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"
