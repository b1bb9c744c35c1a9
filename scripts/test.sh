#!/usr/bin/env bash
# The test command of the README: create/reuse .venv, then run the whole suite (slow tests too).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
. scripts/env.sh
export TOKENIZERS_PARALLELISM=false
exec python -m pytest -q -ra "$@"
