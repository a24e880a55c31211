#!/bin/sh
# What the GPU machine lacks, for load/gpu.py, split into parts the device tool can carry.
#
# The machine's image (KINDS.md: Python 3.12, torch, transformers, onnxruntime CPU-only, CUDA 13)
# has no CTranslate2, faster-whisper or gguf, and none of our models; it has no network, and
# one device call carries 64 MiB. This downloads the wheels for its Python 3.12 into
# .gpu/wheels (git-ignored), then `python -m load.gpu --pack .gpu` splits wheels, Whisper
# tiny.en, the SmolLM2 GGUF and the spoken question into .gpu/1, .gpu/2, ... (58 MiB each)
# and prints the device calls that gather them and run the measurement.
# Not carried: PyAV (faster-whisper gets a stand-in), onnxruntime-gpu and vLLM (hundreds of MiB).
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .gpu/wheels
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/wheels \
  ctranslate2==4.8.5 faster-whisper==1.2.1 gguf==0.19.0
exec "$PY" -m load.gpu --pack .gpu --wheels .gpu/wheels
