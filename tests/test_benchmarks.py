"""The benchmarks' yardstick (benchmarks/limits.py) against torch's own FLOP counter, and each
benchmark in quick mode (slow): it runs and its exactness checks hold. Never a timing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import limits  # noqa: E402


def tiny_qwen2(**overrides):
    from transformers import Qwen2ForCausalLM

    config = limits.config_for("qwen2-26m", vocab_size=300, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **overrides)
    config._attn_implementation = "eager"  # matmuls torch.utils.flop_counter sees (its CPU sdpa is uncounted)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval(), config


def counted(fn) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op): float(n) for op, n in counter.get_flop_counts()["Global"].items()}


def attention_full_vs_causal(config, length: int) -> float:
    """torch counts sdpa over every (query, key) pair; the yardstick counts the causal half."""
    shape = limits.Shape.of(config)
    return shape.layers * 4 * shape.heads * shape.head_dim * (length * length - length * (length + 1) // 2)


def test_phase_one_flops_equal_torch_flop_counter():
    model, config = tiny_qwen2()
    length = 37
    ids = torch.randint(0, 300, (1, length))
    with torch.no_grad():
        counts = counted(lambda: model(input_ids=ids))  # the head over every position
    measured = sum(counts.values())
    # A plain forward applies the head at all `length` positions; the yardstick, at response ones.
    work = limits.phase_one_flops(config, [length], [length - 1])
    head = 2 * config.hidden_size * config.vocab_size
    expected = limits.total_flops(work) + head + attention_full_vs_causal(config, length)
    assert measured == pytest.approx(expected, rel=1e-9)
    assert work["attention"] > 0 and f"linear:{config.hidden_size}x{config.vocab_size}" in work


def test_phase_two_flops_equal_torch_flop_counter_full_and_lora():
    model, config = tiny_qwen2()
    length = 29
    ids = torch.randint(0, 300, (1, length))
    shape = limits.Shape.of(config)
    qkv = sum(2 * length * shape.linears()[n][0] * shape.linears()[n][1] for n in ("q_proj", "k_proj", "v_proj"))
    # Full fine-tuning: torch runs the first layer's q/k/v input gradient too (the norm's weight
    # trains); the yardstick leaves it out as useless work.
    counts = counted(lambda: model(input_ids=ids).logits.sum().backward())
    work = limits.phase_two_flops(config, [length], [length - 1])
    head_all_rows = 3 * 2 * config.hidden_size * config.vocab_size
    expected = limits.total_flops(work) + head_all_rows + 3 * attention_full_vs_causal(config, length) + qkv
    assert sum(counts.values()) == pytest.approx(expected, rel=1e-9)

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    counts = counted(lambda: lora(input_ids=ids).logits.sum().backward())
    work = limits.phase_two_flops(config, [length], [length - 1], lora_rank=4)
    # LoRA: nothing below the first layer trains, so torch skips its q/k/v input gradients too.
    head_all_rows = 2 * 2 * config.hidden_size * config.vocab_size
    expected = limits.total_flops(work) + head_all_rows + 3 * attention_full_vs_causal(config, length)
    assert sum(counts.values()) == pytest.approx(expected, rel=1e-9)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_proc_statuses_reads_one_instant_and_sees_the_heap_grow():
    before = limits.proc_statuses("VmRSS", "RssAnon", "RssFile", "NoSuchKey")
    assert before["NoSuchKey"] == 0 and before["VmRSS"] == pytest.approx(limits.proc_status("VmRSS"), abs=16 * 2**20)
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written: resident and anonymous
    after = limits.proc_statuses("VmRSS", "RssAnon")
    assert after["RssAnon"] - before["RssAnon"] >= 60 * 2**20 and after["VmRSS"] - before["VmRSS"] >= 60 * 2**20
    del block


def test_ceiling_rates_cover_the_work_and_give_a_fraction():
    config = limits.config_for("qwen2-26m", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    work = limits.phase_two_flops(config, [20, 30], [10, 5], lora_rank=2, reference_forward=True)
    ceiling = limits.Ceiling.measure(config, torch.float32, "cpu", kinds=work, tokens=32, min_seconds=0.0,
                                     min_repeats=1)
    assert set(ceiling.rates) == set(work) and all(rate > 0 for rate in ceiling.rates.values())
    limit = ceiling.seconds(work)
    assert ceiling.fraction(work, 2 * limit) == pytest.approx(0.5)
    assert ceiling.rate(work) == pytest.approx(limits.total_flops(work) / limit)
    with pytest.raises(KeyError, match="no rate measured"):
        ceiling.seconds({"wgrad:1x1": 1.0})


def run_benchmark(script: str, *argv: str) -> dict:
    import json
    import os
    import subprocess

    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *argv], capture_output=True, text=True,
                          env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


@pytest.mark.slow
def test_phase_one_limit_runs_and_matches_full_logits():
    report = run_benchmark("phase_one_limit.py", "--preset", "tiny", "--rows", "4", "--dtypes", "float32", "--parts", "2",
                           "--ceiling_seconds", "0.02")
    (run,) = report["runs"]
    assert run["rows"] == 4 and run["checked_rows"] == 2
    assert run["max_abs_diff_vs_naive"] < 1e-4  # the shards' log-probs = a full-logits log_softmax
    assert len(run["minor_faults_per_part"]) == 4  # 2 parts x 2 scorers
    assert run["useful_gflop"] > 0 and 0 < run["fraction_of_limit"] and run["limit_seconds"] < run["run_seconds"]
    assert run["peak_rss_of_run_only"] and run["rss_at_start_mib"] <= run["peak_rss_mib"]  # phase one's own peak


@pytest.mark.slow
def test_scorer_compile_runs_and_compiled_equals_eager():
    report = run_benchmark("scorer_compile.py", "--preset", "tiny", "--rows", "4", "--dtypes", "float32",
                           "--repeats", "1", "--max_length", "512")
    (run,) = report["runs"]
    assert run["compiled"] and run["compile_seconds"] > 0 and run["sequences"] == 4
    assert run["max_abs_diff"] < 1e-4  # the compiled decoder gives the eager log-probs
    assert run["eager_over_compiled"] > 0


@pytest.mark.slow
def test_phase_two_limit_runs_and_packed_equals_padded():
    report = run_benchmark("phase_two_limit.py", "--preset", "tiny", "--steps", "1", "--batch_pairs", "2",
                           "--max_length", "384", "--losses", "wspo", "--fine_tuning", "lora", "--ceiling_seconds", "0.02")
    assert [(r["packing"], r["timed_steps"]) for r in report["runs"]] == [(False, 1), (True, 1)]
    assert report["checks"]["wspo-lora_packed_vs_padded_max_loss_diff"] < 1e-4
    assert all(r["fraction_of_limit"] > 0 for r in report["runs"])


@pytest.mark.slow
def test_vs_trl_runs_with_the_same_batches_and_losses():
    report = run_benchmark("vs_trl.py", "--preset", "tiny-2k", "--pairs", "4", "--batch", "2", "--steps", "2",
                           "--max_length", "256")
    assert report["trl_version"] == "1.16.0"
    assert report["exactness"]["trained_sequences_with_equal_token_ids"] == "8/8"
    assert report["exactness"]["max_loss_diff_vs_trl_ref_in_memory"] < 1e-4
    assert len(report["losses"]["wspo_train"]) == len(report["losses"]["trl_precompute"]) == 2
    # The largest RSS sample of each training path: in a phase it reports, and its parts add up to it.
    for path in ("trl_ref_in_memory", "trl_precompute", "wspo_train"):
        largest = report["rss_at_largest_sample"][path]
        assert largest["phase"] in report["peak_rss_mib_by_phase"][path]
        assert largest["step"] == 0 if largest["phase"] == "setup" else largest["step"] in (1, 2)
        assert abs(largest["anon_mib"] + largest["file_mib"] - largest["rss_mib"]) < 64  # + shared memory (RssShmem)
        # VmHWM (the peak) follows VmRSS lazily, so a sample may pass it by a page or two of counters
        assert largest["rss_mib"] <= report["peak_rss_mib"][path] * 1.01 + 1
        by_step = report["peak_rss_mib_by_step"][path]  # one peak per training step
        assert len(by_step) == 2 and max(by_step) <= report["peak_rss_mib"][path] * 1.01 + 1


@pytest.mark.slow
def test_head_buffer_runs_and_its_paths_agree():
    train = run_benchmark("head_buffer.py", "--rows", "40", "--hidden", "32", "--vocab", "3000", "--repeats", "1", "--train")
    assert train["mode"] == "train" and train["max_abs_diff_logprobs"]["recompute_in_backward"] < 1e-5
    assert train["max_abs_diff_grad"]["states"] < 1e-5 and train["max_abs_diff_grad"]["weight"] < 1e-5
    kept = train["saved_for_backward_mib"]  # autograd keeps the 40 x 3000 float32 logits; the recompute does not
    assert kept["autograd_keeps_logits"] - kept["recompute_in_backward"] >= 40 * 3000 * 4 / 2**20 - 0.002
    no_grad = run_benchmark("head_buffer.py", "--rows", "40", "--hidden", "32", "--vocab", "3000", "--repeats", "1")
    assert no_grad["mode"] == "no_grad" and no_grad["max_abs_diff_logprobs"]["one_buffer"] == 0.0
    assert set(no_grad["over_matmul"]) == {"fresh_per_chunk", "one_buffer"}
