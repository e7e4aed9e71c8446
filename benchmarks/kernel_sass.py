"""Benchmark without a GPU: the fused 2-bit kernel compiled for sm_90 (H100, H200) here, and the machine
instructions of its K loop counted per weight.

Triton compiles a kernel for any target without the GPU (its own ptxas ships with it), and `cuobjdump` (also
in Triton's package) disassembles the result. The one-row tile is bound by the instructions it issues a weight,
not by memory (its time is the same on an H100 and an H200), so the count of its loop, divided by the weights a
thread multiplies per pass of the loop, says where its time goes and what a change saves, before a GPU times it.
The signature is the one a bf16 Qwen3 call compiles to (pointers and K, N, group size multiples of 16).

    python3 benchmarks/kernel_sass.py --block-n 128 256 --out kernel-sass.json

Triton's version decides the code: the GPU machines of `docs/results.md` ran Triton 3.6, this counts with the
installed one (3.8 in the CPU install of 2026-12).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.decoding import kernels  # noqa: E402

SIGNATURE = {"x_ptr": "*bf16", "qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*bf16",
             "bias_ptr": "*bf16", "out_ptr": "*bf16", "partial_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
             "group_size": "i32", "zeros_stride": "i32", "split_k": "i32", "top_exponent_bits": "i32"}
DIVISIBLE = ("x_ptr", "qweight_ptr", "qzeros_ptr", "scales_ptr", "bias_ptr", "out_ptr", "partial_ptr", "N", "K",
             "group_size", "zeros_stride")
BLOCK_K = 128  # the K tile of every Qwen3 call at group 128 (`kernels._block_k`)
INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")


def compile_sm90(block_n: int):
    fn = kernels._gptq2_matmul_kernel
    constants = {"BLOCK_M": 1, "BLOCK_N": block_n, "BLOCK_K": BLOCK_K, "MANTISSA_BITS": 23, "DOT_PRECISION": "tf32",
                 "FOLD_OFFSETS": True, "HAS_BIAS": False}
    source = ASTSource(fn=fn, signature={**SIGNATURE, **{name: "constexpr" for name in constants}},
                       constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()},
                       attrs={(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in DIVISIBLE})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": kernels.WARPS[1], "num_stages": 1})


def cuobjdump(cubin: bytes, option: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        return subprocess.run([str(tool), option, handle.name], capture_output=True, text=True, check=True).stdout


def registers(cubin: bytes) -> int:
    return int(re.search(r"REG:(\d+)", cuobjdump(cubin, "-res-usage")).group(1))


def loop_opcodes(cubin: bytes) -> collections.Counter:
    """Opcodes (without modifiers) between the target and the source of the program's one backward branch."""
    sass = cuobjdump(cubin, "-sass")
    listing = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(INSTRUCTION.match, sass.splitlines()) if m]
    loops = []
    for address, opcode, rest in listing:
        target = re.search(r"0x([0-9a-f]+)", rest) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    if len(loops) != 1:
        raise RuntimeError(f"expected one loop in the kernel, found {len(loops)}")
    start, end = loops[0]
    return collections.Counter(op.split(".")[0] for address, op, _ in listing if start <= address <= end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block-n", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--out", default="kernel-sass.json")
    args = parser.parse_args()
    threads = 32 * kernels.WARPS[1]
    report = {"triton": triton.__version__, "target": "sm_90", "rows": 1, "block_k": BLOCK_K, "threads": threads,
              "variants": []}
    print("| block_n | loop instructions | weights a thread | instructions a weight | registers | top opcodes |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for block_n in args.block_n:
        compiled = compile_sm90(block_n)
        opcodes = loop_opcodes(compiled.asm["cubin"])
        total = sum(opcodes.values())
        weights = BLOCK_K * block_n // threads  # one K tile a pass
        entry = {"block_n": block_n, "loop_instructions": total, "weights_per_thread": weights,
                 "instructions_per_weight": total / weights, "registers": registers(compiled.asm["cubin"]),
                 "opcodes": dict(opcodes.most_common())}
        report["variants"].append(entry)
        top = ", ".join(f"{op} {n}" for op, n in opcodes.most_common(8))
        print(f"| {block_n} | {total} | {weights} | {total / weights:.2f} | {entry['registers']} | {top} |", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
