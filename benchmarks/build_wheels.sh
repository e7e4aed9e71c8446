#!/usr/bin/env bash
# Builds the wheels that benchmarks/device_setup.sh installs on a GPU machine without network (carried
# as .whl/, at most 64 MiB). Run here, where the package registries are reachable:
#
#     bash benchmarks/build_wheels.sh [OUT_DIR]      # default .whl
#
# What goes in: the project's runtime dependencies and GPTQModel 7.3.6, with everything they pull in,
# resolved for the GPU image's Python (3.12, x86_64 Linux), less the packages that image already has
# (benchmarks/gpu-image-packages.txt: `pip list --format freeze` there, 2026-12-03; refresh it when the
# image changes). GPTQModel is built here from its source without the CUDA extension: a pure-Python
# wheel (the 2-bit kernel the project runs is its own). A dependency with neither a 3.12 wheel nor a
# pure-Python build (PyPcre, a C extension GPTQModel imports) goes in as its source, .whl/src/, which
# device_setup.sh compiles there against the system's PCRE2.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
image=benchmarks/gpu-image-packages.txt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
target=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p "$out"
echo "building gptqmodel 7.3.6 (no CUDA extension)"
BUILD_CUDA_EXT=0 GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-2} \
    pip wheel -q --no-deps --no-build-isolation gptqmodel==7.3.6 -w "$work"
echo "resolving the dependency closure"
pip install -q --dry-run --ignore-installed --report "$work/closure.json" \
    datasets wandb math-verify "$work"/gptqmodel-7.3.6-py3-none-any.whl
python3 - "$work/closure.json" "$image" > "$work/missing.txt" <<'PY'
import json, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {norm(line.split("==")[0]) for line in open(sys.argv[2]) if "==" in line}
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    # maturin: a build tool GPTQModel lists among its requirements, not needed to run it (10 MB)
    if norm(meta["name"]) not in have | {"gptqmodel", "maturin"}:
        print(f"{meta['name']}=={meta['version']}")
PY
echo "the image lacks: $(tr '\n' ' ' < "$work/missing.txt")"
while read -r requirement; do
    # A wheel for Python 3.12 where the registry has one; else one built here from the source, which
    # must come out pure Python (py3-none-any) to install there.
    if ! pip download -q --no-deps "${target[@]}" -d "$out" "$requirement" 2>/dev/null; then
        pip wheel -q --no-deps --no-build-isolation "$requirement" -w "$work/built"
        built=$(ls "$work"/built/*.whl)
        case "$built" in
            *-py3-none-any.whl|*-py2.py3-none-any.whl) mv "$built" "$out"/ ;;
            *)  # a C extension with no wheel for 3.12 (PyPcre): its source, which device_setup.sh builds there
                rm "$built"; mkdir -p "$out/src"
                pip download -q --no-deps -d "$out/src" "$requirement" ;;
        esac
    fi
done < "$work/missing.txt"
cp "$work"/gptqmodel-7.3.6-py3-none-any.whl "$out"/
# GemLite 0.6.0: the library baseline benchmarks/decode_step.py times beside the fused kernel (benchmark only,
# not a runtime dependency). Pure Python; what it imports (torch, triton, numpy) is in the image.
pip wheel -q --no-deps gemlite==0.6.0 -w "$out"
du -sh "$out"
ls "$out"
