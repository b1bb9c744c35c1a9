"""`wspo-precompute [CONFIG.yaml] [--key value ...]`: phase one (see README, DESIGN section 4)."""

from __future__ import annotations

import json
import sys

from wspo.args import parse_config
from wspo.errors import WspoError
from wspo.paths import check_output

from .config import PrecomputeArguments
from .launch import run_ray
from .pipeline import run


def main(argv: list[str] | None = None) -> int:
    try:
        (args,) = parse_config(
            [PrecomputeArguments], argv,
            description="Score dataset responses under the weak models and write Parquet reward shards.",
        )
        check_output(args.output_dir, {"dataset": args.dataset, "tokenizer": args.tokenizer, **args.scorer_paths()})
        manifest = run_ray(args) if args.launcher == "ray" else run(args)
    except WspoError as e:  # the one base of every user-facing failure (wspo/errors.py)
        print(f"wspo-precompute: error: {e}", file=sys.stderr)
        return 1
    counts, timing = manifest["counts"], manifest["timing"]
    print(
        f"wrote {counts['rows_written']} rows ({counts['response_tokens']} response tokens) in "
        f"{len(manifest['files'])} file(s) to {args.output_dir}\n"
        f"skipped: {json.dumps(counts['skipped']) if counts['skipped'] else 'none'}; "
        f"truncated: {counts['truncated']}\n"
        f"time: {timing['seconds']:.1f} s, {timing['tokens_per_second']:.0f} tokens/s scored"
    )
    if manifest.get("reward"):
        r = manifest["reward"]
        print(f"reward per token: mean {r['token_mean']:+.4f} std {r['token_std']:.4f}; "
              f"per response: mean {r['sum_mean']:+.3f}, {100 * r['positive_sum_fraction']:.1f}% positive")
    return 0


if __name__ == "__main__":
    sys.exit(main())
