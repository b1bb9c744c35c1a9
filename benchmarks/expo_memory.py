"""Peak memory of `wspo-extrapolate` against the size of the model: prints one JSON object.

    python benchmarks/expo_memory.py                 # Qwen2-1.5B shapes, bfloat16: 3.1 GB per model
    python benchmarks/expo_memory.py --preset small  # ~1.1 GB per model, for a quick look

In a temporary directory it writes a random-weight "SFT" checkpoint with the preset's shapes
(sharded safetensors with an index, like a hub checkpoint) and an "aligned" copy with noise added,
runs `wspo-extrapolate` on them as a subprocess with two alphas, and reports that subprocess's
peak RSS (VmHWM polled from /proc; see `run_tool` for why not ru_maxrss) next to the size
of one model on disk. The claim under test (issue 5): peak RSS < 0.25 x model size for a model of
at least 1 GB. A few output values are compared with a direct computation as a sanity check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PRESETS = {
    # Qwen/Qwen2-1.5B's shapes (tied embeddings): 1.54 B parameters.
    "qwen2-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    # A smaller Qwen2-style model: 0.55 B parameters, 1.1 GB in bfloat16.
    "small": dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=30,
                  num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False),
}


def qwen2_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Qwen2ForCausalLM checkpoint with config `c`."""
    h, i, head = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], h)
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    return shapes


def write_model(out: Path, config: dict, dtype: torch.dtype, seed: int, base: Path | None = None,
                noise: float = 0.0, shard_bytes: int = 10**9) -> int:
    """A random checkpoint (or `base` plus Gaussian noise), sharded like transformers; returns bytes on disk."""
    out.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    current, size = {}, 0  # the shard being filled; written as soon as the next tensor would overflow it
    for name, shape in qwen2_shapes(config).items():
        if base is not None:
            with safe_open(str(base / base_index(base)[name]), "pt") as f:
                t = f.get_tensor(name).float()
            t += torch.randn(shape, generator=generator) * noise
        elif name.endswith("norm.weight"):
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=generator) * 0.02
        t = t.to(dtype)
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            _save_shard(out, current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    if current:
        _save_shard(out, current)
    files = sorted(out.glob("part-*.safetensors"))
    weight_map = {}
    for k, path in enumerate(files, 1):
        final = out / f"model-{k:05d}-of-{len(files):05d}.safetensors"
        path.rename(final)
        with safe_open(str(final), "pt") as f:
            weight_map.update({name: final.name for name in f.keys()})
    total = sum(p.stat().st_size for p in out.glob("model-*.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    hf_config = dict(config, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                     dtype=str(dtype).removeprefix("torch."), rms_norm_eps=1e-6, max_position_embeddings=4096)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    return total


def _save_shard(out: Path, tensors: dict) -> None:
    n = len(list(out.glob("part-*.safetensors")))
    save_file(tensors, str(out / f"part-{n:05d}.safetensors"), metadata={"format": "pt"})


def base_index(model_dir: Path) -> dict[str, str]:
    """Tensor name -> file, for a sharded or a single-file checkpoint."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {name: "model.safetensors" for name in f.keys()}


def vm_hwm(pid: int) -> int | None:
    """Peak RSS so far of a running process (VmHWM, bytes), or None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_measured(command: list[str]) -> tuple[int, float, str]:
    """Run a command; return (its peak RSS in bytes, seconds, its output); exit if it fails.

    The peak is VmHWM polled from /proc while it runs (VmHWM never decreases, so the last reading
    is the peak up to a few ms before exit). Not ru_maxrss from wait4/RUSAGE_CHILDREN: Linux
    carries the parent's RSS at fork into the child's ru_maxrss, which would charge this
    benchmark's own memory (gigabytes after building the models) to the tool.
    """
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, vm_hwm(proc.pid) or 0)
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{output[-3000:]}")
    return peak, seconds, output


def run_tool(args: list[str]) -> tuple[int, float, str]:
    """Run wspo-extrapolate; return (its peak RSS in bytes, seconds, its output)."""
    exe = shutil.which("wspo-extrapolate")
    return run_measured(([exe] if exe else [sys.executable, "-m", "wspo.extrapolate.cli"]) + args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="qwen2-1.5b")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--alphas", nargs="+", default=["0.3", "0.5"])
    parser.add_argument("--max_shard_size", default="2GB")
    parser.add_argument("--workdir", default=None, help="where the temporary models go (default: $TMPDIR)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    config = PRESETS[args.preset]

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="expo_memory_") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        model_bytes = write_model(tmp / "sft", config, dtype, seed=0)
        write_model(tmp / "aligned", config, dtype, seed=1, base=tmp / "sft", noise=0.002)
        os.sync()  # flush the inputs now, so their write-back does not slow down the timed run
        build_seconds = time.perf_counter() - start

        peak_rss, seconds, output = run_tool(
            ["--sft", str(tmp / "sft"), "--aligned", str(tmp / "aligned"), "--alpha", *args.alphas,
             "--output_dir", str(tmp / "out"), "--max_shard_size", args.max_shard_size])
        # Baseline: the same interpreter importing the tool and exiting (torch + transformers' parser).
        baseline_rss, _, _ = run_tool(["--help"])

        # Sanity check: a few tensors of the first alpha against the formula.
        alpha = float(args.alphas[0])
        out_dir = tmp / "out" / f"alpha-{alpha!r}"
        checked = ["model.norm.weight", "model.layers.0.self_attn.k_proj.weight", "model.layers.3.mlp.down_proj.weight"]
        for name in checked:
            read = lambda d: safe_open(str(d / base_index(d)[name]), "pt").get_tensor(name)
            sft, aligned = read(tmp / "sft").float(), read(tmp / "aligned").float()
            expected = (aligned + alpha * (aligned - sft)).to(dtype)
            assert torch.equal(read(out_dir), expected), name

        shapes = qwen2_shapes(config)
        largest = max(shapes, key=lambda n: torch.Size(shapes[n]).numel())
        output_bytes = sum(p.stat().st_size for p in (tmp / "out").rglob("*.safetensors"))
        result = {
            "preset": args.preset,
            "dtype": args.dtype,
            "parameters": sum(torch.Size(s).numel() for s in shapes.values()),
            "tensors": len(shapes),
            "model_size_bytes": model_bytes,
            "largest_tensor": largest,
            "largest_tensor_bytes": torch.Size(shapes[largest]).numel() * dtype.itemsize,
            "alphas": [float(a) for a in args.alphas],
            "output_bytes_all_alphas": output_bytes,
            "peak_rss_bytes": peak_rss,
            "peak_rss_over_model_size": round(peak_rss / model_bytes, 4),
            "baseline_rss_bytes (import + --help)": baseline_rss,
            "extrapolate_seconds": round(seconds, 1),
            "build_seconds": round(build_seconds, 1),
            "target_ratio": 0.25,
            "passes": peak_rss / model_bytes < 0.25,
            "checked_tensors_exact": checked,
            "tool_summary": [line for line in output.splitlines() if line.startswith(("tensors:", "peak RSS"))],
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
