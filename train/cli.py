"""`wspo-train [CONFIG.yaml] [--key value ...]`: phase two (see README, DESIGN sections 1 and 6)."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import warnings

from transformers import TrainingArguments

from wspo.args import parse_config
from wspo.disk import error_text
from wspo.errors import ConfigError, WspoError
from wspo.paths import check_output

from .config import WSPOArguments


def check_report_to(report_to) -> None:
    """`--report_to tensorboard` needs the tensorboard package (transformers would fail deep inside
    the Trainer); say what to install before any work starts."""
    wanted = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "tensorboard" in wanted and importlib.util.find_spec("tensorboard") is None \
            and importlib.util.find_spec("tensorboardX") is None:
        raise ConfigError("--report_to tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or pip install 'wspo[test]'), or pass --report_to none")


def closing_summary(record: dict) -> str:
    """What a finished run prints: data, losses, where it resumed from, where the model is.

    A run shorter than `logging_steps` logs no training step: it says so instead of printing a
    `loss at step 0: nan`.
    """
    data, final = record["data"], record["metrics"]["final"]
    last = record["metrics"]["last_logged_train_step"]
    lines = [f"trained on {data['train_rows']} rows ({data['train_response_tokens']} response tokens), "
             f"{data['eval_rows']} held out"]
    if record.get("resumed_from"):
        lines.append(f"resumed from {record['resumed_from']}")
    mean = final.get("train_loss")
    mean_text = f"mean over the run {mean:.5f}" if isinstance(mean, (int, float)) and math.isfinite(mean) \
        else "no mean loss (no step trained in this run)"
    eval_loss = f", held-out loss {final['eval_loss']:.5f}" if "eval_loss" in final else ""
    if "loss" in last:
        lines.append(f"loss at step {last['step']}: {last['loss']:.5f} ({mean_text}){eval_loss}")
    else:
        lines.append(f"{mean_text}; no step logged (the run is shorter than logging_steps){eval_loss}")
    lines.append(f"{record['model']['saved'].replace('_', ' ')} saved to {record['output_dir']} (see wspo_run.json)")
    return "\n".join(lines)


def check_training_args(args: WSPOArguments, training_args: TrainingArguments) -> None:
    """What is checked after parsing and before any work (wspo-train and wspo.train)."""
    if not (math.isfinite(training_args.learning_rate) and training_args.learning_rate > 0):
        raise ConfigError(f"learning_rate must be finite and positive, got {training_args.learning_rate}")
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise ConfigError(f"max_steps must be a positive number of optimizer steps, or -1 to train for "
                          f"num_train_epochs, got {training_args.max_steps}")
    check_report_to(training_args.report_to)
    check_output(training_args.output_dir, {"model_name_or_path": args.model_name_or_path, "shards": args.shards,
                                            "reference_shards": args.reference_shards})


def main(argv: list[str] | None = None) -> int:
    # DeepSpeed on recent torch warns on every collective call; once per run says enough.
    warnings.filterwarnings("once", category=FutureWarning, module="torch.distributed")
    output_dir = None
    try:
        args, training_args = parse_config(
            [WSPOArguments, TrainingArguments], argv,
            description="Train from wspo-precompute shards (WSPO, SFT, DPO or WRPO; LoRA or full; DeepSpeed).",
        )
        output_dir = training_args.output_dir
        check_training_args(args, training_args)
        from .pipeline import run  # after parsing, so `--help` and argument errors stay fast

        record = run(args, training_args)
    except Exception as e:  # noqa: BLE001 - user-facing errors (WspoError) and disk faults are named; the rest is re-raised
        then = ("rerun the same command (with --resume_from_checkpoint true to go on from the newest complete checkpoint, "
                "which are kept; an interrupted one is skipped). No final model was published")
        print(f"wspo-train: error: {error_text(e, (WspoError,), output_dir, then)}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # one summary per run, from the first process
    print(closing_summary(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
