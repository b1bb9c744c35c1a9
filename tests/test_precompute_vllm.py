"""`wspo-precompute --backend vllm` end to end: the same shards as the hf backend, up to rounding."""

from __future__ import annotations

import numpy as np
import pytest

from wspo.precompute.cli import main as precompute_main
from wspo.shards.store import ShardSet, list_arrays


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_backend_writes_the_same_shards_as_hf(tiny_models, tmp_path):
    pytest.importorskip("vllm")
    common = ["--weak_ref", str(tiny_models["weak_ref"]), "--weak_aligned", str(tiny_models["weak_aligned"]),
              "--max_length", "512", "--max_prompt_length", "256", "--max_samples", "20", "--slots", "chosen,rejected"]
    assert precompute_main(common + ["--output_dir", str(tmp_path / "hf")]) == 0
    assert precompute_main(common + ["--output_dir", str(tmp_path / "vllm"), "--backend", "vllm",
                                     "--gpu_memory_utilization", "0.2", "--batch_tokens", "256"]) == 0
    hf, vl = ShardSet.open(tmp_path / "hf").check(), ShardSet.open(tmp_path / "vllm").check()
    assert [s["backend"] for s in vl.scorers] == ["vllm", "vllm"]
    assert [s["fingerprint"] for s in vl.scorers] == [s["fingerprint"] for s in hf.scorers]
    a, b = hf.read_table(), vl.read_table()
    assert a["id"].to_pylist() == b["id"].to_pylist() and a["token_ids"].to_pylist() == b["token_ids"].to_pylist()
    for column in ("logp_weak_ref", "logp_weak_aligned", "reward"):
        diff = np.abs(np.concatenate(list_arrays(a[column])) - np.concatenate(list_arrays(b[column])))
        assert diff.max() < 1e-4, column
