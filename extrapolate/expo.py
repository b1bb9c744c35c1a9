"""ExPO, model extrapolation: theta = theta_aligned + alpha * (theta_aligned - theta_sft).

The run has two parts. `make_plan` reads only headers and configs: it checks that the two models
match (architecture, tensor names, shapes) and decides, for every output tensor, how it is computed
and in which dtype it is written. `extrapolate` then walks the plan once, reading each tensor in
pieces of rows from both inputs, and writes the result for every alpha into that alpha's output
directory, so several alphas cost one pass over the inputs.

When the aligned model is a PEFT LoRA adapter on the SFT model, theta_aligned = W_sft + delta with
delta = (lora_B @ lora_A) * scaling, and the formula becomes theta = W_sft + (1 + alpha) * delta;
weights the adapter does not touch are the SFT's (alpha * 0 = 0), weights it replaces
(`modules_to_save`) are extrapolated like a full model's.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from wspo.errors import ConfigError, OutputExistsError
from wspo.errors import NonFiniteError
from wspo.models import check_weights

from .lora import LoraAdapter, check_against_base, check_base_model, is_adapter_dir, load_adapter
from .tensors import (
    CheckpointError, LazyCheckpoint, OutputTensor, StreamingShardWriter, plan_shards, row_chunks,
    shard_file_names, write_index,
)

OUT_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config fields that must agree: extrapolating between different architectures is meaningless.
ARCHITECTURE_FIELDS = ("architectures", "model_type")
# Files never copied into the output: the weights (rewritten) and the model card (would describe
# the aligned model, not the extrapolated one).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
# wspo_run.json would describe the aligned model's training run; the output gets its own.
SKIP_FILES = ("README.md", ".gitattributes", "wspo_run.json")
# Input-embedding tensor names: a tied-embedding SFT model's output head is this tensor.
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
HEAD_NAME = "lm_head.weight"


class NonFiniteTensorError(CheckpointError, NonFiniteError):
    """An output tensor holds NaN or inf (an alpha that overflows the output dtype, or broken inputs)."""


class SwallowedStepWarning(UserWarning):
    """Rounding the result to a low-precision dtype undoes most of the extrapolation step."""


@dataclass(frozen=True)
class TensorStep:
    """How one output tensor is made.

    kind "extrapolate": both models store it in full (the aligned one under `aligned_name`);
    kind "lora": SFT weight plus the adapter's delta; kind "copy": the SFT tensor unchanged (a
    weight the adapter leaves alone, or a non-float tensor, which must be equal in both models).
    """

    name: str
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    kind: str
    aligned_name: str | None = None
    sft_name: str | None = None  # the SFT tensor it is extrapolated from, when named differently


def tied_head_source(sft: LazyCheckpoint, aligned: LazyCheckpoint, sft_dir: Path) -> str | None:
    """The SFT embedding that stands for `lm_head.weight` when the SFT model ties its head to its
    input embedding (so stores no head) but the aligned checkpoint stores the head separately
    (training untied it, or saved it untied): that embedding is the SFT model's head."""
    if HEAD_NAME in sft.tensors or HEAD_NAME not in aligned.tensors:
        return None
    if not read_json(sft_dir / "config.json").get("tie_word_embeddings", True):
        return None
    shape = aligned.tensors[HEAD_NAME].shape
    candidates = [n for n in sft.names() if n.endswith(EMBEDDING_SUFFIXES) and sft.tensors[n].shape == shape]
    return candidates[0] if len(candidates) == 1 else None


@dataclass
class Plan:
    sft: LazyCheckpoint
    aligned: LazyCheckpoint | None  # None when the aligned model is an adapter
    adapter: LoraAdapter | None
    steps: list[TensorStep]
    files_from: Path  # config, tokenizer and generation config are copied from here


def alpha_dir_name(alpha: float) -> str:
    """OUT/alpha-0.3: Python's shortest round-trip repr, so distinct alphas never share a directory."""
    return f"alpha-{float(alpha)!r}"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def check_configs(sft_dir: Path, aligned_dir: Path) -> None:
    sft_config, aligned_config = read_json(sft_dir / "config.json"), read_json(aligned_dir / "config.json")
    for key in ARCHITECTURE_FIELDS:
        if sft_config.get(key) != aligned_config.get(key):
            raise CheckpointError(f"config field {key!r} differs: {sft_config.get(key)!r} in the SFT model "
                                  f"({sft_dir}) but {aligned_config.get(key)!r} in the aligned model ({aligned_dir})")


def check_same_tensors(sft: LazyCheckpoint, aligned: LazyCheckpoint, tied_head: str | None = None) -> None:
    """Same names and shapes in both models (but a separately stored head of a tied SFT model, see
    `tied_head_source`); the first offending tensor is named."""
    only_aligned = [n for n in aligned.names() if n not in sft.tensors and not (tied_head and n == HEAD_NAME)]
    only_sft = [n for n in sft.names() if n not in aligned.tensors]
    for names, present, absent in ((only_aligned, "aligned", "SFT"), (only_sft, "SFT", "aligned")):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise CheckpointError(f"tensor {names[0]!r} is in the {present} model but not in the {absent} model{more}")
    for name in sft.names():
        if sft.tensors[name].shape != aligned.tensors[name].shape:
            raise CheckpointError(f"tensor {name!r}: shape {list(sft.tensors[name].shape)} in the SFT model but "
                                  f"{list(aligned.tensors[name].shape)} in the aligned model")


def output_dtype(in_dtype: torch.dtype, out_dtype: str) -> torch.dtype:
    if not in_dtype.is_floating_point:
        return in_dtype  # integer buffers are copied as they are
    return OUT_DTYPES[out_dtype] or in_dtype


def make_plan(sft_dir: str | Path, aligned_dir: str | Path, out_dtype: str = "auto",
              allow_base_mismatch: bool = False) -> Plan:
    sft_dir, aligned_dir = Path(sft_dir), Path(aligned_dir)
    if out_dtype not in OUT_DTYPES:
        raise ConfigError(f"out_dtype {out_dtype!r}: expected one of {', '.join(OUT_DTYPES)}")
    # The output's config is the aligned model's (the SFT model's under an adapter): it must exist.
    config_source = sft_dir if is_adapter_dir(aligned_dir) else aligned_dir
    if not (config_source / "config.json").is_file():
        raise CheckpointError(f"{config_source}: no config.json (not a transformers model directory)")
    sft = LazyCheckpoint(sft_dir)
    steps = []
    if is_adapter_dir(aligned_dir):
        check_base_model(aligned_dir, sft_dir, allow_base_mismatch)
        adapter = load_adapter(aligned_dir)
        check_against_base(adapter, sft)
        for name, info in sft.tensors.items():
            if name in adapter.weights:
                kind, aligned_name = "lora", None
            elif name in adapter.replaced:
                kind, aligned_name = "extrapolate", adapter.replaced[name]
            else:
                kind, aligned_name = "copy", None
            steps.append(TensorStep(name, info.shape, info.dtype, output_dtype(info.dtype, out_dtype), kind, aligned_name))
        return Plan(sft, None, adapter, steps, files_from=sft_dir)

    check_configs(sft_dir, aligned_dir)
    aligned = LazyCheckpoint(aligned_dir)
    tied_head = tied_head_source(sft, aligned, sft_dir)
    check_same_tensors(sft, aligned, tied_head)
    for name in sft.names():
        info = aligned.tensors[name]  # the output keeps the aligned model's dtype by default
        kind = "extrapolate" if info.dtype.is_floating_point else "copy"
        steps.append(TensorStep(name, info.shape, info.dtype, output_dtype(info.dtype, out_dtype), kind, name))
    if tied_head:
        info = aligned.tensors[HEAD_NAME]
        steps.append(TensorStep(HEAD_NAME, info.shape, info.dtype, output_dtype(info.dtype, out_dtype),
                                "extrapolate", HEAD_NAME, sft_name=tied_head))
    return Plan(sft, aligned, None, steps, files_from=aligned_dir)


def compute_rows(plan: Plan, step: TensorStep, rows, alphas: list[float]):
    """(aligned value, [result for each alpha]) for rows [start, end) of one tensor, in float32.

    The formulas are written out as in the paper (no fused multiply-add), so a float32 output is
    bit-identical to computing them on the whole state dict.
    """
    sft = plan.sft.read(step.sft_name or step.name, rows)
    if step.kind == "copy":
        if plan.aligned is not None and not torch.equal(sft, plan.aligned.read(step.name, rows)):
            raise CheckpointError(f"tensor {step.name!r} ({sft.dtype}) is not a float tensor and differs between "
                                  f"the SFT and the aligned model: cannot extrapolate it")
        return sft, [sft for _ in alphas]
    sft = sft.to(torch.float32)
    if step.kind == "lora":
        delta = plan.adapter.delta_rows(step.name, rows)
        aligned = sft + delta
        return aligned, [sft + (1 + alpha) * delta for alpha in alphas]
    source = plan.aligned if plan.aligned is not None else plan.adapter.reader
    aligned = source.read(step.aligned_name, rows).to(torch.float32)
    delta = aligned - sft
    return aligned, [aligned + alpha * delta for alpha in alphas]


@dataclass
class SwallowCount:
    """Per tensor and alpha: elements the step changes in float32, and how many of those round
    back to the aligned model's value in the output dtype."""

    changed: int = 0
    swallowed: int = 0

    @property
    def fraction(self) -> float:
        return self.swallowed / self.changed if self.changed else 0.0


def count_swallowed(count: SwallowCount, aligned: torch.Tensor, result: torch.Tensor,
                    aligned_rounded: torch.Tensor, result_rounded: torch.Tensor) -> None:
    """Add one piece's elements to `count` (float32 `aligned`/`result` and their output-dtype roundings).

    swallowed = changed and rounds back. An unchanged element always rounds back, so
    swallowed = (rounding back) - (unchanged): two counts instead of a slow boolean `&` and sum.
    """
    changed = int(torch.count_nonzero(result != aligned))
    rounds_back = int(torch.count_nonzero(result_rounded == aligned_rounded))
    count.changed += changed
    count.swallowed += rounds_back - (result.numel() - changed)


def partial_dir(final_dir: Path) -> Path:
    """Where an alpha's output is written until it is complete: OUT/.alpha-0.3.partial."""
    return final_dir.with_name(f".{final_dir.name}.partial")


def prepare_output_dirs(output_dir: Path, alphas: list[float], overwrite: bool) -> list[Path]:
    """The final directories (checked, not touched) and fresh temporary ones beside them."""
    dirs = [output_dir / alpha_dir_name(alpha) for alpha in alphas]
    for d in dirs:
        if d.exists() and any(d.iterdir()) and not overwrite:
            raise OutputExistsError(f"{d} exists and is not empty (pass --overwrite to replace it)")
    for d in dirs:
        if partial_dir(d).exists():
            shutil.rmtree(partial_dir(d))  # left by an interrupted run
        partial_dir(d).mkdir(parents=True)
    return dirs


def publish_folder(final_dir: Path) -> None:
    """Rename the complete temporary directory to its final name (replacing an old output)."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    partial_dir(final_dir).rename(final_dir)


def check_output_finite(plan: "Plan", step: TensorStep, rows, alpha: float, rounded: torch.Tensor,
                 aligned: torch.Tensor) -> None:
    """Refuse NaN/inf in an output piece, saying whether the inputs or the alpha caused it."""
    if not rounded.is_floating_point() or bool(torch.isfinite(rounded).all()):
        return
    bad = int((~torch.isfinite(rounded)).sum())
    sft_rows = plan.sft.read(step.sft_name or step.name, rows)
    if not bool(torch.isfinite(aligned).all()) or not bool(torch.isfinite(sft_rows.float()).all()):
        raise NonFiniteTensorError(f"tensor {step.name!r}: the input checkpoints hold NaN or inf values; nothing written")
    largest = torch.finfo(step.out_dtype).max
    raise NonFiniteTensorError(
        f"alpha={alpha}: tensor {step.name!r} overflows {str(step.out_dtype).removeprefix('torch.')} "
        f"({bad} element(s) beyond +-{largest:.3g} or NaN); use a smaller --alpha or --out_dtype float32; "
        f"nothing written")


def copy_model_files(source: Path, out_dir: Path, steps: list[TensorStep]) -> None:
    """Config, tokenizer, chat template, generation config: every file but the weights and the card.

    When every float tensor is written in one dtype that differs from the config's, the config's
    dtype is updated so that `from_pretrained(dtype="auto")` loads what is on disk.
    """
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES + (".index.json",)) \
                and path.name not in SKIP_FILES and not path.name.startswith("adapter_"):
            shutil.copy2(path, out_dir / path.name)
    float_dtypes = {s.out_dtype for s in steps if s.out_dtype.is_floating_point}
    config_path = out_dir / "config.json"
    if len(float_dtypes) == 1 and config_path.is_file():
        config = json.loads(config_path.read_text())
        dtype_name = str(float_dtypes.pop()).removeprefix("torch.")
        stale = [key for key in ("dtype", "torch_dtype") if key in config and config[key] != dtype_name]
        if stale:
            config.update({key: dtype_name for key in stale})
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: VmHWM from /proc/self/status. Not ru_maxrss: the kernel carries the pre-exec image's
    peak into ru_maxrss, so a tool started from a 3 GB Python process would report >= 3 GB.
    Elsewhere ru_maxrss (bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class Summary:
    alphas: list[float]
    output_dirs: list[str]
    tensors: int
    bytes_written: int
    peak_rss_bytes: int
    seconds: float
    # alpha -> [(tensor, fraction swallowed)] for tensors above the threshold
    swallowed: dict[float, list[tuple[str, float]]] = field(default_factory=dict)


def extrapolate(sft_dir: str | Path, aligned_dir: str | Path, alphas: list[float], output_dir: str | Path,
                out_dtype: str = "auto", max_shard_size: int = 5 * 10**9, swallow_threshold: float = 0.5,
                overwrite: bool = False, progress: bool = True, allow_base_mismatch: bool = False) -> Summary:
    """Write OUT/alpha-<alpha>/ for every alpha; see the module docstring and README."""
    start_time = time.perf_counter()
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ConfigError("give at least one --alpha")
    not_finite = [a for a in alphas if not math.isfinite(a)]
    if not_finite:
        raise ConfigError(f"--alpha {not_finite[0]}: must be a finite number")
    if len(set(alphas)) != len(alphas):
        raise ConfigError(f"--alpha {alphas}: must be distinct (each gets its own output directory)")
    for option, folder in (("--sft", sft_dir), ("--aligned", aligned_dir)):  # a cut download or copy, named
        if Path(folder).is_dir():
            check_weights(Path(folder), option=option)
    plan = make_plan(sft_dir, aligned_dir, out_dtype, allow_base_mismatch)
    final_dirs = prepare_output_dirs(Path(output_dir), alphas, overwrite)
    out_dirs = [partial_dir(d) for d in final_dirs]
    try:
        summary = write_outputs(plan, alphas, out_dirs, max_shard_size, swallow_threshold, progress,
                                {"sft": str(sft_dir), "aligned": str(aligned_dir), "out_dtype": out_dtype})
    except BaseException:
        for d in out_dirs:  # no alpha directory may look complete
            shutil.rmtree(d, ignore_errors=True)
        raise
    for d in final_dirs:
        publish_folder(d)
    bytes_written, swallowed = summary
    return Summary(alphas, [str(d) for d in final_dirs], len(plan.steps), bytes_written, peak_rss_bytes(),
                   time.perf_counter() - start_time, swallowed)


def write_weights(plan: Plan, alphas: list[float], out_dirs: list[Path], shards, file_names, steps_by_name,
                  counts, bar) -> int:
    """Stream every shard of every alpha; returns the bytes written."""
    bytes_written = 0
    for shard, file_name in zip(shards, file_names):
        writers = [StreamingShardWriter(d / file_name, shard) for d in out_dirs]
        for tensor in shard:
            step = steps_by_name[tensor.name]
            # Rounding can only swallow the step when the output is narrower than the arithmetic.
            check_rounding = step.kind != "copy" and step.out_dtype.itemsize < 4
            for rows in row_chunks(step.shape):
                aligned, results = compute_rows(plan, step, rows, alphas)
                aligned_rounded = aligned.to(step.out_dtype) if check_rounding else None
                for alpha, result, writer in zip(alphas, results, writers):
                    rounded = result.to(step.out_dtype)
                    check_output_finite(plan, step, rows, alpha, rounded, aligned)
                    if check_rounding:
                        count_swallowed(counts[alpha, step.name], aligned, result, aligned_rounded, rounded)
                    writer.write(rounded)
            bar.update(1)
        for writer in writers:
            writer.close()
            bytes_written += writer.total_bytes
    return bytes_written


def write_outputs(plan: Plan, alphas: list[float], out_dirs: list[Path], max_shard_size: int,
                  swallow_threshold: float, progress: bool, run_info: dict):
    """Write every alpha's weights, index, model files and records into `out_dirs`; returns
    (bytes written, alpha -> swallowed-step tensors)."""

    # The same shard layout for every alpha: tensors in the SFT checkpoint's order, grouped by size.
    outputs = [OutputTensor(s.name, s.shape, s.out_dtype) for s in plan.steps]
    shards = plan_shards(outputs, max_shard_size)
    file_names = shard_file_names(len(shards))
    steps_by_name = {s.name: s for s in plan.steps}
    counts = {(alpha, s.name): SwallowCount() for alpha in alphas for s in plan.steps}

    # `with`: the bar is closed (its line ended) before an error message is printed.
    with tqdm(total=len(plan.steps), unit="tensor", desc="extrapolating", disable=not progress) as bar:
        bytes_written = write_weights(plan, alphas, out_dirs, shards, file_names, steps_by_name, counts, bar)

    # Index, then config and tokenizer: an output directory is complete once its config exists.
    for d in out_dirs:
        write_index(d, shards, file_names)
        copy_model_files(plan.files_from, d, plan.steps)

    swallowed = {}
    for alpha in alphas:
        hits = sorted(((s.name, counts[alpha, s.name].fraction) for s in plan.steps
                       if counts[alpha, s.name].fraction > swallow_threshold), key=lambda x: -x[1])
        swallowed[alpha] = hits
        if hits:
            worst = ", ".join(f"{name} {100 * frac:.0f}%" for name, frac in hits[:3])
            warnings.warn(
                f"alpha={alpha}: in {len(hits)} of {len(plan.steps)} tensors, more than "
                f"{100 * swallow_threshold:.0f}% of the elements the step changes round back to the aligned "
                f"model's value in {steps_by_name[hits[0][0]].out_dtype} (worst: {worst}); "
                f"the output is barely extrapolated. Pass --out_dtype float32 to keep the step.",
                SwallowedStepWarning, stacklevel=2,
            )
    aligned_run = Path(run_info["aligned"]) / "wspo_run.json"
    for d, alpha in zip(out_dirs, alphas):
        record = {"method": "expo", "formula": "theta_aligned + alpha * (theta_aligned - theta_sft)",
                  "alpha": alpha, "sft": run_info["sft"], "aligned": run_info["aligned"],
                  "aligned_is_lora_adapter": plan.adapter is not None, "out_dtype": run_info["out_dtype"],
                  "tensors_with_swallowed_step": len(swallowed[alpha]),
                  "head_extrapolated_from_tied_embedding": next(
                      (s.sft_name for s in plan.steps if s.sft_name), None)}
        (d / "extrapolation.json").write_text(json.dumps(record, indent=2) + "\n")
        # The output's run record describes this extrapolation; the aligned model's training run
        # stays in its own directory (pointed to, not copied).
        run_record = {"command": "wspo-extrapolate", "extrapolation": record,
                      "aligned_training_run": str(aligned_run) if aligned_run.is_file() else None}
        (d / "wspo_run.json").write_text(json.dumps(run_record, indent=2) + "\n")
    return bytes_written, swallowed
