"""The output head without gradients: one reused logits buffer vs a fresh tensor per chunk. JSON.

    python benchmarks/head_buffer.py [--rows 1024] [--hidden 512] [--dtype float32] [--device cpu]

Both paths of `wspo.logprobs` on the same random head (Qwen2's 151,936-row vocabulary) and
states, interleaved `--repeats` times in one process: `_head_logprobs_autograd` (what every call
did before: F.linear, .float(), logsumexp, a new [chunk, vocab] tensor per chunk and per
temporary) and `_head_logprobs_inplace` (torch.mm into one buffer kept per head, the
log-sum-exp in place in float32). Reports the best seconds of each, minor page faults, and the
max |difference| (0 expected: the same operations in the same order).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    from limits import machine
    from wspo.logprobs import HEAD_CHUNK_BYTES, _head_logprobs_autograd, _head_logprobs_inplace

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(args.vocab, args.hidden, generator=gen) * 0.05)
    head = head.to(device=args.device, dtype=dtype)
    states = torch.randn(args.rows, args.hidden, generator=gen).to(device=args.device, dtype=dtype)
    targets = torch.randint(0, args.vocab, (args.rows,), generator=gen).to(args.device)
    chunk = max(1, HEAD_CHUNK_BYTES // (4 * args.vocab))
    config = SimpleNamespace(final_logit_softcapping=None)
    paths = {"fresh_per_chunk": _head_logprobs_autograd, "one_buffer": _head_logprobs_inplace}
    best = {name: float("inf") for name in paths}
    faults = {name: 0 for name in paths}
    out = {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, fn in paths.items():
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                out[name] = fn(head, states, targets, chunk, config)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                best[name] = min(best[name], time.perf_counter() - start)
                faults[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before  # the last repeat's
    print(json.dumps({
        "benchmark": "head_buffer", "rows": args.rows, "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype,
        "chunk_rows": chunk, "seconds_best": {k: round(v, 3) for k, v in best.items()},
        "speedup": round(best["fresh_per_chunk"] / best["one_buffer"], 3),
        "minor_faults_last_repeat": faults,
        "max_abs_diff": float((out["one_buffer"] - out["fresh_per_chunk"]).abs().max()),
        "machine": machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
