#!/usr/bin/env bash
# The test command of the README: create/reuse .venv, then run the whole suite (slow tests too).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
# Two pytest-xdist workers by default (WSPO_TEST_WORKERS; `-n 0` as an argument runs in one
# process): most slow tests spend their time starting child processes (importing torch and
# transformers: one core each), which a second worker overlaps (docs/testing.md). A file's tests
# stay on one worker (--dist loadfile), so a module's fixtures, such as the one vLLM engine of
# tests/test_scorer_parity.py, open once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
. scripts/env.sh
export TOKENIZERS_PARALLELISM=false
exec python -m pytest -q -ra -n "${WSPO_TEST_WORKERS:-2}" --dist loadfile "$@"
