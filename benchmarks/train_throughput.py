"""Training throughput of padded, length-grouped and packed batches: prints one JSON object.

    python benchmarks/train_throughput.py                    # 512 sequences, batches of 8, CPU
    python benchmarks/train_throughput.py --sequences 256 --batch_size 8 --max_length 2048

A set with UltraFeedback's spread of lengths: response tokens log-normal with median 300 and
sigma 0.8 (99th percentile ~1,900), prompts log-normal with median 80, prompt + response cut to
`max_length` (random token ids; the cost does not depend on them). A tiny Qwen2 model (the
embedded "strong" size) runs forward + backward of the SFT loss (`response_logprobs`, as
wspo-train does) over every batch of the set three ways:

    padded   random order, each batch right-padded to its longest sequence
    grouped  length-grouped order (transformers' LengthGroupedSampler, as
             --train_sampling_strategy group_by_length), padded
    packed   random order, each batch packed (--packing true: rows of first-fit decreasing,
             as long as the batch's longest sequence)

Reported per way: response tokens per second, the share of padding among the tokens the model
ran on, and seconds; and packed / padded speed. Goal (issue 10): packed >= 1.5x padded on CPU.
The three ways run interleaved, batch by batch, so load from
other processes slows them alike. A warm-up batch runs first. The per-sequence log-probs of the packed and padded layouts of one
batch are compared as a check (max |difference|).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.trainer_pt_utils import LengthGroupedSampler

from wspo.logprobs import response_logprobs, right_pad
from wspo.train.packing import pack_sequences

STRONG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
VOCAB = 2048


def ultrafeedback_like(n: int, max_length: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """`n` sequences (token ids) and their prompt lengths."""
    rng = np.random.default_rng(seed)
    responses = np.maximum(1, rng.lognormal(np.log(300), 0.8, n).astype(int))
    prompts = np.maximum(1, rng.lognormal(np.log(80), 0.6, n).astype(int))
    prompts = np.minimum(prompts, max_length // 2)
    responses = np.minimum(responses, max_length - prompts)
    sequences = [rng.integers(3, VOCAB, p + r).tolist() for p, r in zip(prompts, responses)]
    return sequences, prompts.tolist()


def batch_inputs(sequences, prompts, order, packed: bool, max_length: int):
    seqs, lens = [sequences[i] for i in order], [prompts[i] for i in order]
    if packed:
        ids, positions, target, _ = pack_sequences(seqs, lens, max_length)
        return ids, None, target, positions
    ids, mask, target = right_pad(seqs, lens)
    return ids, mask, target, None


def step(model, sequences, prompts, order, packed, max_length) -> tuple[float, int]:
    """(seconds, tokens run) of forward + backward of the SFT loss over one batch."""
    ids, mask, target, positions = batch_inputs(sequences, prompts, order, packed, max_length)
    start = time.perf_counter()
    logps = response_logprobs(model, ids, mask, target, position_ids=positions)
    (-logps.mean()).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, ids.numel()


def run_ways(model, sequences, prompts, ways: dict, max_length) -> dict:
    """Every way's batches, interleaved (batch k of each way in turn), so that a machine whose
    load changes during the run slows every way alike."""
    totals = {name: [0.0, 0] for name in ways}
    for k in range(max(len(batches) for batches, _ in ways.values())):
        for name, (batches, packed) in ways.items():
            if k < len(batches):
                seconds, ran = step(model, sequences, prompts, batches[k], packed, max_length)
                totals[name][0] += seconds
                totals[name][1] += ran
    results = {}
    for name, (batches, _) in ways.items():
        seconds, ran = totals[name]
        real = sum(len(sequences[i]) for b in batches for i in b)
        response = sum(len(sequences[i]) - prompts[i] for b in batches for i in b)
        results[name] = {"response_tokens_per_second": round(response / seconds, 1), "padding_share": round(1 - real / ran, 4),
                         "seconds": round(seconds, 2), "tokens_run": ran}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = Qwen2Config(vocab_size=VOCAB, max_position_embeddings=args.max_length, attn_implementation="sdpa", **STRONG)
    model = Qwen2ForCausalLM(config).train()
    sequences, prompts = ultrafeedback_like(args.sequences, args.max_length, args.seed)
    lengths = [len(s) for s in sequences]
    generator = torch.Generator().manual_seed(args.seed)
    random_order = torch.randperm(len(sequences), generator=generator).tolist()
    grouped_order = list(LengthGroupedSampler(args.batch_size, lengths=lengths, generator=generator))
    split = lambda order: [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]  # noqa: E731

    # Check: the two layouts of one batch give the same log-probs.
    with torch.no_grad():
        first = split(random_order)[0]
        padded = response_logprobs(model, *batch_inputs(sequences, prompts, first, False, args.max_length)[:3])
        ids, _, target, positions = batch_inputs(sequences, prompts, first, True, args.max_length)
        packed = response_logprobs(model, ids, None, target, position_ids=positions)
        # packed comes in the packing's order of sequences; put it back in batch order
        seqs = [sequences[i] for i in first]
        n = [len(s) - prompts[i] for s, i in zip(seqs, first)]
        order = pack_sequences(seqs, [prompts[i] for i in first], args.max_length)[3]
        pieces = dict(zip(order, torch.split(packed, [n[j] for j in order])))
        packed = torch.cat([pieces[j] for j in range(len(first))])
    step(model, sequences, prompts, split(random_order)[0], True, args.max_length)  # warm-up

    ways = run_ways(model, sequences, prompts, {
        "padded": (split(random_order), False),
        "grouped": (split(grouped_order), False),
        "packed": (split(random_order), True),
    }, args.max_length)
    speed = {k: v["response_tokens_per_second"] for k, v in ways.items()}
    print(json.dumps({
        "benchmark": "train_throughput",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "sequences": args.sequences,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "lengths": {"median": float(np.median(lengths)), "p99": float(np.quantile(lengths, 0.99)), "max": max(lengths),
                    "response_tokens": int(sum(len(s) - p for s, p in zip(sequences, prompts)))},
        "ways": ways,
        "packed_over_padded": round(speed["packed"] / speed["padded"], 3),
        "grouped_over_padded": round(speed["grouped"] / speed["padded"], 3),
        "packed_vs_padded_logp_max_abs_diff": float((packed - padded).abs().max()),
        "goal": "packed_over_padded >= 1.5",
        "goal_met": speed["packed"] / speed["padded"] >= 1.5,
    }, indent=2))


if __name__ == "__main__":
    main()
