"""Fixed costs of a real vocabulary in phase one: start-up and the output head's memory.

    python benchmarks/real_vocab_cost.py [--rows 8] [--score_rows 80]

1. `wspo-precompute` on `--rows` rows with tiny weak models that use Qwen2's real 151,646-token
   byte-level BPE (151,936 embedding rows) against the same run with the embedded 2,048-token
   tokenizer: the wall-time ratio (goal <= 1.6: the tokenizer is loaded and fingerprinted once,
   not re-read per scorer and per check).
2. The `hf` scorer's peak RSS scoring `--score_rows` rows with the 152k-vocabulary model, with the
   output head applied in chunks sized by a byte budget (the default) against fixed chunks of
   1,024 rows (the earlier default).
Each measurement runs in its own process. Prints JSON.
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


def qwen2_models(root: Path) -> dict[str, Path]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from workloads import qwen2_tokenizer  # this script's folder is on sys.path when it runs

    tokenizer = qwen2_tokenizer()
    models = {}
    for seed, name in enumerate(("weak_ref", "weak_aligned")):
        torch.manual_seed(seed)
        config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
                             tie_word_embeddings=False)
        Qwen2ForCausalLM(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        models[name] = root / name
    return models


def timed_precompute(models: dict, out: Path, rows: int) -> float:
    cmd = [sys.executable, "-m", "wspo.precompute.cli", "--output_dir", str(out), "--weak_ref", str(models["weak_ref"]),
           "--weak_aligned", str(models["weak_aligned"]), "--max_samples", str(rows), "--max_length", "512",
           "--max_prompt_length", "256"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    return time.perf_counter() - start


def score_child(model_dir: str, rows: int, chunk: str) -> None:
    import torch

    from wspo.logprobs import response_logprobs, right_pad
    from wspo.models import load_causal_lm

    model = load_causal_lm(model_dir, torch.float32, "cpu")
    torch.manual_seed(0)
    sequences = [torch.randint(0, 151000, (200,)).tolist() for _ in range(rows)]
    ids, mask, target = right_pad(sequences, [40] * rows)
    kwargs = {"chunk_rows": 1024} if chunk == "rows1024" else {}
    with torch.inference_mode():
        out = response_logprobs(model, ids, mask, target, **kwargs)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "positions": out.numel()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--score_rows", type=int, default=80)
    parser.add_argument("--_score", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._score:
        return score_child(args._score[0], int(args._score[1]), args._score[2])

    from wspo.embedded.models import build_weak_pair

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        real = qwen2_models(tmp / "qwen2")
        small = build_weak_pair(tmp / "small")
        # Warm the page cache and imports once, then time each twice and keep the faster.
        timed_precompute(small, tmp / "warm", args.rows)
        t_small = min(timed_precompute(small, tmp / f"s{k}", args.rows) for k in range(2))
        t_real = min(timed_precompute(real, tmp / f"r{k}", args.rows) for k in range(2))
        scoring = {}
        for chunk in ("budget", "rows1024"):
            out = subprocess.run([sys.executable, __file__, "--_score", str(real["weak_ref"]), str(args.score_rows), chunk],
                                 check=True, capture_output=True, text=True)
            scoring[chunk] = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({
        "precompute_rows": args.rows,
        "seconds_vocab_2048": round(t_small, 2),
        "seconds_vocab_151936": round(t_real, 2),
        "time_ratio_real_vs_small_vocab": round(t_real / t_small, 2),
        "score_rows": args.score_rows,
        "peak_rss_mib_head_chunks_by_bytes": round(scoring["budget"]["peak_rss_mib"], 1),
        "peak_rss_mib_head_chunks_of_1024_rows": round(scoring["rows1024"]["peak_rss_mib"], 1),
    }, indent=2))


if __name__ == "__main__":
    main()
