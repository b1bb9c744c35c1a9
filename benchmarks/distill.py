"""Offline distillation costs (docs/distill.md), one run, printed as JSON.

    python benchmarks/distill.py [--rows 64] [--vocab 151936] [--logit_scale 8] [--steps 6]

Teacher: a random Qwen2 model with a real vocabulary size (151,936 embeddings, Qwen2's) whose
final norm is scaled by `logit_scale`, so its predictions are peaked as a trained model's are
(the figures report the resulting top-1 probability and top-1 - top-K log-prob range, to judge
how realistic the distribution is); the rows are the bundled sample's, tokenized by the tiny
tokenizer (ids < 2048, which the big vocabulary contains).

Phase one (`wspo-precompute --teacher --topk K`, hf backend, float32): for K = 16, 64, 128 and
both encodings, the top-k columns' compressed bytes per response token (from the Parquet
footers), the largest |compact - fp32| log-prob, and seconds per sequence token with top-k on
vs off (same model, same rows, one run each). Phase two: seconds per optimizer step of
`wspo-train --loss kd` vs `--loss sft` on the K = 128 compact set (student: the same
architecture, another seed), both from the same shards in one process.

DistillKit's published figure (README, "recommended configuration": k 128, exact_k 16 in
bfloat16, a 6-term polynomial for the rest, ids bit-packed) is about 300 bytes per token.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def build_models(root: Path, vocab: int, logit_scale: float) -> dict[str, Path]:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from wspo.embedded.models import build_weak_pair

    pair = build_weak_pair(root / "tiny")
    config = Qwen2Config(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    paths = {"tokenizer": pair["tokenizer"]}
    for name, seed, scale in (("teacher", 0, logit_scale), ("student", 1, 1.0)):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        with torch.no_grad():
            model.model.norm.weight.mul_(scale)
        model.save_pretrained(root / name)
        AutoTokenizer.from_pretrained(str(pair["tokenizer"])).save_pretrained(str(root / name))
        paths[name] = root / name
    return paths


def precompute(paths: dict, out: Path, rows: int, topk: int, encoding: str) -> tuple[dict, float]:
    from wspo.precompute.config import PrecomputeArguments
    from wspo.precompute.pipeline import run

    args = PrecomputeArguments(output_dir=str(out), teacher=str(paths["teacher"]),
                               topk=topk, topk_encoding=encoding, max_samples=rows, max_length=512, max_prompt_length=384,
                               rows_per_file=rows, dtype="float32", batch_tokens=4096)
    start = time.perf_counter()
    manifest = run(args)
    return manifest, time.perf_counter() - start


def by_position(root: Path, k: int, encoding: str):
    from wspo.shards.store import ShardSet
    from wspo.shards.topk import decode_topk, ids_column, logps_column

    table = ShardSet.open(root).read_table(columns=[ids_column("teacher"), logps_column("teacher")])
    ids, logps = [], []
    for a, b in zip(table[0].to_pylist(), table[1].to_pylist()):
        i, v = decode_topk(a, b, k, encoding)
        order = np.argsort(i, axis=1)  # one order for both encodings
        ids.append(np.take_along_axis(i, order, 1))
        logps.append(np.take_along_axis(v, order, 1))
    return np.concatenate(ids), np.concatenate(logps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--logit_scale", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=6, help="phase two steps per run (0: phase one only)")
    cli = parser.parse_args()
    from wspo.shards.store import ShardSet
    from wspo.shards.topk import column_bytes, ids_column, logps_column

    result = {"load_average": os.getloadavg(), "rows": cli.rows, "vocab": cli.vocab, "logit_scale": cli.logit_scale}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build_models(root / "models", cli.vocab, cli.logit_scale)
        manifest, off_seconds = precompute(paths, root / "off", cli.rows, 0, "compact")
        sequence_tokens = manifest["timing"]["sequence_tokens"]
        result["phase_one"] = {"response_tokens": manifest["counts"]["response_tokens"],
                               "seconds_per_sequence_token_topk_off": off_seconds / sequence_tokens, "k": {}}
        for k in (16, 64, 128):
            entry = {}
            for encoding in ("fp32", "compact"):
                out = root / f"k{k}-{encoding}"
                manifest, seconds = precompute(paths, out, cli.rows, k, encoding)
                shards = ShardSet.open(out)
                files = [out / f["path"] for f in shards.files]
                tokens = shards.num_tokens
                entry[encoding] = {
                    "topk_bytes_per_token": round(column_bytes(files, [ids_column("teacher"), logps_column("teacher")]) / tokens, 1),
                    "file_bytes_per_token": round(sum(f["bytes"] for f in shards.files) / tokens, 1),
                    "seconds_per_sequence_token": seconds / sequence_tokens,
                    "seconds_ratio_to_topk_off": round(seconds / off_seconds, 3),
                }
            exact_ids, exact = by_position(root / f"k{k}-fp32", k, "fp32")
            compact_ids, compact = by_position(root / f"k{k}-compact", k, "compact")
            assert (exact_ids == compact_ids).all()
            entry["compact_max_abs_logp_error"] = float(np.abs(exact - compact).max())
            entry["teacher_top1_prob_mean"] = float(np.exp(exact.max(1)).mean())
            entry["teacher_topk_range_nats_mean"] = float((exact.max(1) - exact.min(1)).mean())
            entry["teacher_topk_mass_mean"] = float(np.exp(exact).sum(1).mean())
            result["phase_one"]["k"][k] = entry
        result["phase_one"]["distillkit_recommended_k128_bytes_per_token"] = 300

        if not cli.steps:  # phase one only
            print(json.dumps(result, indent=2))
            return
        from wspo.train.cli import main as train_main

        step_seconds = {}
        for loss in ("sft", "kd", "sft", "kd"):  # interleaved, twice: the machine's load drifts
            out = root / f"train-{loss}-{len(step_seconds.get(loss, []))}"
            argv = ["--shards", str(root / "k128-compact"), "--model_name_or_path", str(paths["student"]), "--loss", loss,
                    "--output_dir", str(out), "--max_length", "512", "--eval_fraction", "0", "--per_device_train_batch_size", "8",
                    "--max_steps", str(cli.steps), "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
                    "--use_cpu", "true", "--disable_tqdm", "true"]
            assert train_main(argv) == 0
            record = json.loads((out / "wspo_run.json").read_text())
            step_seconds.setdefault(loss, []).append(record["metrics"]["final"]["train_runtime"] / cli.steps)
        result["phase_two"] = {"seconds_per_step": {k: min(v) for k, v in step_seconds.items()},
                               "kd_over_sft": round(min(step_seconds["kd"]) / min(step_seconds["sft"]), 3),
                               "k": 128, "encoding": "compact", "batch_size": 8}
    result["load_average_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
