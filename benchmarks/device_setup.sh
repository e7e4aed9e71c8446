# Source on a GPU machine without network (Python 3.12, torch/transformers/lightning preinstalled):
# installs the carried wheels (.whl, see docs/reference.md "GPU runs") into /tmp/site and the project from the tree.
# .whl-tf (optional): a newer transformers than the image's, the one this machine's CI runs (carry it for benchmarks/decode.py).
# .whl/ is built by benchmarks/build_wheels.sh; its src/ holds what has no wheel for this Python (PyPcre), built here.
mkdir -p /tmp/built
for source in .whl/src/*.tar.gz; do
  [ -e "$source" ] || continue
  python3 -m pip wheel -q --no-index --no-deps --no-build-isolation -w /tmp/built "$source" || { echo "could not build $source" >&2; return 1; }
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  $(ls /tmp/built/*.whl .whl-tf/*.whl 2>/dev/null) || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export GPTQMODEL_CPU_WORKERS=8 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, lightning, datasets, gptqmodel, math_verify; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__, 'gptqmodel', gptqmodel.__version__, torch.cuda.get_device_name())" 2>&1 | grep -E "^torch|Error|error" 
rescue() { python3 -m rescue.cli "$@"; }
