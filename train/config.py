"""The keys of `wspo-train` besides `transformers.TrainingArguments`; `--help` prints these texts."""

from __future__ import annotations

from dataclasses import dataclass, field

LOSSES = ("wspo", "sft")
REWARD_PROJECTIONS = ("none", "chunks")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
REFERENCE_SOURCES = ("model", "shards")


@dataclass
class WSPOArguments:
    model_name_or_path: str = field(
        metadata={"help": "The strong model to train (strong SFT): directory or hub name. Also the reference."}
    )
    shards: list[str] = field(
        metadata={"help": "One or more shard set directories written by wspo-precompute (YAML list or space-separated)."}
    )
    loss: str = field(default="wspo", metadata={"help": f"Objective: {', '.join(LOSSES)}. Both use the chosen rows only."})
    gamma: float = field(default=0.1, metadata={"help": "wspo: scale of the strong log-ratio matched to the weak reward."})
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
        metadata={"help": "'none': the strong tokenizer must equal the shards'. 'chunks': project rewards onto another tokenizer (not implemented yet)."},
    )
    reference_logps: str = field(
        default="model",
        metadata={"help": "Where the strong reference's log-probs come from: 'model' (computed in the job: LoRA with adapters "
                  "off, else a frozen copy) or 'shards' (column logp_strong_ref, scored in phase one with --strong_ref: "
                  "no reference model in training memory, one forward less per step)."},
    )
    reference_shards: list[str] | None = field(
        default=None,
        metadata={"help": "reference_logps shards: shard sets holding logp_strong_ref, joined on row id (default: `shards` themselves)."},
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
        if self.gamma <= 0:
            raise ValueError(f"gamma must be positive, got {self.gamma}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.use_lora and self.lora_r <= 0:
            raise ValueError(f"lora_r must be positive, got {self.lora_r}")

    @property
    def lora_target_modules(self) -> str | list[str]:
        if self.lora_target == "all-linear":
            return "all-linear"
        return [name.strip() for name in self.lora_target.split(",") if name.strip()]
