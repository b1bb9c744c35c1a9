"""`wspo-eval rewards|generate [CONFIG.yaml] [--key value ...]` (see README, "Evaluation")."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from wspo.args import parse_config
from wspo.errors import WspoError
from wspo.paths import check_output
from wspo.disk import error_text
from wspo.shards.store import write_text

from .config import GenerateArguments, RewardsArguments

USAGE = """usage: wspo-eval {rewards,generate} [CONFIG.yaml] [--key value ...]

  rewards   implicit-reward accuracy and margins of a (policy, reference) pair on preference pairs
            (a dataset split or a shard set with chosen and rejected rows); JSON summary on stdout
  generate  completions for a prompt set (a dataset split or a JSON list of instructions) with
            transformers or vLLM, written in AlpacaEval's JSON layout; JSON summary on stdout

`wspo-eval rewards --help` and `wspo-eval generate --help` list every key."""

TASKS = {
    "rewards": (RewardsArguments, "wspo-eval rewards: implicit-reward accuracy and margins of a (policy, reference) pair."),
    "generate": (GenerateArguments, "wspo-eval generate: completions for a prompt set in AlpacaEval's JSON layout."),
}


def _write_json(obj, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", out)  # whole or not at all


def run_rewards(args: RewardsArguments) -> dict:
    """Check the output paths, score the pairs, write output_file / pairs_file when set; returns
    the summary (wspo-eval rewards and wspo.evaluate_rewards)."""
    _check_outputs(args)
    from .rewards import run

    summary, pairs = run(args)
    if args.pairs_file:
        Path(args.pairs_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.pairs_file).write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    if args.output_file:
        _write_json(summary, args.output_file)
    return summary


def _check_outputs(args) -> None:
    inputs = {k: getattr(args, k, None) for k in ("policy", "reference", "model", "dataset", "shards", "instructions", "tokenizer")}
    for key in ("output_file", "pairs_file"):
        if getattr(args, key, None):
            check_output(getattr(args, key), inputs, option=key, is_file=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        print(f"{USAGE}\nwspo-eval: error: unknown task {task!r}; choose rewards or generate", file=sys.stderr)
        return 2
    dataclass_type, description = TASKS[task]
    program, sys.argv[0] = sys.argv[0], f"wspo-eval {task}"  # argparse's prog: usage and errors name the task
    args = None
    try:
        (args,) = parse_config([dataclass_type], rest, description=description)
        if task == "rewards":
            summary = run_rewards(args)
        else:
            _check_outputs(args)
            from .generate import run

            summary, _ = run(args)
    except Exception as e:  # noqa: BLE001 - user-facing errors (WspoError) and disk faults are named; the rest is re-raised
        then = "rerun the same command: no output file was left half-written"
        where = getattr(args, "output_file", None) or "the output file"
        print(f"wspo-eval {task}: error: {error_text(e, (WspoError,), where, then)}", file=sys.stderr)
        return 1
    finally:
        sys.argv[0] = program
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
