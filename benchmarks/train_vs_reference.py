"""Phase two against the reference approach: time per example and peak memory, one run.

    python benchmarks/train_vs_reference.py                       # CPU: ~26M strong, ~7M weak, fp32
    python benchmarks/train_vs_reference.py --device cuda --dtype bfloat16 \\
        --strong_config qwen2-7b --weak_config qwen2-1.5b --use_lora   # real shapes on a GPU

The reference implementation of WSPO holds four models in the training job (policy, strong
reference, weak reference, weak aligned) and forwards the chosen *and* the rejected responses of
every pair through all of them, although only the chosen responses enter the loss. The toolkit
scores the weak models once in phase one and trains from the shards. Paths, each in its own
subprocess (so peak memory is that path's alone), all with the same random-weight models, the
same pairs in the same order (`train_sampling_strategy sequential`), batch size (pairs), max_length,
optimizer (AdamW) and number of steps:

- wspo_shards: `wspo.train.pipeline.run`, i.e. `wspo-train --loss wspo` from shards: the chosen
  rows only; the strong reference is a frozen copy (or, with --use_lora, the policy with its
  adapters off);
- wspo_shards_ref_from_shards (full fine-tuning only): the same with `--reference_logps shards`
  (the strong reference's log-probs scored in phase one): the policy alone in the job;
- wspo_reference_approach: the benchmark-only mode in this file (`ReferenceApproachTrainer`, a
  WSPOTrainer subclass): the four models in the job; each step forwards chosen and rejected
  through all four (the weak ones and the reference under no_grad), computes the weak rewards on
  the fly from the weak log-probs, and applies `wspo.train.losses.wspo_loss` to the chosen
  tokens. Its token ids come from the same shard rows (`token_ids` only; no log-prob column is
  read), so both paths see identical sequences;
- dpo_shards: `wspo-train --loss dpo`: reference sums from the shards' `logp_ref` column;
- dpo_reference_in_memory: the same pairs and loss (`PreferenceMixin.preference_loss`) with a
  frozen reference model in the job (or LoRA adapters off) computing the reference log-probs.

Time per example = the median seconds per optimizer step (data loading included) / pairs per
step (one chosen response per pair), warm-up steps excluded; `tokens_per_step_per_model` is what
each model in the path forwards per step. Peak memory: VmHWM of the path's process on CPU (also
above its RSS after imports, which strips the fixed ~0.5 GB of Python, torch and transformers),
or `torch.cuda.max_memory_allocated` on GPU. The first optimizer step's loss of the two WSPO paths
(and of the two DPO paths) must agree, |diff| < 1e-4 in float32 (2% in bfloat16): the same
objective on the same batch. Shard building (models, `wspo-precompute`) is outside every timing.
With --dtype bfloat16 every model is loaded in bf16 (`--model_dtype bfloat16 --bf16 true`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from limits import PRESETS as QWEN2_SHAPES  # this script's folder is on sys.path when it runs
from limits import proc_status

# Model shapes. "cpu-*": Qwen2 architecture, 64-wide heads, the tiny tokenizer's 2048-token
# vocabulary; "qwen2-*": the public configs' shapes (Qwen/Qwen2-0.5B, -1.5B, -7B), for GPUs.
PRESETS = {
    "cpu-weak": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4,
                     num_key_value_heads=2, tie_word_embeddings=True),  # ~6.8M parameters
    "cpu-strong": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=2, tie_word_embeddings=False),  # ~26M parameters
    # Qwen2's real shapes, as benchmarks/limits.py (the FLOP yardstick) knows them.
    **{name: QWEN2_SHAPES[name] for name in ("qwen2-0.5b", "qwen2-1.5b", "qwen2-7b")},
}
LOSS_TOLERANCE = 1e-4  # float32
BF16_LOSS_TOLERANCE = 2e-2  # bfloat16, relative: rewards scored in another batch layout may round differently
RESULT_PREFIX = "BENCH_RESULT "


# -- building (a subprocess of its own) ---------------------------------------------------------


def build(spec: dict) -> None:
    """The tiny tokenizer, three random Qwen2 models (weak_aligned = weak_ref + seeded noise)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from wspo.embedded.models import build_weak_pair
    from wspo.models import resolve_dtype

    work = Path(spec["workdir"])
    tokenizer_dir = build_weak_pair(work / "tiny")["tokenizer"]
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    device = spec["device"]
    dtype = resolve_dtype(spec["dtype"], device)
    sizes = {}
    for name, preset, seed in (("weak_ref", spec["weak_config"], 0), ("strong_ref", spec["strong_config"], 0)):
        shape = dict(PRESETS[preset])
        shape.setdefault("vocab_size", len(tokenizer))
        config = Qwen2Config(head_dim=shape["hidden_size"] // shape["num_attention_heads"], rope_theta=10000.0,
                             max_position_embeddings=max(spec["max_length"], 2048), bos_token_id=None,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
        model.to(dtype)
        sizes[name] = {"preset": preset, "parameters": sum(p.numel() for p in model.parameters()), **shape}
        outputs = [(name, model)]
        if name == "weak_ref":  # the stand-in weak aligned model: the same weights plus seeded noise
            generator = torch.Generator(device=device).manual_seed(1)
            aligned = copy.deepcopy(model)
            with torch.no_grad():
                for param in aligned.parameters():
                    noise = torch.randn(param.shape, generator=generator, device=device) * spec["noise"]
                    param.copy_((param.float() + noise).to(dtype))
            outputs.append(("weak_aligned", aligned))
        for out_name, out_model in outputs:
            out = work / out_name
            out_model.save_pretrained(str(out))
            tokenizer.save_pretrained(str(out))
            AutoTokenizer.from_pretrained(str(out)).save_pretrained(str(out))  # as wspo.embedded.models does
        del model, outputs
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(RESULT_PREFIX + json.dumps(sizes))


# -- the benchmark-only trainers ----------------------------------------------------------------


def make_trainers():
    """The two in-memory trainers, defined here so the parent never imports torch."""
    import torch

    from wspo.logprobs import response_logprobs
    from wspo.train.losses import wspo_loss
    from wspo.train.trainer import WSPOTrainer

    class ReferenceApproachTrainer(WSPOTrainer):
        """WSPO as the reference implementation runs it: four models in the job.

        Batches are `PreferenceCollator` batches: sequences [chosen_0, rejected_0, chosen_1, ...].
        Every model forwards all of them (the reference implementation's concatenated forward);
        the weak rewards are computed here from the weak models' log-probs; only the chosen
        tokens enter `wspo_loss`.
        """

        def __init__(self, *args, weak_ref, weak_aligned, **kwargs):
            super().__init__(*args, loss="wspo", **kwargs)
            self.weak_models = [m.eval().requires_grad_(False).to(self.args.device) for m in (weak_ref, weak_aligned)]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, mask, target, seq_ids = inputs["input_ids"], inputs["attention_mask"], inputs["target_mask"], inputs["seq_ids"]
            policy_logps = response_logprobs(model, ids, mask, target)  # chosen and rejected, with gradient
            with torch.no_grad():
                with self._reference_context(model):
                    ref_logps = response_logprobs(self.ref_model if self.ref_model is not None else model, ids, mask, target)
                weak_ref_logps, weak_aligned_logps = (response_logprobs(m, ids, mask, target) for m in self.weak_models)
            chosen = seq_ids % 2 == 0  # example-major, slot order (chosen, rejected)
            rewards = (weak_aligned_logps - weak_ref_logps)[chosen]
            loss = wspo_loss(policy_logps[chosen], ref_logps[chosen], rewards, seq_ids[chosen] // 2, ids.shape[0] // 2,
                             self.gamma)
            return (loss, {}) if return_outputs else loss

    class DPOReferenceInMemoryTrainer(WSPOTrainer):
        """DPO with the reference model in the job: its log-probs replace the shards' `ref_logps`."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, loss="dpo", **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.no_grad(), self._reference_context(model):
                ref = response_logprobs(self.ref_model if self.ref_model is not None else model,
                                        inputs["input_ids"], inputs["attention_mask"], inputs["target_mask"])
            return super().compute_loss(model, dict(inputs, ref_logps=ref), return_outputs, num_items_in_batch)

    return ReferenceApproachTrainer, DPOReferenceInMemoryTrainer


def recording(trainer_class, record: dict):
    """A subclass recording each training step's loss and the chosen row ids of the first batch;
    saving the model is skipped (nothing of the benchmark needs it, and it is slow for big models)."""
    from workloads import training_loss  # benchmarks/ is on sys.path in the child

    class Recording(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                record["losses"].append(training_loss(out, return_outputs))

                def drawn():
                    return [self.train_dataset[i] for i in inputs["row_index"].tolist()]  # a list or a lazy dataset

                if "attention_mask" in inputs:
                    record["tokens"].append(int(inputs["attention_mask"].sum()))  # real tokens forwarded per model
                else:  # packed rows (--packing true) carry no mask: the drawn sequences' own lengths
                    record["tokens"].append(sum(len(e.input_ids) for e in drawn()))
                record["padded_tokens"].append(inputs["input_ids"].numel())
                if "first_batch" not in record:
                    record["first_batch"] = [getattr(e, "row_id", None) or e.responses[0].row_id for e in drawn()]
            return out

        def save_model(self, output_dir=None, _internal_call=False):
            if output_dir:  # an empty folder: the pipeline publishes whatever was saved
                Path(output_dir).mkdir(parents=True, exist_ok=True)

    return Recording


def step_timer(record: dict, device: str):
    import torch
    from transformers import TrainerCallback

    def now():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record["step_ends"] = [now()]

        def on_step_end(self, args, state, control, **kwargs):
            record["step_ends"].append(now())

    return StepTimer()


# -- one path (a subprocess of its own) ---------------------------------------------------------


def pairs_from_shards(shard_sets, rule, order: list[str] | None = None):
    """(chosen, rejected) examples from the shards' token ids only: the reference approach's
    batches. Dummy zeros stand in for the reference log-probs, which no in-memory path reads.
    `order`: chosen row ids giving the order (that of the `wspo_shards` path)."""
    import tempfile
    from collections import Counter

    import numpy as np

    from wspo.train.pairs import PAIR_COLUMNS, PREFERENCE_SLOTS, PreferenceRowsDataset, group_examples
    from wspo.train.rows import OpenRows

    class ZeroReference:  # stands in for logp_ref, which the in-memory paths never read
        def __init__(self, rows):
            self.n_tokens = rows.table["n_tokens"].to_numpy()

        def logps(self, position):
            return np.zeros(self.n_tokens[position], np.float32)

    with tempfile.TemporaryDirectory() as cache:
        rows = OpenRows(shard_sets, PAIR_COLUMNS, cache, PREFERENCE_SLOTS["dpo"])
        dataset = PreferenceRowsDataset(rows, group_examples(rows.table, PREFERENCE_SLOTS["dpo"], Counter()), rule,
                                        ZeroReference(rows))
        pairs = [e for i, e in ((i, dataset[i]) for i in range(len(dataset))) if e.index == i]  # no stand-ins twice
    if order is not None:
        by_chosen = {p.responses[0].row_id: p for p in pairs}
        pairs = [by_chosen[row_id] for row_id in order if row_id in by_chosen]
    for i, p in enumerate(pairs):
        p.index = i
    return pairs


def child(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from transformers import AutoModelForCausalLM, TrainingArguments, set_seed

    import wspo.train.pipeline as pipeline
    from wspo.args import parse_config
    from wspo.models import load_tokenizer, resolve_dtype, resolve_model_dir
    from wspo.train.config import WSPOArguments
    from wspo.train.pairs import PreferenceCollator
    from wspo.train.shard_sets import open_shard_sets, strong_rule
    from wspo.train.trainer import WSPOTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from eager_examples import load_examples  # the eager path the tests check the lazy rows against

    baseline = proc_status("VmRSS")  # after the imports, before any model or data
    path, device = spec["path"], spec["device"]
    record: dict = {"losses": [], "tokens": [], "padded_tokens": []}
    args, training_args = parse_config([WSPOArguments, TrainingArguments], spec["argv"])
    callbacks = [step_timer(record, device)]
    if path in ("wspo_shards", "wspo_shards_ref_from_shards", "dpo_shards"):
        pipeline.WSPOTrainer = recording(WSPOTrainer, record)  # the toolkit's own pipeline, recorded
        pipeline.run(args, training_args, callbacks=callbacks)
    else:
        reference_approach, dpo_in_memory = make_trainers()
        shard_sets = open_shard_sets(args.shards, "sft")  # token ids only: no reward column is read
        model_dir = resolve_model_dir(args.model_name_or_path).resolve()
        tokenizer = load_tokenizer(model_dir)
        rule, _ = strong_rule(shard_sets, tokenizer, args.max_length, "none")
        order = None
        if path == "wspo_reference_approach":  # the wspo_shards path's row order
            order = [e.row_id for e in load_examples(shard_sets, rule, with_rewards=False)[0]]
        pairs = pairs_from_shards(shard_sets, rule, order)
        set_seed(training_args.seed)  # LoRA initialisation, as in pipeline.run
        if path == "wspo_reference_approach":
            policy, reference = pipeline.load_models(args, training_args, model_dir)  # args.loss wspo: frozen copy or LoRA
            weak_dtype = resolve_dtype(spec["dtype"], device)
            weak = {k: AutoModelForCausalLM.from_pretrained(spec[k], dtype=weak_dtype) for k in ("weak_ref", "weak_aligned")}
            trainer_class, extra = recording(reference_approach, record), dict(weak, gamma=args.gamma)
        else:  # dpo_reference_in_memory: args.loss dpo loads the policy alone; add the frozen reference
            policy, _ = pipeline.load_models(args, training_args, model_dir)
            reference = None
            if not args.use_lora:
                reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=pipeline.model_dtype(args, training_args))
                reference.config.use_cache = False
            trainer_class, extra = recording(dpo_in_memory, record), dict(beta=args.beta)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else rule.end_of_turn_id
        trainer = trainer_class(policy, training_args, ref_model=reference, data_collator=PreferenceCollator(pad_id),
                                train_dataset=pairs, processing_class=tokenizer, callbacks=callbacks, **extra)
        trainer.train()
    gpu = device.startswith("cuda")
    ends = record["step_ends"]
    result = {
        "path": path,
        "step_seconds": [b - a for a, b in zip(ends, ends[1:])],
        "losses": record["losses"],
        "tokens": record["tokens"],
        "padded_tokens": record["padded_tokens"],
        "first_batch": record.get("first_batch"),
        "peak_bytes": torch.cuda.max_memory_allocated() if gpu else proc_status("VmHWM"),
        "cpu_vmhwm_bytes": proc_status("VmHWM"),
        "baseline_rss_bytes": baseline,
    }
    print(RESULT_PREFIX + json.dumps(result))


# -- the parent ---------------------------------------------------------------------------------


def run_child(spec: dict, workdir: Path) -> dict:
    spec_file = workdir / f"spec-{spec['path']}.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, __file__, "--child", str(spec_file)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"path {spec['path']} failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}")
    line = next(l for l in reversed(done.stdout.splitlines()) if l.startswith(RESULT_PREFIX))
    return json.loads(line[len(RESULT_PREFIX):])


def precompute(args, workdir: Path, rows: int) -> dict:
    """wspo-precompute: chosen and rejected rows under weak_ref, weak_aligned, and the strong SFT
    model twice (logp_ref for DPO, logp_strong_ref for --reference_logps shards)."""
    shards = workdir / "shards"
    argv = ["--dataset", "embedded", "--output_dir", str(shards), "--max_samples", str(rows), "--slots", "chosen,rejected",
            "--weak_ref", str(workdir / "weak_ref"), "--weak_aligned", str(workdir / "weak_aligned"),
            "--max_length", str(args.max_length), "--max_prompt_length", str(args.max_length * 3 // 4),
            "--backend", "hf", "--dtype", args.dtype, "--batch_tokens", str(args.batch_tokens)]
    if not args.no_dpo:
        argv += ["--ref_model", str(workdir / "strong_ref")]
    if not args.use_lora:
        argv += ["--strong_ref", str(workdir / "strong_ref")]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "wspo.precompute.cli", *argv], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"wspo-precompute failed:\n{done.stdout}\n{done.stderr[-8000:]}")
    manifest = json.loads((shards / "manifest.json").read_text())
    return {"path": shards, "seconds": time.perf_counter() - start, "rows_written": manifest["counts"]["rows_written"],
            "response_tokens": manifest["counts"]["response_tokens"]}


def summarize(result: dict, warmup: int, pairs: int, gpu: bool) -> dict:
    timed = result["step_seconds"][warmup:]
    step = statistics.median(timed)  # robust to other work on a shared machine
    out = {
        "seconds_per_example": round(step / pairs, 4),
        "seconds_per_step_median": round(step, 3),
        "seconds_per_step_mean": round(sum(timed) / len(timed), 3),
        "step_seconds_timed": [round(s, 3) for s in timed],
        "peak_mib": round(result["peak_bytes"] / 2**20, 1),
        "tokens_per_step_per_model": round(sum(result["tokens"][warmup:]) / len(timed), 1),
        "padded_tokens_per_step_per_model": round(sum(result["padded_tokens"][warmup:]) / len(timed), 1),
        "first_step_loss": result["losses"][0],
        "losses": [round(x, 6) for x in result["losses"]],
    }
    if not gpu:
        out["peak_above_baseline_mib"] = round((result["cpu_vmhwm_bytes"] - result["baseline_rss_bytes"]) / 2**20, 1)
    return out


def compare(results: dict, paths: dict, toolkit: str, reference: str, check: bool) -> dict:
    """The reference approach over the toolkit path; fails unless both began with the same loss."""
    a, b = results[toolkit], results[reference]
    if a["first_batch"] != b["first_batch"]:
        raise SystemExit(f"{toolkit} and {reference} trained on different first batches: "
                         f"{a['first_batch']} vs {b['first_batch']}")
    first_a, first_b = a["losses"][0], b["losses"][0]
    diff = abs(first_a - first_b)
    tolerance = LOSS_TOLERANCE if check else BF16_LOSS_TOLERANCE * max(1.0, abs(first_a))
    if diff >= tolerance:
        raise SystemExit(f"first-step losses differ: {toolkit} {first_a!r}, {reference} {first_b!r} (|diff| {diff:.2e})")
    ratio = lambda key: round(paths[reference][key] / paths[toolkit][key], 3)  # noqa: E731
    out = {
        f"{reference}_over_{toolkit}_time_per_example": ratio("seconds_per_example"),
        f"{reference}_over_{toolkit}_peak_memory": ratio("peak_mib"),
        "first_step_loss_abs_diff": diff,
        "max_loss_abs_diff_all_steps": max(abs(x - y) for x, y in zip(a["losses"], b["losses"])),
    }
    if "peak_above_baseline_mib" in paths[toolkit]:
        out[f"{reference}_over_{toolkit}_peak_memory_above_baseline"] = ratio("peak_above_baseline_mib")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strong_config", choices=list(PRESETS), default="cpu-strong")
    parser.add_argument("--weak_config", choices=list(PRESETS), default="cpu-weak")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="every model's dtype, in phase one and in the job (bfloat16: pure bf16 training)")
    parser.add_argument("--batch_pairs", type=int, default=4, help="preference pairs (= chosen responses) per optimizer step")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    parser.add_argument("--warmup_steps", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch_tokens", type=int, default=8192, help="phase one's scoring batch (not timed)")
    parser.add_argument("--use_lora", action="store_true", help="LoRA (reference = adapters off) instead of full fine-tuning")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--noise", type=float, default=0.02, help="weak_aligned = weak_ref + N(0, noise^2) per weight")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each path (0: torch's default)")
    parser.add_argument("--no_dpo", action="store_true", help="skip the DPO comparison")
    parser.add_argument("--workdir", default=None, help="where the temporary models and shards go (default: $TMPDIR)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        return build(spec) if spec["path"] == "build" else child(spec)

    total_steps = args.warmup_steps + args.steps
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="train_vs_reference_") as tmp:
        workdir = Path(tmp)
        base = {"workdir": tmp, "device": args.device, "dtype": args.dtype, "max_length": args.max_length,
                "threads": args.threads, "weak_ref": str(workdir / "weak_ref"), "weak_aligned": str(workdir / "weak_aligned")}
        sizes = run_child(dict(base, path="build", strong_config=args.strong_config, weak_config=args.weak_config,
                               noise=args.noise), workdir)
        rows = args.batch_pairs * total_steps + 8  # a few spare for rows phase one skips
        shards = precompute(args, workdir, rows)
        train = {
            "model_name_or_path": workdir / "strong_ref", "shards": shards["path"], "max_length": args.max_length,
            "eval_fraction": 0.0, "per_device_train_batch_size": args.batch_pairs, "learning_rate": args.learning_rate,
            "lr_scheduler_type": "constant", "max_steps": total_steps, "logging_steps": total_steps, "save_strategy": "no",
            "report_to": "none", "dataloader_pin_memory": "false", "disable_tqdm": "true", "seed": 0,
            "train_sampling_strategy": "sequential", "use_cpu": str(args.device == "cpu").lower(),
            # bfloat16: the models are loaded in bf16 (pure bf16 training). Not fp32 weights under
            # --bf16 autocast: accelerate wraps only the model's forward in autocast, so
            # response_logprobs' head re-application runs in fp32 and its self-check fails.
            "bf16": str(args.dtype == "bfloat16").lower(), "model_dtype": args.dtype, "use_lora": str(args.use_lora).lower(),
            "gradient_checkpointing": str(args.gradient_checkpointing).lower(),
        }

        def argv(name, **keys):
            values = dict(train, output_dir=workdir / f"out-{name}", **keys)
            return [a for k, v in values.items() for a in (f"--{k}", str(v))]

        plan = {"wspo_shards": argv("wspo_shards", loss="wspo", reference_logps="model")}
        if not args.use_lora:
            plan["wspo_shards_ref_from_shards"] = argv("wspo_shards_ref_from_shards", loss="wspo", reference_logps="shards")
        plan["wspo_reference_approach"] = argv("wspo_reference_approach", loss="wspo", reference_logps="model")
        if not args.no_dpo:
            plan["dpo_shards"] = argv("dpo_shards", loss="dpo")
            plan["dpo_reference_in_memory"] = argv("dpo_reference_in_memory", loss="dpo")
        results = {name: run_child(dict(base, path=name, argv=a), workdir) for name, a in plan.items()}

    paths = {name: summarize(r, args.warmup_steps, args.batch_pairs, args.device == "cuda") for name, r in results.items()}
    check = args.dtype == "float32"
    report = {
        "device": args.device,
        "dtype": args.dtype,
        "torch_threads": args.threads or "default",
        "models": {"strong": sizes["strong_ref"], "weak": sizes["weak_ref"]},
        "settings": {"batch_pairs": args.batch_pairs, "max_length": args.max_length, "warmup_steps": args.warmup_steps,
                     "timed_steps": args.steps, "fine_tuning": "lora" if args.use_lora else "full",
                     "strong_reference": "policy with adapters off" if args.use_lora else "frozen copy",
                     "optimizer": "adamw_torch", "learning_rate": args.learning_rate,
                     "gradient_checkpointing": args.gradient_checkpointing, "gamma": 0.1, "dpo_beta": 0.1},
        "shards": {k: v for k, v in shards.items() if k != "path"},
        "peak_memory": "torch.cuda.max_memory_allocated" if args.device == "cuda" else "VmHWM of the path's process",
        "paths": paths,
        "wspo": compare(results, paths, "wspo_shards", "wspo_reference_approach", check),
        "loss_check": (f"|first-step loss difference| < {LOSS_TOLERANCE} asserted" if check
                       else f"|first-step loss difference| < {BF16_LOSS_TOLERANCE} x max(1, |loss|) asserted (bfloat16)"),
    }
    if "wspo_shards_ref_from_shards" in results:
        report["wspo_ref_from_shards"] = compare(results, paths, "wspo_shards_ref_from_shards", "wspo_reference_approach", check)
    if not args.no_dpo:
        report["dpo"] = compare(results, paths, "dpo_shards", "dpo_reference_in_memory", check)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
