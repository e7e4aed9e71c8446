"""`rescue quantize`: the 2-bit GPTQ twin of the config's model."""

from __future__ import annotations

from inference.config import RescueConfig


def quantize(config: RescueConfig, out: str | None = None) -> dict:
    """Make the 2-bit GPTQ twin of `model.fp16`, calibrated on `quantization.calibration` problems."""
    from inference.decoding.models import load_tokenizer, resolve_model_source
    from inference.prompts import render_prompt
    from inference.decoding.quantize import quantize_model
    from training.benchmarks import calibration_problems

    from rescue.commands.common import refuse_shipped_destination

    out_dir = out or config.quantized_path
    refuse_shipped_destination(out_dir, "quantize", "--out" if out else "model.quantized", "--model.quantized")
    calibration = config.quantization.calibration
    source = resolve_model_source(config.model.fp16, "model")
    problems = calibration_problems(calibration.benchmark, calibration.split, calibration.path, calibration.size)
    tokenizer = load_tokenizer(source)
    with_solution = calibration.text == "solution"
    texts = [render_prompt(tokenizer, p.question) + ((p.solution or "") if with_solution else "") for p in problems]
    print(f"quantizing {config.model.fp16} to {config.quantization.bits} bits "
          f"(group size {config.quantization.group_size}) on {len(texts)} calibration problems "
          f"({'prompts and worked solutions' if with_solution else 'prompts only'})")
    summary = quantize_model(str(source), out_dir, texts, config.quantization, device=config.model.device)
    if summary["kept_fp16"]:
        print(f"kept {len(summary['kept_fp16'])} linears in full precision "
              f"(quantization.keep_fp16 {config.quantization.keep_fp16})")
    if summary.get("wider"):
        print(f"quantized {len(summary['wider'])} linears to {config.quantization.wider_bits} bits "
              f"(quantization.wider {config.quantization.wider})")
    print(f"wrote {summary['out']} in {summary['seconds']:.1f} s")
    return summary
