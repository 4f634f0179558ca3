#!/usr/bin/env bash
# Set gesso up on a lent GPU machine, where nothing can be downloaded, then run one command there:
#
#     benchmarks/on_device.sh python3 benchmarks/run.py --families sd15 sdxl --out "$OUT/results"
#
# The machine's image has torch, transformers, huggingface_hub, safetensors, pluggy and pillow. The
# other wheels travel in .whl/ (git-ignored; carry it with the command), fetched beforehand on a
# machine with network access:
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 -d .whl omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 \
#         diffusers==0.42.1 importlib_metadata
#
# (diffusers, the reference, only for same-run comparisons.) The wheels go to a folder of their own
# on PYTHONPATH; gesso and its plugins are installed editable without touching their dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
site="${TMPDIR:-/tmp}/gesso-site"
python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pip install --quiet --no-deps --no-build-isolation \
    -e core -e plugins/sd15 -e plugins/sdxl -e plugins/kandinsky -e plugins/controlnet >/dev/null
python3 -c "import gesso, omegaconf" # fail here, not halfway through a benchmark
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "$@"
