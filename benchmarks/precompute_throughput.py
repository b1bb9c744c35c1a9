"""Phase-one throughput: hf backend vs a naive padded full-vocabulary loop (vs vLLM), one run.

    python benchmarks/precompute_throughput.py [--rows 256] [--vocab 32000] [--vllm] [--device cuda]

Every path scores the same rows (chosen responses of the bundled sample, tokenized by the rule)
with the same random-weight Qwen2 model and runs in its own subprocess, so peak memory is that
path's alone (`ru_maxrss` on CPU, `torch.cuda.max_memory_allocated` on GPU). Prints JSON with
tokens/s, peak memory, the max abs difference to the naive log-probs, and the ratios.

- naive: rows in dataset order, batches of a fixed row count padded to the longest, full logits,
  float32 log_softmax over [batch, length, vocab], gather (what a first implementation does);
- hf: `wspo.precompute.scorers.HFScorer` (length-sorted batches of `batch_tokens`, log-softmax at
  response positions only);
- vllm (with --vllm): `wspo.precompute.vllm_scorer.VLLMScorer`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(workdir: Path, vocab: int, hidden: int, layers: int, rows: int, max_length: int) -> None:
    """A random Qwen2 model with `vocab` embeddings and the rows' token ids (tiny tokenizer)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from wspo.embedded.models import build_weak_pair
    from wspo.embedded.sample import SAMPLE_DIR
    from wspo.shards.tokenization import ResponseTokenizer, Skip

    pair = build_weak_pair(workdir / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(pair["weak_ref"])
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), head_dim=64,
                         max_position_embeddings=max_length + 8, tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(workdir / "model")
    rule = ResponseTokenizer(tokenizer, max_length=max_length, max_prompt_length=max_length // 2)
    sequences, prompts = [], []
    lines = (SAMPLE_DIR / "train_prefs.jsonl").read_text().splitlines()
    for k in range(rows):  # cycle through the sample with both slots for enough rows
        row = json.loads(lines[k % len(lines)])
        conversation = row["chosen"] if (k // len(lines)) % 2 == 0 else row["rejected"]
        try:
            tok = rule(conversation[:-1], conversation[-1]["content"])
        except Skip:
            continue
        sequences.append(tok.input_ids)
        prompts.append(len(tok.prompt_ids))
    (workdir / "rows.json").write_text(json.dumps({"sequences": sequences, "prompt_lengths": prompts}))


def naive_scores(model, sequences, prompts, batch_rows, device):
    import numpy as np
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_rows):
            batch = sequences[start : start + batch_rows]
            width = max(map(len, batch))
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for r, seq in enumerate(batch):
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            picked = logp[:, :-1].gather(2, ids[:, 1:, None])[..., 0].cpu()
            for r, seq in enumerate(batch):
                out.append(picked[r, prompts[start + r] - 1 : len(seq) - 1].numpy().astype(np.float32))
    return out


def child(path: str, workdir: Path, device: str, batch_tokens: int) -> None:
    """Score the rows with one path; print one JSON line."""
    import numpy as np
    import torch

    rows = json.loads((workdir / "rows.json").read_text())
    sequences, prompts = rows["sequences"], rows["prompt_lengths"]
    if path == "naive":
        from wspo.models import load_causal_lm

        model = load_causal_lm(workdir / "model", torch.float32 if device == "cpu" else torch.bfloat16, device)
        batch_rows = max(1, batch_tokens // max(map(len, sequences)))
        run = lambda: naive_scores(model, sequences, prompts, batch_rows, device)  # noqa: E731
    elif path == "hf":
        from wspo.precompute.scorers import HFScorer

        scorer = HFScorer(workdir / "model", dtype="auto", batch_tokens=batch_tokens, device=device)
        run = lambda: scorer.score(sequences, prompts)  # noqa: E731
    else:
        from wspo.precompute.vllm_scorer import VLLMScorer

        engine = {"kv_cache_memory_bytes": 2 * 2**30} if device == "cpu" else {"gpu_memory_utilization": 0.8}
        scorer = VLLMScorer(workdir / "model", batch_tokens=batch_tokens, max_model_len=max(map(len, sequences)), **engine)
        run = lambda: scorer.score(sequences, prompts)  # noqa: E731
    run_small = [sequences[:4], prompts[:4]]  # warm-up (allocator, kernels) outside the timing
    if path == "naive":
        naive_scores(model, *run_small, 1, device)
    else:
        scorer.score(*run_small)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    scores = run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    np.save(workdir / f"scores-{path}.npy", np.concatenate(scores))
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    # vLLM logs to stdout too: the result line is marked.
    print("RESULT " + json.dumps({"path": path, "seconds": seconds, "tokens": sum(map(len, sequences)), "peak_bytes": peak}), flush=True)
    if path == "vllm":
        scorer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--batch_tokens", type=int, default=8192)
    parser.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")
    parser.add_argument("--vllm", action="store_true", help="also time the vLLM backend")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, Path(args.workdir), args.device, args.batch_tokens)

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build(workdir, args.vocab, args.hidden, args.layers, args.rows, args.max_length)
        results = {}
        for path in ["naive", "hf"] + (["vllm"] if args.vllm else []):
            done = subprocess.run([sys.executable, __file__, "--child", path, "--workdir", tmp, "--device", args.device,
                                   "--batch_tokens", str(args.batch_tokens)], capture_output=True, text=True)
            if not any(line.startswith("RESULT ") for line in done.stdout.splitlines()):
                sys.exit(f"path {path} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            results[path] = json.loads(next(line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")))
            results[path]["tokens_per_second"] = results[path]["tokens"] / results[path]["seconds"]
        naive = np.load(workdir / "scores-naive.npy")
        report = {
            "device": args.device,
            "model": {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers},
            "rows": args.rows, "batch_tokens": args.batch_tokens,
            "paths": {k: {"tokens_per_second": round(v["tokens_per_second"], 1), "peak_mib": round(v["peak_bytes"] / 2**20, 1),
                          "max_abs_diff_vs_naive": float(np.abs(np.load(workdir / f"scores-{k}.npy") - naive).max())}
                      for k, v in results.items()},
            "hf_over_naive_speed": round(results["hf"]["tokens_per_second"] / results["naive"]["tokens_per_second"], 3),
            "hf_over_naive_peak_memory": round(results["hf"]["peak_bytes"] / results["naive"]["peak_bytes"], 3),
        }
        if "vllm" in results:
            report["vllm_over_hf_speed"] = round(results["vllm"]["tokens_per_second"] / results["hf"]["tokens_per_second"], 3)
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
