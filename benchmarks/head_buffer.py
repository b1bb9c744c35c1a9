"""The output head's paths in wspo.logprobs, on one random head and the same states. JSON.

    python benchmarks/head_buffer.py [--rows 1024] [--hidden 512] [--dtype float32] [--device cpu] [--compile] [--train]

Without gradients (the default): `_head_logprobs_autograd` (F.linear, .float(), logsumexp: a new
[chunk, vocab] tensor per chunk and per temporary) against `_head_logprobs_inplace` (torch.mm into
one buffer kept per head, the log-sum-exp in place in float32); `--compile` adds the in-place path
with the log-sum-exp compiled into one fused reduction (what `--compile` scorers use). Reports each
path's best seconds, the head matmul's own seconds (the floor), minor page faults and the max
|difference| from the first path.

`--train`: forward and backward (a random weighting of the log-probs as the loss) through
`_head_logprobs_autograd` (autograd keeps every chunk's float32 logits) against
`_RecomputedHeadLogprobs` (keeps each position's log-sum-exp, recomputes the chunk's logits in the
backward). Reports best seconds, the bytes each keeps for its backward, page faults, and the max
|difference| of the log-probs and of the gradients.

Paths alternate `--repeats` times in one process, so they see the same load. Qwen2's 151,936-row
vocabulary by default.
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
    parser.add_argument("--compile", action="store_true", help="no-grad: add the compiled log-sum-exp path")
    parser.add_argument("--train", action="store_true", help="forward + backward: autograd vs recompute")
    parser.add_argument("--frozen_head", action="store_true", help="--train: no gradient for the head (LoRA)")
    args = parser.parse_args()

    import torch

    from limits import machine
    from wspo.logprobs import (HEAD_CHUNK_BYTES, _RecomputedHeadLogprobs, _head_logprobs_autograd, _head_logprobs_inplace,
                               fuse_head_normaliser, unfuse_head_normaliser)

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(args.vocab, args.hidden, generator=gen) * 0.05)
    head = head.to(device=args.device, dtype=dtype).requires_grad_(not args.frozen_head)
    states = torch.randn(args.rows, args.hidden, generator=gen).to(device=args.device, dtype=dtype)
    targets = torch.randint(0, args.vocab, (args.rows,), generator=gen).to(args.device)
    loss_weights = torch.randn(args.rows, generator=gen).to(args.device)
    chunk = max(1, HEAD_CHUNK_BYTES // (4 * args.vocab))
    config = SimpleNamespace(final_logit_softcapping=None)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def no_grad_path(head_logprobs, fused: bool = False):
        def run():
            if fused:
                fuse_head_normaliser(head)
            try:
                with torch.inference_mode():
                    return head_logprobs(head, states, targets, chunk, config), None
            finally:
                unfuse_head_normaliser(head)
        return run

    def train_path(recompute: bool):
        def run():
            x = states.detach().requires_grad_()
            head.zero_grad(set_to_none=True)
            saved = {}  # storage -> bytes: the weight, saved once per chunk, counts once

            def pack(t):
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                if recompute:
                    logps = _RecomputedHeadLogprobs.apply(x, head.weight, head.bias, targets, chunk)
                else:
                    logps = _head_logprobs_autograd(head, x, targets, chunk, config)
            (logps * loss_weights).sum().backward()
            return logps.detach(), (x.grad, head.weight.grad, sum(saved.values()))
        return run

    logits = torch.empty(min(chunk, args.rows), args.vocab, dtype=dtype, device=args.device)

    def matmul_only():
        with torch.inference_mode():
            for start in range(0, args.rows, chunk):
                x = states[start : start + chunk]
                torch.mm(x, head.weight.t(), out=logits[: x.shape[0]])
        return None, None

    if args.train:
        paths = {"autograd_keeps_logits": train_path(False), "recompute_in_backward": train_path(True)}
    else:
        paths = {"fresh_per_chunk": no_grad_path(_head_logprobs_autograd), "one_buffer": no_grad_path(_head_logprobs_inplace)}
        if args.compile:
            paths["one_buffer_fused_compiled"] = no_grad_path(_head_logprobs_inplace, fused=True)
            paths["one_buffer_fused_compiled"]()  # the compile, outside the timing
        paths["head_matmul_only"] = matmul_only
    best = {name: float("inf") for name in paths}
    faults = {name: 0 for name in paths}
    out = {}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            out[name] = fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
            faults[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before  # the last repeat's
    first = next(iter(paths))
    result = {
        "benchmark": "head_buffer", "mode": "train" if args.train else "no_grad", "rows": args.rows,
        "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype, "chunk_rows": chunk,
        "seconds_best": {k: round(v, 3) for k, v in best.items()},
        "minor_faults_last_repeat": faults,
        "max_abs_diff_logprobs": {k: float((v[0] - out[first][0]).abs().max()) for k, v in out.items()
                                  if k != first and v[0] is not None},
    }
    if args.train:
        (_, (gx_a, gw_a, saved_a)), (_, (gx_r, gw_r, saved_r)) = out.values()
        result["speedup"] = round(best["autograd_keeps_logits"] / best["recompute_in_backward"], 3)
        result["saved_for_backward_mib"] = {"autograd_keeps_logits": round(saved_a / 2**20, 3),
                                            "recompute_in_backward": round(saved_r / 2**20, 3)}
        result["frozen_head"] = args.frozen_head
        result["max_abs_diff_grad"] = {"states": float((gx_a - gx_r).abs().max()),
                                       "weight": None if args.frozen_head else float((gw_a - gw_r).abs().max())}
    else:
        result["speedup"] = round(best["fresh_per_chunk"] / best["one_buffer"], 3)
        result["over_matmul"] = {k: round(v / best["head_matmul_only"], 3) for k, v in best.items()
                                 if k != "head_matmul_only"}
    result["machine"] = machine()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
