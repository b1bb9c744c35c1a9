"""Phase two: shards + strong model -> trained model (DESIGN sections 1, 6, 7).

    run(args, training_args)
      1. open and verify the shard sets; check they hold what the loss needs (shard_sets.py);
      2. load the strong tokenizer, check it is the shards' tokenizer, re-tokenize the chosen rows
         and split off the held-out examples (shard_sets.py, rows.py / pairs.py);
      3. load the policy (LoRA adapters on the strong model, or the whole model) and, for full
         fine-tuning with WSPO, a frozen reference copy (none when the reference log-probs come
         from the shards: `reference_logps shards`);
      4. train with WSPOTrainer (trainer.py), evaluate, save the model, tokenizer and wspo_run.json.

Reads nothing but the shards and the strong model directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections import Counter
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

import wspo
from wspo.shards.schema import logp_column
from wspo.shards.store import write_json
from wspo.logprobs import unwrap_model
from wspo.models import check_weights, freed_memory_kept, from_pretrained, load_tokenizer, read_config, resolve_model_dir
from wspo.sequence_attention import use_per_sequence_attention

from .config import PREFERENCE_LOSSES, WSPOArguments
from .batches import Collator
from .distill import teacher_columns
from .packing import resolve_packing
from .pairs import PREFERENCE_SLOTS, PreferenceCollator, preference_datasets
from .checkpoints import publish_final, resolve_resume
from .guards import NonFiniteGuard
from .identity import (
    IDENTITY_FILE, RUN_FILE, IdentityInCheckpoints, check_resume_identity, guard_finished_model, guard_output_dir,
    hold_output_dir, run_identity,
)
from .rows import row_datasets
from .shard_sets import REFERENCE_SCORER, DataError, describe_shards, open_shard_sets, strong_rule
from .shard_sets import reference_sets as reference_sets_of
from .trainer import WSPOTrainer


def model_dtype(args: WSPOArguments, training_args: TrainingArguments) -> torch.dtype:
    """'auto': LoRA keeps the frozen base in the training precision (bf16/fp16), saving half its
    memory; full fine-tuning loads float32 and lets mixed precision (or DeepSpeed) cast."""
    if args.model_dtype != "auto":
        return getattr(torch, args.model_dtype)
    if args.use_lora and training_args.bf16:
        return torch.bfloat16
    if args.use_lora and training_args.fp16:
        return torch.float16
    return torch.float32


def load_models(args: WSPOArguments, training_args: TrainingArguments, model_dir: Path):
    """(policy, reference): the reference is None with LoRA (adapters off), for SFT, and when
    its log-probs come from the shards.

    Under ZeRO-3 the TrainingArguments (created before this) make `from_pretrained` partition
    the weights while loading, so neither model is ever whole on one rank.
    """
    dtype = model_dtype(args, training_args)
    policy = from_pretrained(model_dir, dtype, args.attn_implementation)
    policy.config.use_cache = False
    if args.use_lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=args.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        policy = get_peft_model(policy, lora)
        if training_args.gradient_checkpointing:
            policy.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        return policy, None
    if args.loss in ("sft", "kd") or args.reference_logps == "shards":
        return policy, None
    reference = from_pretrained(model_dir, dtype, args.attn_implementation)
    reference.config.use_cache = False
    return policy, reference


def _finite_or_null(obj):
    """NaN (e.g. the correlation at step 1, when policy == reference) as null: strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def preference_record(args: WSPOArguments, reference: dict) -> dict:
    """What wspo_run.json records of dpo / wrpo: the slots, the loss's keys and the reference."""
    return {
        "loss": args.loss,
        "slots": list(PREFERENCE_SLOTS[args.loss]),
        "beta": args.beta,
        "wrpo_alpha": args.wrpo_alpha if args.loss == "wrpo" else None,
        "wrpo_alpha_schedule": args.wrpo_alpha_schedule if args.loss == "wrpo" else None,
        "reference": reference,
    }


def _init_deepspeed_comm(training_args: TrainingArguments) -> None:
    """accelerate starts DeepSpeed's communication layer only on accelerators. On CPU
    (`--use_cpu true`, gloo) ZeRO-3's partitioned loading would otherwise see a world of one."""
    if training_args.deepspeed and torch.distributed.is_available() and torch.distributed.is_initialized():
        import deepspeed

        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


def run(args: WSPOArguments, training_args: TrainingArguments, callbacks: list | None = None) -> dict:
    """Train; returns what is written to `output_dir/wspo_run.json`.

    The run's first process holds output_dir's lock throughout (identity.py): a second live
    wspo-train on the same output_dir is refused, naming this one.
    """
    lock = hold_output_dir(Path(training_args.output_dir), training_args.process_index == 0)
    with lock if lock is not None else contextlib.nullcontext():
        return _run(args, training_args, callbacks)


def _run(args: WSPOArguments, training_args: TrainingArguments, callbacks: list | None) -> dict:
    # 1. shards
    shard_sets = open_shard_sets(args.shards, args.loss)
    teacher = teacher_columns(shard_sets, args.kd_scorer) if args.loss == "kd" else None

    # 2. strong tokenizer and examples
    model_dir = resolve_model_dir(args.model_name_or_path, option="model_name_or_path").resolve()
    check_weights(model_dir, option="model_name_or_path")
    tokenizer = load_tokenizer(model_dir)
    max_length = args.max_length or shard_sets[0].tokenizer["max_length"]
    rule, projected = strong_rule(shard_sets, tokenizer, max_length, args.reward_projection, distill=teacher is not None)
    vocab = read_config(model_dir).get("vocab_size")
    if vocab is not None and len(tokenizer) > vocab:
        raise DataError(f"model {model_dir} has {vocab} embeddings but its tokenizer has {len(tokenizer)} tokens")
    # Rows stay in memory-mapped Arrow; each example is re-tokenized and checked when drawn
    # (rows.py; pairs.py for dpo / wrpo). The local main process writes the row cache; the
    # others map it.
    reference_sets = []
    preference = None  # dpo / wrpo: what wspo_run.json records of the pairs and their reference
    cache_dir = Path(args.data_cache_dir or Path(training_args.output_dir) / ".wspo_cache")
    counts = Counter()
    if training_args.process_index == 0:  # before anything of this run is written (the row cache included)
        guard_output_dir(Path(training_args.output_dir), args.overwrite, training_args.resume_from_checkpoint)
    with training_args.main_process_first(local=True, desc="shard row cache"):
        if args.loss in PREFERENCE_LOSSES:
            train_set, eval_set, n_rows, reference_sets, reference_record = preference_datasets(
                shard_sets, rule, args.loss, projected, args.eval_fraction, cache_dir, counts,
                args.reference_shards or args.shards, model_dir, args.allow_reference_mismatch)
            preference = preference_record(args, reference_record)
        else:
            reference = None
            if args.loss == "wspo" and args.reference_logps == "shards":
                if projected:
                    raise DataError("reference log-probs from shards are per token of the shards' tokenizer; with "
                                    "reward projection use --reference_logps model")
                reference_sets = reference_sets_of(args.reference_shards or args.shards, shard_sets, model_dir, rule)
                reference = (reference_sets, logp_column(REFERENCE_SCORER))
            train_set, eval_set, n_rows = row_datasets(shard_sets, rule, args.loss, projected, args.eval_fraction,
                                                       cache_dir, counts, reference, teacher=teacher, vocab_size=vocab)
    if not n_rows:
        slots = {k.removeprefix("rows_"): v for k, v in counts.items() if k.startswith("rows_")}
        raise DataError(
            f"no chosen rows to train on in {', '.join(args.shards)} (rows by slot: {slots or 'none'}; "
            f"skipped: {counts.get('skipped_prompt_too_long', 0)} with no room for a response under max_length {max_length})"
        )
    if not len(train_set):
        raise DataError(f"eval_fraction {args.eval_fraction} leaves no training rows of {n_rows}")
    if training_args.eval_strategy != "no" and eval_set is None:
        raise DataError(
            f"eval_strategy is {training_args.eval_strategy.value} but no held-out rows: raise eval_fraction "
            f"(now {args.eval_fraction}) or set eval_strategy no"
        )

    # The run's identity, checked against the checkpoint it resumes from and recorded.
    identity = run_identity(args, model_dir, shard_sets, reference_sets, rule, max_length, projected)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    if resume:
        check_resume_identity(resume, identity, args.allow_resume_mismatch)
        guard_finished_model(Path(training_args.output_dir), identity, args.allow_resume_mismatch)
    if training_args.process_index == 0:
        write_json(identity, Path(training_args.output_dir) / IDENTITY_FILE)

    # 3. models
    _init_deepspeed_comm(training_args)
    set_seed(training_args.seed)  # LoRA initialisation
    policy, reference_model = load_models(args, training_args, model_dir)
    # auto: pack where exact (checked on the model); true: pack or refuse, naming the reason
    packing = resolve_packing(args.packing, policy, zero3=is_deepspeed_zero3_enabled())
    # Packed on sdpa: attention one sequence at a time where it is the same attention, so that a
    # micro-batch packs into one row without padding (wspo.sequence_attention). Not under
    # torch.compile (the loop over sequences would recompile per batch) nor ZeRO-3 (no start-up check).
    per_sequence = (packing and args.attn_implementation == "auto" and not training_args.torch_compile
                    and not is_deepspeed_zero3_enabled() and use_per_sequence_attention(policy, reference_model))

    # 4. training
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else rule.end_of_turn_id
    trainer = WSPOTrainer(
        policy,
        training_args,
        loss=args.loss,
        gamma=args.gamma,
        ref_model=reference_model,
        reference_from_shards=args.loss not in ("sft", "kd") and args.reference_logps == "shards",
        kd_alpha=args.kd_alpha,
        kd_temperature=args.kd_temperature,
        beta=args.beta,
        wrpo_alpha=args.wrpo_alpha,
        wrpo_alpha_schedule=args.wrpo_alpha_schedule,
        data_collator=(PreferenceCollator if preference else Collator)(pad_id, max_length if packing else None,
                                                                     args.packing_row_length, one_row=per_sequence),
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        callbacks=[NonFiniteGuard(), IdentityInCheckpoints(identity), *(callbacks or [])],
    )
    resumed_from = resume  # the checkpoint the run goes on from, for the record and the closing summary
    # CPU: keep freed memory in the process, so each step reuses its pages instead of faulting
    # them in again (wspo.models.freed_memory_kept: ~40% of a full fine-tuning step at 0.5B).
    keep = freed_memory_kept() if training_args.device.type == "cpu" else contextlib.nullcontext()
    with keep:
        result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    if eval_set is not None:
        # Reuse an evaluation the schedule already ran at the last step, else run one now.
        last_eval = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
        if last_eval is not None and last_eval["step"] == trainer.state.global_step:
            metrics.update({k: v for k, v in last_eval.items() if k.startswith("eval_")})
        else:
            metrics.update(trainer.evaluate())
    last_train_log = next((dict(h) for h in reversed(trainer.state.log_history) if "loss" in h), {})
    publish_final(trainer, training_args.output_dir)

    record = {
        "toolkit_version": wspo.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "config": {"wspo": asdict(args), "training": training_args.to_dict()},
        "model": {
            "model_name_or_path": args.model_name_or_path,
            "model_dir": str(model_dir),
            "tokenizer_fingerprint": rule.fingerprint,
            "saved": "lora_adapter" if args.use_lora else "full_model",
            "reference": trainer.reference_kind,
        },
        "parallel": {
            "world_size": training_args.world_size,
            "deepspeed_zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        },
        "identity": identity,
        "shards": describe_shards(shard_sets),
        "reference_shards": describe_shards(reference_sets),
        "preference": preference,
        "distill": None if teacher is None else {"scorer": teacher.scorer, "k": teacher.k, "encoding": teacher.encoding,
                                                 "kd_alpha": args.kd_alpha, "kd_temperature": args.kd_temperature},
        "data": {
            "max_length": max_length,
            "batches": "packed" if packing else "padded",  # what --packing resolved to
            "attention": unwrap_model(policy).config._attn_implementation,
            "packed_rows": None if not packing else (
                f"{args.packing_row_length} tokens" if args.packing_row_length
                else "one per micro-batch" if per_sequence else "as long as the micro-batch's longest sequence"),
            "reward_projection": "chunks" if projected else "none (same tokenizer: rewards token for token)",
            "train_rows": len(train_set),
            "train_response_tokens": train_set.num_tokens,
            "eval_rows": len(eval_set) if eval_set else 0,
            "eval_response_tokens": eval_set.num_tokens if eval_set else 0,
            **dict(sorted(counts.items())),
        },
        "metrics": {"final": metrics, "last_logged_train_step": last_train_log},
        "resumed_from": str(resumed_from) if resumed_from else None,
        "log_history": trainer.state.log_history,
        "output_dir": str(Path(training_args.output_dir).resolve()),
    }
    if trainer.is_world_process_zero():
        path = Path(training_args.output_dir) / RUN_FILE
        path.write_text(json.dumps(_finite_or_null(record), indent=2, default=str, allow_nan=False) + "\n")
    return record
