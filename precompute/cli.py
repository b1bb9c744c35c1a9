"""`wspo-precompute [CONFIG.yaml] [--key value ...]`: phase one (see README, DESIGN section 4)."""

from __future__ import annotations

import json
import sys
import warnings

from wspo.api import library_bars
from wspo.args import parse_config
from wspo.disk import error_text
from wspo.errors import WspoError
from wspo.paths import check_output
from wspo.shards.storage import is_url

from .config import PrecomputeArguments
from .launch import run_ray
from .pipeline import IdenticalScorersWarning, run


def _one_line(show):
    """The toolkit's own warnings as one line, like its errors; others as `show` prints them."""
    def show_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, IdenticalScorersWarning):
            print(f"wspo-precompute: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    return show_warning


def main(argv: list[str] | None = None) -> int:
    output_dir = None
    try:
        (args,) = parse_config(
            [PrecomputeArguments], argv,
            description="Score dataset responses under the weak models and write Parquet reward shards.",
        )
        output_dir = args.output_dir
        if not is_url(args.output_dir):  # an object-store URL cannot be, hold or lie inside a local input
            check_output(args.output_dir, {"dataset": args.dataset, "tokenizer": args.tokenizer, **args.scorer_paths()})
        with library_bars(args.disable_tqdm), warnings.catch_warnings():
            warnings.showwarning = _one_line(warnings.showwarning)
            manifest = run_ray(args) if args.launcher == "ray" else run(args)
    except Exception as e:  # noqa: BLE001 - user-facing errors (WspoError) and disk faults are named; the rest is re-raised
        then = "rerun the same command: the parts already written are kept and the run resumes from them"
        print(f"wspo-precompute: error: {error_text(e, (WspoError,), output_dir, then)}", file=sys.stderr)
        return 1
    counts, timing = manifest["counts"], manifest["timing"]
    print(
        f"wrote {counts['rows_written']} rows ({counts['response_tokens']} response tokens) in "
        f"{len(manifest['files'])} file(s) to {args.output_dir}\n"
        f"skipped: {json.dumps(counts['skipped']) if counts['skipped'] else 'none'}; "
        f"truncated: {counts['truncated']}\n"
        f"time: {timing['seconds']:.1f} s, {timing['tokens_per_second']:.0f} tokens/s scored"
    )
    lengths = manifest.get("lengths")  # sets written before this record have none
    if lengths:
        print(f"max_length {lengths['max_length']} ({lengths['max_length_from']}); "
              f"max_prompt_length {lengths['max_prompt_length']} ({lengths['max_prompt_length_from']})")
    if manifest.get("reward"):
        r = manifest["reward"]
        print(f"reward per token: mean {r['token_mean']:+.4f} std {r['token_std']:.4f}; "
              f"per response: mean {r['sum_mean']:+.3f}, {100 * r['positive_sum_fraction']:.1f}% positive")
    return 0


if __name__ == "__main__":
    sys.exit(main())
