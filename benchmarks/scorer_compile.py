"""The hf scorer eager vs torch.compile'd, on the same model and rows in one process. JSON.

    python benchmarks/scorer_compile.py [--quick] [--preset quick] [--rows 24] [--dtypes float32 bfloat16] [--device cpu]

One random-weight Qwen2 scorer of a preset shape (benchmarks/limits.py) with Qwen2's real
tokenizer scores the chosen responses of `--rows` UltraFeedback-like rows (benchmarks/workloads.py)
with `wspo.precompute.scorers.HFScorer`. Per dtype, one process: open the scorer with
`compile=True` (timed: the compile and its warm-up), then score every row `--repeats` times with
the compiled decoder and with the eager one (the compiled forward taken off the instance and put
back), alternating, so both see the same load. Reports the best seconds of each, the speed-up,
the compile's seconds and the max |difference| of the log-probs (float32: rounding only).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads  # noqa: E402  (benchmarks/, on sys.path from here on)


def child(spec: dict) -> None:
    import numpy as np
    import torch

    from limits import machine
    from wspo.logprobs import _FUSED_NORMALISERS
    from wspo.models import load_tokenizer, uncompile_decoder
    from wspo.precompute.scorers import HFScorer
    from wspo.shards.tokenization import ResponseTokenizer

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    rule = ResponseTokenizer(load_tokenizer(spec["model"]), spec["max_length"], spec["max_length"] // 4)
    sequences, prompt_lengths = [], []
    for line in Path(spec["rows"]).read_text().splitlines():
        row = json.loads(line)
        tok = rule(row["chosen"][:-1], row["chosen"][-1]["content"])
        sequences.append(tok.prompt_ids + tok.token_ids)
        prompt_lengths.append(len(tok.prompt_ids))
    scorer = HFScorer(spec["model"], dtype=spec["dtype"], device=spec["device"], compile=True)
    decoder, head = scorer.model.get_decoder(), scorer.model.get_output_embeddings()
    compiled_forward = decoder.forward  # the instance attribute HFScorer set
    fused_normaliser = _FUSED_NORMALISERS.get(head)  # the head's compiled log-sum-exp
    now = workloads.clock(spec["device"])
    best = {"eager": float("inf"), "compiled": float("inf")}
    logps = {}
    for _ in range(spec["repeats"]):
        for mode in ("eager", "compiled"):
            if mode == "eager":
                uncompile_decoder(scorer.model)  # the class's forward, the eager log-sum-exp
            else:
                decoder.forward, _FUSED_NORMALISERS[head] = compiled_forward, fused_normaliser
            start = now()
            logps[mode] = np.concatenate(scorer.score(sequences, prompt_lengths))
            best[mode] = min(best[mode], now() - start)
    print(workloads.RESULT_PREFIX + json.dumps({
        "dtype": spec["dtype"], "compiled": scorer.compiled, "compile_seconds": round(scorer.compile_seconds, 2),
        "batch_tokens": scorer.batch_tokens, "sequences": len(sequences), "sequence_tokens": sum(map(len, sequences)),
        "seconds_best": {k: round(v, 3) for k, v in best.items()},
        "eager_over_compiled": round(best["eager"] / best["compiled"], 3),
        "max_abs_diff": float(np.abs(logps["eager"] - logps["compiled"]).max()),
        "machine": machine(),
    }))


def main() -> None:
    parser = workloads.benchmark_parser(__doc__, "8 rows, float32 only")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=2048)
    args = parser.parse_args()
    if workloads.ran_as_child(args, child):
        return
    if args.quick:
        args.rows, args.dtypes = 8, ["float32"]

    from limits import machine

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        tokenizer = workloads.qwen2_tokenizer()
        lengths = workloads.write_rows(tmp / "rows.jsonl", tokenizer, args.rows)
        model = workloads.save_models(tmp, args.preset, ["weak_ref"], tokenizer)["weak_ref"]
        runs = [workloads.run_child(__file__, {"model": str(model), "rows": str(tmp / "rows.jsonl"), "dtype": dtype,
                                               "device": args.device, "threads": args.threads, "repeats": args.repeats,
                                               "max_length": args.max_length}, f"child {dtype}")
                for dtype in args.dtypes]
    print(json.dumps({"benchmark": "scorer_compile", "preset": args.preset, "rows": args.rows, "lengths": lengths,
                      "machine": machine(), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
