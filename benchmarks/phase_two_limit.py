"""Phase two against its limit: `wspo-train` steps as a fraction of the matmul ceiling, one run.

    python benchmarks/phase_two_limit.py --quick          # quick shape, 2 timed steps, every variant
    python benchmarks/phase_two_limit.py --preset quick --steps 4 --batch_pairs 2
    python benchmarks/phase_two_limit.py --preset qwen2-0.5b --device cuda --dtype bfloat16
    python benchmarks/phase_two_limit.py --packing true --packing_row_length 0 1024   # row lengths compared
    python benchmarks/phase_two_limit.py --packing true --attn_implementation auto sdpa  # one row vs block mask

The strong model (policy) is a random-weight Qwen2 of a preset shape (benchmarks/limits.py) with
Qwen2's real vocabulary and tokenizer; the rows are UltraFeedback-like (benchmarks/workloads.py).
Phase one (not timed) scores chosen and rejected responses with two tiny real-vocabulary weak
models (and one of them as DPO's `ref_model`; the DPO runs pass --allow_reference_mismatch,
since the point is the step's cost, not its meaning). Then each variant of

    loss {wspo, dpo} x fine-tuning {full, lora (r 8, all linear layers)} x packing {false, true}

runs `wspo.train.pipeline.run` (the command's own code) in a process of its own, timing every
optimizer step and recording the sequences each step forwarded. The useful FLOPs of a step
(limits.phase_two_flops: the policy's forward and backward over the step's sequences, chosen only
for WSPO, chosen and rejected for DPO; plus the strong reference's forward for WSPO, whose
reference log-probs come from the model by default) over the ceiling measured in the same
process (before and after the steps, the faster of the two) give

    fraction_of_limit = limit seconds of the timed steps / their measured seconds

Goals (issue 18): full fine-tuning >= 0.6, LoRA >= 0.5. The optimizer step and every elementwise
op count as time without FLOPs (limits.py conventions), so they lower the fraction. Exactness:
the packed and padded variants of each (loss, fine-tuning) see the same batches, so their
first-step losses must agree (to 1e-4 in float32); the report carries the largest difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads  # noqa: E402  (benchmarks/, on sys.path from here on)

LOSS_TOLERANCE = 1e-4


def child(spec: dict) -> None:
    import torch
    from transformers import AutoConfig, TrainerCallback, TrainingArguments

    import wspo.train.pipeline as pipeline
    from limits import Ceiling, add_work, machine, phase_two_flops
    from limits import proc_status
    from wspo.args import parse_config
    from wspo.train.config import WSPOArguments
    from wspo.train.trainer import WSPOTrainer

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    args, training_args = parse_config([WSPOArguments, TrainingArguments], spec["argv"])
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    record = {"losses": [], "steps": [], "micro": []}

    def sequence_lengths(inputs) -> list[tuple[int, int]]:
        """(tokens, response tokens) of each sequence the micro-batch forwarded."""
        targets = inputs["target_mask"].tolist()
        if inputs.get("attention_mask") is not None:
            return list(zip(inputs["attention_mask"].sum(1).tolist(), inputs["target_mask"].sum(1).tolist()))
        lengths = []  # packed: position ids restart at 0 at every sequence; the pads' segment has no target
        for row, target in zip(inputs["position_ids"].tolist(), targets):
            starts = [i for i, p in enumerate(row) if p == 0] + [len(row)]
            lengths += [(b - a, sum(target[a:b])) for a, b in zip(starts, starts[1:]) if any(target[a:b])]
        return lengths

    class Recording(WSPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                record["losses"].append(workloads.training_loss(out, return_outputs))
                record["micro"].append({"sequences": sequence_lengths(inputs),
                                        "responses": int(inputs["target_mask"].sum()),
                                        "positions": int(inputs["input_ids"].numel())})
            return out

        def save_model(self, output_dir=None, _internal_call=False):
            if output_dir:
                Path(output_dir).mkdir(parents=True, exist_ok=True)

    now = workloads.clock(device)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            record["micro_at_begin"] = len(record["micro"])
            record["begin"] = now()

        def on_step_end(self, args, state, control, **kwargs):
            record["steps"].append({"seconds": now() - record["begin"],
                                    "micro": record["micro"][record["micro_at_begin"]:]})

    lora_rank = args.lora_r if args.use_lora else 0
    reference_forward = args.loss == "wspo" and args.reference_logps == "model"
    probe = phase_two_flops(config, [2], [1], lora_rank=lora_rank, reference_forward=reference_forward)
    measure = dict(kinds=probe, tokens=spec["ceiling_tokens"], attention_length=spec["attention_length"],
                   min_seconds=spec["ceiling_seconds"])
    dtype = getattr(torch, spec["dtype"])
    before = Ceiling.measure(config, dtype, device, **measure)
    pipeline.WSPOTrainer = Recording  # the toolkit's own pipeline, recorded
    run_record = pipeline.run(args, training_args, callbacks=[StepTimer()])
    after = Ceiling.measure(config, dtype, device, **measure)
    ceiling = Ceiling.best_of(before, after)

    timed = record["steps"][spec["warmup_steps"]:]
    work, seconds, positions = {}, 0.0, 0
    for step in timed:
        pairs = [pair for micro in step["micro"] for pair in micro["sequences"]]
        work = add_work(work, phase_two_flops(config, [n for n, _ in pairs], [r for _, r in pairs], lora_rank=lora_rank,
                                              reference_forward=reference_forward))
        seconds += step["seconds"]
        positions += sum(micro["positions"] for micro in step["micro"])
    tokens = sum(n for step in timed for micro in step["micro"] for n, _ in micro["sequences"])
    limit = ceiling.seconds(work)
    print(workloads.RESULT_PREFIX + json.dumps({
        "loss": args.loss, "fine_tuning": "lora" if args.use_lora else "full",
        "packing": run_record["data"]["batches"] == "packed", "packing_row_length": args.packing_row_length,
        "attention": run_record["data"]["attention"], "packed_rows": run_record["data"]["packed_rows"],
        "torch_compile": training_args.torch_compile,
        "reference": "model forward" if reference_forward else "shards", "dtype": spec["dtype"],
        "timed_steps": len(timed), "seconds_per_step": round(seconds / max(1, len(timed)), 3),
        "seconds_per_example": round(seconds / max(1, len(timed) * spec["batch_pairs"]), 3),
        "useful_gflop_per_step": round(sum(work.values()) / 1e9 / max(1, len(timed)), 1),
        "limit_seconds": round(limit, 3), "measured_seconds": round(seconds, 3),
        "fraction_of_limit": round(limit / seconds, 3) if seconds else None,
        "fraction_of_median_ceiling": round(ceiling.seconds(work, best=False) / seconds, 3) if seconds else None,
        "padding_share": round(1 - tokens / positions, 3) if positions else None,
        "ceiling_gflops_per_s": round(ceiling.rate(work) / 1e9, 1) if work else None,
        "ceiling_drift_after_vs_before": round(after.rate(probe) / before.rate(probe), 3),
        "losses": record["losses"], "peak_rss_mib": round(proc_status("VmHWM") / 2**20, 1),
        "ceiling": ceiling.as_dict(), "machine": machine(),
    }))


def main() -> None:
    parser = workloads.benchmark_parser(__doc__, "preset quick, 1 warm-up + 2 timed steps of 2 pairs")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch_pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup_steps", type=int, default=1)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--losses", nargs="+", default=["wspo", "dpo"])
    parser.add_argument("--fine_tuning", nargs="+", default=["full", "lora"])
    parser.add_argument("--packing", nargs="+", default=["false", "true"])
    parser.add_argument("--packing_row_length", nargs="+", type=int, default=[0],
                        help="wspo-train's packing_row_length for the packed runs, one run each (0: its default, "
                             "the micro-batch's longest sequence)")
    parser.add_argument("--attn_implementation", nargs="+", default=["auto"],
                        help="wspo-train's attn_implementation for the packed runs, one run each (auto: attention per "
                             "sequence, one row per micro-batch; sdpa: rows of the longest sequence, block mask)")
    parser.add_argument("--torch_compile", nargs="+", default=["false"], choices=["false", "true"],
                        help="TrainingArguments.torch_compile, one run each")
    parser.add_argument("--ceiling_seconds", type=float, default=0.3, help="least seconds of repeats per GEMM kind")
    args = parser.parse_args()
    if workloads.ran_as_child(args, child):
        return
    if args.quick:
        args.preset, args.steps, args.batch_pairs = "quick", 2, 2

    from limits import machine
    from workloads import qwen2_tokenizer, save_models, write_rows

    steps = args.warmup_steps + args.steps
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        tokenizer = qwen2_tokenizer()
        rows = args.batch_pairs * steps + 4
        lengths = write_rows(tmp / "rows.jsonl", tokenizer, rows)
        strong = save_models(tmp, args.preset, ["strong_ref"], tokenizer, dtype=args.dtype)["strong_ref"]
        weak = save_models(tmp, "quick", ["weak_ref", "weak_aligned"], tokenizer, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1)
        shards = tmp / "shards"
        subprocess.run([sys.executable, "-m", "wspo.precompute.cli", "--output_dir", str(shards), "--dataset",
                        str(tmp / "rows.jsonl"), "--slots", "chosen,rejected", "--weak_ref", str(weak["weak_ref"]),
                        "--weak_aligned", str(weak["weak_aligned"]), "--ref_model", str(weak["weak_ref"]),
                        "--max_length", str(args.max_length), "--max_prompt_length", str(args.max_length // 2)],
                       check=True, capture_output=True, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
        train = {"model_name_or_path": strong, "shards": shards, "max_length": args.max_length, "eval_fraction": 0.0,
                 "per_device_train_batch_size": args.batch_pairs, "learning_rate": 1e-5, "lr_scheduler_type": "constant",
                 "max_steps": steps, "logging_steps": steps, "save_strategy": "no", "report_to": "none",
                 "dataloader_pin_memory": "false", "disable_tqdm": "true", "seed": 0,
                 "train_sampling_strategy": "sequential", "use_cpu": str(args.device == "cpu").lower(),
                 "bf16": str(args.dtype == "bfloat16").lower(), "model_dtype": args.dtype}
        results = []
        for loss in args.losses:
            for tuning in args.fine_tuning:
                variants = [(p, c, r, a) for p in args.packing for c in args.torch_compile
                            for r in (args.packing_row_length if p == "true" else [0])
                            for a in (args.attn_implementation if p == "true" else ["auto"])]
                for packing, compiled, row_length, attention in variants:
                    name = (f"{loss}-{tuning}-packing_{packing}" + (f"-row_{row_length}" if row_length else "")
                            + (f"-{attention}" if attention != "auto" else "") + ("-compiled" if compiled == "true" else ""))
                    keys = dict(train, output_dir=tmp / f"out-{name}", loss=loss, use_lora=str(tuning == "lora").lower(),
                                packing=packing, torch_compile=compiled, attn_implementation=attention)
                    if row_length:
                        keys["packing_row_length"] = row_length
                    if loss == "dpo":
                        keys["allow_reference_mismatch"] = "true"
                    spec = {"name": name, "argv": [a for k, v in keys.items() for a in (f"--{k}", str(v))],
                            "device": args.device, "dtype": args.dtype, "threads": args.threads,
                            "warmup_steps": args.warmup_steps, "batch_pairs": args.batch_pairs,
                            "ceiling_tokens": min(4096, args.batch_pairs * 2 * 400), "attention_length": 400,
                            "ceiling_seconds": args.ceiling_seconds}
                    results.append(workloads.run_child(__file__, spec, f"child {spec['name']}"))
    checks = {}
    for loss in args.losses:
        for tuning in args.fine_tuning:
            pair = [r for r in results if r["loss"] == loss and r["fine_tuning"] == tuning and not r["torch_compile"]]
            if len(pair) >= 2:  # padded and packed (at each row length): the same batches, the same losses
                diff = max(abs(a - b) for other in pair[1:] for a, b in zip(pair[0]["losses"], other["losses"]))
                checks[f"{loss}-{tuning}_packed_vs_padded_max_loss_diff"] = diff
                if args.dtype == "float32" and diff >= LOSS_TOLERANCE:
                    raise SystemExit(f"{loss}/{tuning}: losses on the same batches (padded, packed at each row length and attention) "
                                     f"differ by {diff:.2e}")
    print(json.dumps({"benchmark": "phase_two_limit", "preset": args.preset, "dtype": args.dtype,
                      "batch_pairs": args.batch_pairs, "lengths": lengths, "machine": machine(), "checks": checks,
                      "runs": results}, indent=2))


if __name__ == "__main__":
    main()
