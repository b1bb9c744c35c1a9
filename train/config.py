"""The keys of `wspo-train` besides `transformers.TrainingArguments`; `--help` prints these texts."""

from __future__ import annotations

import math

from dataclasses import dataclass, field

LOSSES = ("wspo", "sft", "dpo", "wrpo", "kd")
PREFERENCE_LOSSES = ("dpo", "wrpo")  # pairs / triples of one example, reference log-probs from shards (logp_ref)
DEFAULT_BETA = {"dpo": 0.1, "wrpo": 0.01}  # Zephyr / the WSPO paper's weak DPO; the WRPO paper
ALPHA_SCHEDULES = ("linear", "fixed")
REWARD_PROJECTIONS = ("none", "chunks")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
REFERENCE_SOURCES = ("model", "shards")
PACKING_CHOICES = ("auto", "true", "false")


@dataclass
class WSPOArguments:
    model_name_or_path: str = field(
        metadata={"help": "The strong model to train (strong SFT): directory or hub name. Also the reference."}
    )
    shards: list[str] = field(
        metadata={"help": "One or more shard set directories written by wspo-precompute, or their URLs (s3://..., any "
                  "fsspec URL: copied once per node into data_cache_dir) (YAML list or space-separated)."}
    )
    loss: str = field(
        default="wspo",
        metadata={"help": f"Objective: {', '.join(LOSSES)}. wspo and sft use the chosen rows only; dpo pairs the chosen and "
                  "rejected rows of one example_id; wrpo the chosen_source, chosen_target and rejected rows. dpo and wrpo "
                  "read the reference's log-probs from the shards (column logp_ref: wspo-precompute --ref_model). kd distills "
                  "from a teacher's stored top-k log-probs (wspo-precompute --teacher MODEL --topk K; docs/distill.md)."},
    )
    gamma: float = field(default=0.1, metadata={"help": "wspo: scale of the strong log-ratio matched to the weak reward."})
    beta: float | None = field(
        default=None,
        metadata={"help": "dpo, wrpo: scale of the summed log-ratio inside the sigmoid (default: 0.1 for dpo, 0.01 for wrpo)."},
    )
    wrpo_alpha: float = field(
        default=0.1,
        metadata={"help": "wrpo: weight of the source models' chosen response y_ws (1 - alpha on the target's y_wt); with "
                  "the linear schedule, the value approached (alpha_max * (N-1)/N at the last of N optimizer steps)."},
    )
    wrpo_alpha_schedule: str = field(
        default="linear",
        metadata={"help": "wrpo: 'linear' (alpha = wrpo_alpha * step / max_steps, step = optimizer step from 0, as in the WRPO authors' code, so "
                  "every micro-batch of one accumulated step uses the same alpha) or 'fixed' (wrpo_alpha throughout)."},
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (reference = adapters off) instead of every weight."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target: str = field(
        default="all-linear",
        metadata={"help": "Modules given adapters: 'all-linear' (every linear layer but the output head) or comma-separated names."},
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Max prompt + response tokens (default: the shards' max_length). Shorter cuts responses and their rewards."},
    )
    eval_fraction: float = field(
        default=0.05,
        metadata={"help": "Fraction of examples held out for evaluation, chosen by a hash of example_id (0 disables)."},
    )
    reward_projection: str = field(
        default="none",
        metadata={"help": "'none': the strong tokenizer must equal the shards'. 'chunks': a strong model with another tokenizer; "
                  "rewards are summed over chunks both tokenizations agree on (DESIGN section 5)."},
    )
    reference_logps: str | None = field(
        default=None,
        metadata={"help": "Where the strong reference's log-probs come from: 'model' (computed in the job: LoRA with adapters "
                  "off, else a frozen copy) or 'shards' (column logp_strong_ref, scored in phase one with --strong_ref: "
                  "no reference model in training memory, one forward less per step). Default: model for wspo; dpo and "
                  "wrpo always use shards (column logp_ref)."},
    )
    reference_shards: list[str] | None = field(
        default=None,
        metadata={"help": "reference_logps shards: shard sets holding logp_strong_ref (wspo) or logp_ref (dpo, wrpo), joined on "
                  "row id (default: `shards` themselves)."},
    )
    allow_reference_mismatch: bool = field(
        default=False,
        metadata={"help": "dpo, wrpo: train although logp_ref was scored with other weights than model_name_or_path (the "
                  "reference is then not the policy's starting point; the scorer is recorded in wspo_run.json)."},
    )
    packing: str = field(
        default="auto",
        metadata={"help": "Pack each micro-batch's sequences, in order, into rows of up to max_length tokens with position ids "
                  "restarting per sequence and no padding inside rows (attention stays inside each sequence). "
                  "per_device_train_batch_size still counts sequences (dpo/wrpo: examples); losses equal the padded batch's. "
                  "Every loss packs. auto (default): pack when the model's attention implementation is sdpa, eager, "
                  "flex_attention or flash_attention_2/3, a start-up check on two short sequences finds packed = separate "
                  "logits, and DeepSpeed ZeRO-3 is off; else pad. true: pack or fail naming the reason. false: pad."},
    )
    packing_row_length: int | None = field(
        default=None,
        metadata={"help": "packing: tokens per packed row (at most max_length). Default: the whole micro-batch in one row "
                  "where attention runs per sequence (attn_implementation auto on sdpa), else its longest sequence "
                  "(sdpa/eager with a block mask cost the square of the row length). With flash_attention_2 set it to "
                  "max_length."},
    )
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "The models' attention (transformers' attn_implementation). auto (default): transformers' "
                  "choice (sdpa), and when packing, wspo_per_sequence_sdpa: sdpa run one sequence at a time inside "
                  "packed rows, so a micro-batch packs into one row without padding; checked at start-up, else sdpa. "
                  "Or a name, used as given: sdpa, eager, flash_attention_2, flex_attention."},
    )
    data_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where the training rows are kept as uncompressed, memory-mapped Arrow files (one per shard set, "
                  "named by its fingerprint; reused by later runs and shared by the ranks of a node). Default: "
                  "<output_dir>/.wspo_cache."},
    )
    kd_alpha: float = field(
        default=1.0,
        metadata={"help": "kd: weight of the distillation KL; 1 - kd_alpha weighs the SFT loss on the actual tokens."},
    )
    kd_temperature: float = field(
        default=1.0,
        metadata={"help": "kd: temperature softening the teacher's and the student's top-k + bucket distributions (loss x T^2)."},
    )
    kd_scorer: str | None = field(
        default=None,
        metadata={"help": "kd: the scorer whose top-k columns are the teacher (default: the set's only top-k scorer, "
                  "else 'teacher')."},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace what output_dir holds of an earlier run (a finished model, wspo_run.json, checkpoints); "
                  "without it such an output_dir is refused (resuming its checkpoints aside)."},
    )
    allow_resume_mismatch: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint written by a run with another identity (strong model, shard sets, loss "
                  "and its keys, tokenizer rule) or with none recorded; by default such a resume is refused naming what differs."},
    )
    model_dtype: str = field(
        default="auto",
        metadata={"help": "dtype to load the model in: auto (LoRA: the bf16/fp16 training dtype; full fine-tuning: float32), float32, bfloat16, float16."},
    )

    def __post_init__(self):
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        if not self.shards:
            raise ValueError("shards: give at least one shard set directory")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.reward_projection not in REWARD_PROJECTIONS:
            raise ValueError(f"reward_projection: {self.reward_projection!r}; choose from {', '.join(REWARD_PROJECTIONS)}")
        if self.reference_logps is None:
            self.reference_logps = "shards" if self.loss in PREFERENCE_LOSSES else "model"
        if self.loss in PREFERENCE_LOSSES and self.reference_logps != "shards":
            raise ValueError(
                f"loss {self.loss} reads the reference's log-probs from the shards (column logp_ref, wspo-precompute "
                "--ref_model MODEL); reference_logps model is not supported for it"
            )
        if self.beta is None:
            self.beta = DEFAULT_BETA.get(self.loss, 0.1)
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be finite and positive, got {self.beta}")
        if not 0.0 <= self.wrpo_alpha <= 1.0:
            raise ValueError(f"wrpo_alpha must be in [0, 1], got {self.wrpo_alpha}")
        if self.wrpo_alpha_schedule not in ALPHA_SCHEDULES:
            raise ValueError(f"wrpo_alpha_schedule: {self.wrpo_alpha_schedule!r}; choose from {', '.join(ALPHA_SCHEDULES)}")
        if self.reference_logps not in REFERENCE_SOURCES:
            raise ValueError(f"reference_logps: {self.reference_logps!r}; choose from {', '.join(REFERENCE_SOURCES)}")
        if isinstance(self.reference_shards, str):
            self.reference_shards = [self.reference_shards]
        if self.reference_shards and self.reference_logps != "shards":
            raise ValueError("reference_shards is set but reference_logps is 'model': set --reference_logps shards to use them")
        if self.model_dtype not in MODEL_DTYPES:
            raise ValueError(f"model_dtype: {self.model_dtype!r}; choose from {', '.join(MODEL_DTYPES)}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be finite and positive, got {self.gamma}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.packing_row_length is not None and self.packing_row_length < 2:
            raise ValueError(f"packing_row_length must be at least 2, got {self.packing_row_length}")
        if isinstance(self.packing, bool):  # the Python API's packing=True / False
            self.packing = "true" if self.packing else "false"
        if self.packing not in PACKING_CHOICES:
            raise ValueError(f"packing: {self.packing!r}; choose from {', '.join(PACKING_CHOICES)}")
        if self.packing_row_length is not None and self.packing == "false":
            raise ValueError("packing_row_length is set but packing is false: set --packing true (or auto) to use it")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if not (math.isfinite(self.kd_temperature) and self.kd_temperature > 0):
            raise ValueError(f"kd_temperature must be finite and positive, got {self.kd_temperature}")
        if self.loss == "kd" and self.reward_projection != "none":
            raise ValueError("loss kd needs the student to use the shards' tokenizer (top-k ids are the teacher's "
                             "vocabulary); cross-tokenizer distillation is not supported: set reward_projection none")
        if self.use_lora and self.lora_r <= 0:
            raise ValueError(f"lora_r must be positive, got {self.lora_r}")

    @property
    def lora_target_modules(self) -> str | list[str]:
        if self.lora_target == "all-linear":
            return "all-linear"
        return [name.strip() for name in self.lora_target.split(",") if name.strip()]
