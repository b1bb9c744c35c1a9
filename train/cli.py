"""`wspo-train [CONFIG.yaml] [--key value ...]`: phase two (see README, DESIGN sections 1 and 6)."""

from __future__ import annotations

import math
import os
import sys
import warnings

from transformers import TrainingArguments

from wspo.args import parse_config
from wspo.paths import check_output
from wspo.shards.store import ShardError

from .config import WSPOArguments
from .data import DataError


def main(argv: list[str] | None = None) -> int:
    # DeepSpeed on recent torch warns on every collective call; once per run says enough.
    warnings.filterwarnings("once", category=FutureWarning, module="torch.distributed")
    try:
        args, training_args = parse_config(
            [WSPOArguments, TrainingArguments], argv,
            description="Train from wspo-precompute shards (WSPO, SFT, DPO or WRPO; LoRA or full; DeepSpeed).",
        )
        if not (math.isfinite(training_args.learning_rate) and training_args.learning_rate > 0):
            raise ValueError(f"learning_rate must be finite and positive, got {training_args.learning_rate}")
        check_output(training_args.output_dir, {"model_name_or_path": args.model_name_or_path, "shards": args.shards,
                                                "reference_shards": args.reference_shards})
        from .pipeline import run  # after parsing, so `--help` and argument errors stay fast

        record = run(args, training_args)
    except (DataError, ShardError, FileNotFoundError, ValueError) as e:
        print(f"wspo-train: error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # one summary per run, from the first process
    data, final = record["data"], record["metrics"]["final"]
    last = record["metrics"]["last_logged_train_step"]
    eval_loss = f", held-out loss {final['eval_loss']:.5f}" if "eval_loss" in final else ""
    print(
        f"trained on {data['train_rows']} rows ({data['train_response_tokens']} response tokens), "
        f"{data['eval_rows']} held out\n"
        f"loss at step {last.get('step', 0)}: {last.get('loss', float('nan')):.5f} "
        f"(mean over the run {final.get('train_loss', float('nan')):.5f}){eval_loss}\n"
        f"{record['model']['saved'].replace('_', ' ')} saved to {record['output_dir']} (see wspo_run.json)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
