"""Shared fixtures: tiny local models built once per test session (no model hub)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{'tokenizer', 'weak_ref', 'weak_aligned'} -> directories of tiny Qwen2 models (fp32)."""
    from wspo.embedded.models import build_weak_pair

    return build_weak_pair(tmp_path_factory.mktemp("tiny_models"))
