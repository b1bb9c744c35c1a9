"""DPO against TRL's DPOTrainer, each path in its own process, back to back: prints JSON.

    python benchmarks/vs_trl.py --quick                     # 26M model, 32 pairs, 4 steps, 1 thread
    python benchmarks/vs_trl.py                             # 26M model, the 400 bundled pairs, 8 steps
    python benchmarks/vs_trl.py --preset quick              # hidden 512, Qwen2's real 152k vocabulary
    python benchmarks/vs_trl.py --preset qwen2-0.5b --device cuda --threads 0

Paths (same model, rows, chat template, batch, optimizer, steps, seed):

    trl_ref_in_memory   trl.DPOTrainer with the reference model in memory
    trl_precompute      trl.DPOTrainer(precompute_ref_log_probs=True): its construction tokenizes
                        and scores chosen and rejected under the reference (TRL's reference pass)
    wspo_precompute     wspo-precompute --slots chosen,rejected --ref_model MODEL (phase one,
                        default settings), run in-process through wspo.precompute.pipeline.run
    wspo_train          wspo-train --loss dpo from those shards (logp_ref read, no reference model)

How the batches are made the same: both read the rows in dataset order (wspo-train
--train_sampling_strategy sequential, eval_fraction 0; TRL's sampler replaced by a
SequentialSampler), and the chat template renders an assistant turn as `content<|im_end|>` with
nothing after it, so TRL's completion ids (prompt+completion minus prompt) equal the toolkit's
response ids (content + end-of-turn token); the benchmark checks that the token ids of every
trained pair are equal, and the per-step losses then agree to 1e-4 (asserted, float32). AdamW
(`--optim`, default adamw_torch_fused: transformers' default from torch 2.8, so what users of both
get; adamw_torch is the for-each kernel, whose temporaries raise the optimizer's peak), constant
learning rate, no warm-up, beta 0.1, sigmoid loss, max_grad_norm 1 in all;
gradient checkpointing the same in all (`--gradient_checkpointing`, default true: TRL's DPOConfig
default, which recomputes each layer's activations in the backward pass instead of keeping them).

Reported: seconds of each path (after imports; model loading included), seconds per step
(median of the steps after the first), peak RSS (VmHWM) and RSS when training begins (imports,
model, data and the trainer in place; TRL's precompute pass included), the peak RSS of each phase
and of each training step (sampled every 10 ms; memory that grows with steps shows there), what
the largest sample was made of (phase, step, heap and file-backed MiB: where to look when one
path holds more), and the issue's ratios:
precompute / TRL's reference pass (goal <= 0.8), step / TRL's step (<= 1), one full run (phase
one + training) / TRL's precompute variant (<= 1), three runs reusing one shard set (phase one
once + three trainings, the training measured once) / three TRL runs (<= 0.7), peak RSS (<= 0.8).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads  # noqa: E402  (benchmarks/, on sys.path from here on)
from limits import proc_status, proc_statuses  # noqa: E402

LOSS_TOLERANCE = 1e-4
# ChatML whose assistant turn ends at its end-of-turn token (no newline after it), so TRL's
# completion ids and the toolkit's response ids are the same tokens.
TEMPLATE = ("{% for message in messages %}{% if not loop.first %}{{ '\n' }}{% endif %}"
            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '\n<|im_start|>assistant\n' }}{% endif %}")


class PhasePeaks:
    """Peak RSS per phase of the run, sampled every 10 ms by a thread: `setup` (loading, the
    reference pass, trainer construction), `forward_backward` (step begin to the optimizer) and
    `optimizer` (the optimizer's step to the step's end); per training step (its begin to the
    next one's, the last to the end of the run); and what the largest sample was made of. Says
    where each path's peak comes from, and whether memory grows with steps."""

    def __init__(self):
        import threading

        self.phase, self.step, self.peaks, self.step_peaks, self.at_peak = "setup", 0, {}, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.01):
            phase, step = self.phase, self.step  # read once: the main thread moves them
            status = proc_statuses("VmRSS", "RssAnon", "RssFile")
            rss = status["VmRSS"]
            if rss > self.at_peak.get("rss_mib", 0) * 2**20:  # what the largest sample was made of
                self.at_peak = {"phase": phase, "step": step, "rss_mib": round(rss / 2**20, 1),
                                "anon_mib": round(status["RssAnon"] / 2**20, 1),
                                "file_mib": round(status["RssFile"] / 2**20, 1)}
            self.peaks[phase] = max(self.peaks.get(phase, 0), rss)
            if step:  # per training step: memory that grows with steps shows here
                self.step_peaks[step] = max(self.step_peaks.get(step, 0), rss)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {k: round(v / 2**20, 1) for k, v in self.peaks.items()}


def trl_rows(rows_path: str, n: int):
    from datasets import Dataset

    rows = [json.loads(line) for line in Path(rows_path).read_text().splitlines()[:n]]
    return Dataset.from_list([{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]}
                              for r in rows])


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"]) if spec["threads"] else None
    from transformers import TrainerCallback

    device, path = spec["device"], spec["path"]
    record: dict = {"losses": [], "step_seconds": [], "ids": []}

    now = workloads.clock(device)

    peaks = PhasePeaks()

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record["rss_bytes_at_train_begin"] = proc_status("VmRSS")

        def on_step_begin(self, args, state, control, **kwargs):
            peaks.phase, peaks.step = "forward_backward", state.global_step + 1
            record["begin"] = now()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            peaks.phase = "optimizer"

        def on_step_end(self, args, state, control, **kwargs):
            record["step_seconds"].append(now() - record["begin"])
            peaks.phase = "between_steps"

    common = dict(per_device_train_batch_size=spec["batch"], learning_rate=1e-5, lr_scheduler_type="constant",
                  max_steps=spec["steps"], logging_steps=spec["steps"], save_strategy="no", report_to="none",
                  dataloader_pin_memory=False, disable_tqdm=True, seed=0, use_cpu=device == "cpu",
                  optim=spec["optim"], max_grad_norm=1.0, warmup_steps=0, weight_decay=0.0,
                  gradient_checkpointing=spec["gradient_checkpointing"])
    start = time.perf_counter()
    result = {"path": path}
    if path.startswith("trl"):
        import trl
        from torch.utils.data import SequentialSampler
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        class Trainer(DPOTrainer):
            def _get_train_sampler(self, *args, **kwargs):
                return SequentialSampler(self.train_dataset)  # dataset order, as wspo-train's sequential

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                if model.training:
                    record["losses"].append(float((out[0] if return_outputs else out).detach()))
                    ids, mask = inputs["input_ids"], inputs["completion_mask"].bool()
                    record["ids"] += [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]  # chosen..., rejected...
                return out

            def save_model(self, *args, **kwargs):
                pass

        dtype = getattr(torch, spec["dtype"])
        tokenizer = AutoTokenizer.from_pretrained(spec["model"])
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).to(device)
        ref = None if path == "trl_precompute" else AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).to(device)
        config = DPOConfig(output_dir=spec["output_dir"], beta=0.1, loss_type=["sigmoid"], max_length=spec["max_length"],
                           precompute_ref_log_probs=path == "trl_precompute", bf16=spec["dtype"] == "bfloat16", **common)
        built = time.perf_counter()
        trainer = Trainer(model=model, ref_model=ref, args=config, train_dataset=trl_rows(spec["rows"], spec["pairs"]),
                          processing_class=tokenizer, callbacks=[StepTimer()])
        result["construction_seconds"] = time.perf_counter() - built
        trainer.train()
        result["trl_version"] = trl.__version__
    elif path == "wspo_precompute":
        from wspo.precompute import pipeline
        from wspo.precompute.config import PrecomputeArguments

        args = PrecomputeArguments(output_dir=spec["shards"], dataset=spec["rows"], slots="chosen,rejected",
                                   ref_model=spec["model"], max_length=spec["max_length"],
                                   max_prompt_length=spec["max_length"] // 2, max_samples=spec["pairs"],
                                   dtype=spec["dtype"])
        manifest = pipeline.run(args)
        result["rows_written"] = manifest["counts"]["rows_written"]
    else:  # wspo_train
        import pyarrow.parquet as pq
        from transformers import TrainingArguments

        import wspo.train.pipeline as pipeline
        from wspo.args import parse_config
        from wspo.train.config import WSPOArguments
        from wspo.train.trainer import WSPOTrainer

        class Recording(WSPOTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                if model.training:
                    record["losses"].append(float((out[0] if return_outputs else out).detach()))
                return out

            def save_model(self, output_dir=None, _internal_call=False):
                if output_dir:
                    Path(output_dir).mkdir(parents=True, exist_ok=True)

        keys = dict(common, model_name_or_path=spec["model"], shards=spec["shards"], loss="dpo", beta=0.1,
                    max_length=spec["max_length"], eval_fraction=0.0, train_sampling_strategy="sequential",
                    output_dir=spec["output_dir"], model_dtype=spec["dtype"], bf16=spec["dtype"] == "bfloat16")
        argv = [a for k, v in keys.items() for a in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]
        args, training_args = parse_config([WSPOArguments, TrainingArguments], argv)
        pipeline.WSPOTrainer = Recording
        pipeline.run(args, training_args, callbacks=[StepTimer()])
        # The token ids the steps trained on, in dataset order (sequential; chosen then rejected per pair).
        table = pq.read_table(sorted(Path(spec["shards"]).glob("**/part-*.parquet"))[0], columns=["slot", "token_ids"])
        slots, ids = table["slot"].to_pylist(), table["token_ids"].to_pylist()
        chosen = [t for s, t in zip(slots, ids) if s == "chosen"]
        rejected = [t for s, t in zip(slots, ids) if s == "rejected"]
        for k in range(0, spec["batch"] * spec["steps"], spec["batch"]):
            record["ids"] += chosen[k:k + spec["batch"]] + rejected[k:k + spec["batch"]]
    result.update(seconds=time.perf_counter() - start, peak_rss_bytes=proc_status("VmHWM"),
                  peak_rss_mib_by_phase=peaks.stop(), rss_at_largest_sample=peaks.at_peak,
                  peak_rss_mib_by_step=[round(peaks.step_peaks[k] / 2**20, 1) for k in sorted(peaks.step_peaks)], **record)
    print(workloads.RESULT_PREFIX + json.dumps(result))


def run_child(spec: dict) -> dict:
    env = {"CUDA_VISIBLE_DEVICES": ""} if spec["device"] == "cpu" else None
    return workloads.run_child(__file__, spec, f"path {spec['path']}", env)


def build(root: Path, preset: str, dtype: str) -> Path:
    """The strong model with the template above: the embedded 2,048-token tokenizer for the
    2,048-row presets (qwen2-26m, tiny-2k), Qwen2's real one otherwise."""
    from limits import PRESETS
    from workloads import qwen2_tokenizer, save_models

    small_vocab = PRESETS[preset]["vocab_size"] == 2048
    if small_vocab:
        from transformers import AutoTokenizer

        from wspo.embedded.models import build_weak_pair

        tokenizer = AutoTokenizer.from_pretrained(build_weak_pair(root / "tiny")["tokenizer"])
    else:
        tokenizer = qwen2_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return save_models(root, preset, ["model"], tokenizer, dtype=dtype)["model"]


def main() -> None:
    parser = workloads.benchmark_parser(__doc__, "32 pairs, 4 steps", threads=1,
                                        threads_help="torch threads of every path (0: torch's default)")
    parser.add_argument("--preset", default="qwen2-26m")
    parser.add_argument("--pairs", type=int, default=400, help="pairs of the bundled sample TRL's reference pass and phase one score")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--optim", default="adamw_torch_fused", choices=["adamw_torch_fused", "adamw_torch"])
    parser.add_argument("--gradient_checkpointing", default="true", choices=["true", "false"],
                        help="in every training path (default true: TRL's DPOConfig default)")
    args = parser.parse_args()
    if workloads.ran_as_child(args, child):
        return
    if args.quick:
        args.pairs, args.steps = 32, 4
    if args.batch * args.steps > args.pairs:
        raise SystemExit(f"--batch {args.batch} x --steps {args.steps} needs at least that many --pairs (got {args.pairs})")

    from limits import machine
    from wspo.embedded.sample import SAMPLE_DIR

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        model = build(tmp, args.preset, args.dtype)
        base = {"model": str(model), "rows": str(SAMPLE_DIR / "train_prefs.jsonl"), "pairs": args.pairs,
                "batch": args.batch, "steps": args.steps, "max_length": args.max_length, "dtype": args.dtype,
                "device": args.device, "threads": args.threads, "shards": str(tmp / "shards"),
                "gradient_checkpointing": args.gradient_checkpointing == "true", "optim": args.optim}
        results = {}
        for path in ("trl_ref_in_memory", "trl_precompute", "wspo_precompute", "wspo_train"):
            results[path] = run_child(dict(base, path=path, output_dir=str(tmp / f"out-{path}")))

    trl_in_memory, trl_pre, pre, train = (results[k] for k in ("trl_ref_in_memory", "trl_precompute", "wspo_precompute",
                                                               "wspo_train"))
    same_ids = [a == b for a, b in zip(trl_pre["ids"], train["ids"])]
    loss_diff = {k: max(abs(a - b) for a, b in zip(results[k]["losses"], train["losses"]))
                 for k in ("trl_ref_in_memory", "trl_precompute")}
    if args.dtype == "float32" and all(same_ids) and loss_diff["trl_ref_in_memory"] >= LOSS_TOLERANCE:
        raise SystemExit(f"per-step losses differ from TRL's (reference in memory) by {loss_diff['trl_ref_in_memory']:.2e}")

    def step(result):
        timed = result["step_seconds"][1:] or result["step_seconds"]
        return statistics.median(timed)

    trl_three = 3 * trl_pre["seconds"]
    ours_three = pre["seconds"] + 3 * train["seconds"]
    report = {
        "benchmark": "vs_trl", "trl_version": trl_pre["trl_version"], "preset": args.preset, "dtype": args.dtype,
        "device": args.device, "threads": args.threads or "default", "pairs_scored": args.pairs,
        "batch_pairs": args.batch, "steps": args.steps, "max_length": args.max_length,
        "gradient_checkpointing": args.gradient_checkpointing == "true", "optim": args.optim, "machine": machine(),
        "seconds": {"trl_ref_in_memory_total": round(trl_in_memory["seconds"], 2),
                    "trl_precompute_total": round(trl_pre["seconds"], 2),
                    "trl_reference_pass": round(trl_pre["construction_seconds"], 2),
                    "wspo_precompute": round(pre["seconds"], 2), "wspo_train_total": round(train["seconds"], 2)},
        "step_seconds_median": {"trl_ref_in_memory": round(step(trl_in_memory), 3), "trl_precompute": round(step(trl_pre), 3),
                                "wspo_train": round(step(train), 3)},
        "peak_rss_mib": {k: round(r["peak_rss_bytes"] / 2**20, 1) for k, r in results.items()},
        "rss_mib_at_train_begin": {k: round(r["rss_bytes_at_train_begin"] / 2**20, 1) for k, r in results.items()
                                   if "rss_bytes_at_train_begin" in r},
        "peak_rss_mib_by_phase": {k: r["peak_rss_mib_by_phase"] for k, r in results.items()},
        "rss_at_largest_sample": {k: r["rss_at_largest_sample"] for k, r in results.items()},  # phase, step, heap / files
        "peak_rss_mib_by_step": {k: r["peak_rss_mib_by_step"] for k, r in results.items() if r["peak_rss_mib_by_step"]},
        "ratios": {
            "wspo_precompute_over_trl_reference_pass": round(pre["seconds"] / trl_pre["construction_seconds"], 3),
            "wspo_step_over_trl_ref_in_memory_step": round(step(train) / step(trl_in_memory), 3),
            "wspo_step_over_trl_precompute_step": round(step(train) / step(trl_pre), 3),
            "one_run_wspo_over_trl_precompute": round((pre["seconds"] + train["seconds"]) / trl_pre["seconds"], 3),
            "three_runs_wspo_over_trl_precompute": round(ours_three / trl_three, 3),
            "peak_rss_wspo_train_over_trl_precompute": round(train["peak_rss_bytes"] / trl_pre["peak_rss_bytes"], 3),
            "peak_rss_wspo_train_over_trl_ref_in_memory": round(train["peak_rss_bytes"] / trl_in_memory["peak_rss_bytes"], 3),
        },
        "losses": {k: [round(x, 7) for x in results[k]["losses"]] for k in ("trl_ref_in_memory", "trl_precompute", "wspo_train")},
        "exactness": {"trained_sequences_with_equal_token_ids": f"{sum(same_ids)}/{len(same_ids)}",
                      "max_loss_diff_vs_trl_ref_in_memory": loss_diff["trl_ref_in_memory"],
                      "max_loss_diff_vs_trl_precompute": loss_diff["trl_precompute"],
                      "asserted": f"< {LOSS_TOLERANCE} vs trl_ref_in_memory when every trained sequence's ids are equal (float32)"},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
