#!/usr/bin/env bash
# The README's main job on the embedded default: build tiny local models, score the bundled
# sample with them (phase one), and show what was written. No model hub, no GPU needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
. scripts/env.sh
export TOKENIZERS_PARALLELISM=false

echo "== building tiny weak models (outputs/embedded/models)"
python -m wspo.embedded.models outputs/embedded/models
echo "== phase one: wspo-precompute configs/precompute_tiny.yaml"
wspo-precompute configs/precompute_tiny.yaml "$@"
echo "== wspo-shards verify / info / head"
wspo-shards verify outputs/embedded/shards
wspo-shards info outputs/embedded/shards
wspo-shards head outputs/embedded/shards -n 1 --tokens 16
