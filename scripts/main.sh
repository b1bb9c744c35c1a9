#!/usr/bin/env bash
# The README's main job on the embedded default: build tiny local models, score the bundled
# sample with the weak pair (phase one), train the strong model with WSPO from the shards alone
# (phase two), and say what happened. No model hub, no GPU needed.
# Extra arguments go to wspo-precompute (e.g. --backend vllm).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
. scripts/env.sh
export TOKENIZERS_PARALLELISM=false

echo "== building tiny models (outputs/embedded/models): weak_ref, weak_aligned, strong_sft"
python -m wspo.embedded.models outputs/embedded/models
echo "== phase one: wspo-precompute configs/precompute_tiny.yaml $*"
wspo-precompute configs/precompute_tiny.yaml "$@"
echo "== wspo-shards verify / info / head"
wspo-shards verify outputs/embedded/shards
wspo-shards info outputs/embedded/shards
wspo-shards head outputs/embedded/shards -n 1 --tokens 12
echo "== phase two: wspo-train configs/train_tiny.yaml (reads the shards and the strong model only)"
wspo-train configs/train_tiny.yaml
